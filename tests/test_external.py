import ants
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from harmodiff import external
from harmodiff.io import InputError
from harmodiff.antsio import to_ants
from harmodiff.templates import working_grid

SHAPE = (40, 48, 40)


def _grid_scene(tmp_path):
    affine = working_grid(4.0, SHAPE)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"),
                                                   (20, 24, 20))))
    mask = r < 14
    image = np.where(mask, 300 + 400 * (r < 8) + 5 * np.arange(SHAPE[0])[:, None, None], 0).astype(np.float32)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(tmp_path / "mask.nii.gz"))
    return image, mask, affine


def test_native_result_comes_back_onto_the_mask_grid(tmp_path):
    image, mask, affine = _grid_scene(tmp_path)
    # a "scan -> MNI" affine: 8 degrees about z and a 6 mm shift
    t = np.deg2rad(8)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]),
                                    translation=(6.0, 0.0, 0.0), center=tuple(affine[:3, 3] + 2.0 * np.array(SHAPE)))
    mat = str(tmp_path / "scan_to_mni.mat")
    ants.write_transform(tx, mat)
    grid_img = to_ants(nib.Nifti1Image(image, affine))
    # what an external tool hands back in native space: our grid image pulled through the inverse
    native = ants.apply_transforms(fixed=grid_img, moving=grid_img, transformlist=[mat], whichtoinvert=[True])
    ants.image_write(native, str(tmp_path / "native.nii.gz"))
    out, out_affine = external.import_external(tmp_path / "native.nii.gz", tmp_path / "mask.nii.gz", "native", mat)
    np.testing.assert_allclose(out_affine, affine)
    inner = ndimage.binary_erosion(mask, iterations=3)
    assert np.corrcoef(out[inner], image[inner])[0, 1] > 0.98
    assert np.median(out[mask]) == pytest.approx(500.0, rel=1e-4) and (out[~mask] == 0).all()


def test_mni_result_is_resampled_by_world_coordinates(tmp_path):
    image, mask, affine = _grid_scene(tmp_path)
    fine = affine.copy()
    fine[:3, :3] /= 2  # the same scene on a 2 mm grid
    zoomed = ndimage.zoom(image, 2, order=1, grid_mode=True, mode="nearest")
    nib.save(nib.Nifti1Image(zoomed.astype(np.float32), fine), str(tmp_path / "mni.nii.gz"))
    out, _ = external.import_external(tmp_path / "mni.nii.gz", tmp_path / "mask.nii.gz", "mni")
    inner = ndimage.binary_erosion(mask, iterations=2)
    assert np.corrcoef(out[inner], image[inner])[0, 1] > 0.97


def test_wrong_space_or_missing_transform_is_named(tmp_path):
    image, mask, affine = _grid_scene(tmp_path)
    far = affine.copy()
    far[:3, 3] += 500.0  # nowhere near the brain
    nib.save(nib.Nifti1Image(image, far), str(tmp_path / "far.nii.gz"))
    with pytest.raises(InputError, match="is --space 'mni' right"):
        external.import_external(tmp_path / "far.nii.gz", tmp_path / "mask.nii.gz", "mni")
    with pytest.raises(InputError, match="needs the scan's --transform"):
        external.import_external(tmp_path / "far.nii.gz", tmp_path / "mask.nii.gz", "native")
