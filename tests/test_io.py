import nibabel as nib
import numpy as np
import pytest

from harmodiff.io import InputError, atomic_path, load_image, save_image


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_valid_image_loads_and_singleton_4d_is_squeezed(tmp_path):
    img = load_image(_write(tmp_path / "a.nii.gz", np.ones((4, 5, 6, 1), np.float32)))
    assert img.shape == (4, 5, 6)


@pytest.mark.parametrize("name,data,affine,message", [
    ("4d.nii.gz", np.ones((4, 4, 4, 3), np.float32), None, "expected a 3-D image"),
    ("nan.nii.gz", np.where(np.eye(4)[:, :, None] > 0, np.nan, 1.0).repeat(4, 2).astype(np.float32), None, "NaN/inf"),
    ("zero.nii.gz", np.zeros((4, 4, 4), np.float32), None, "all zeros"),
])
def test_bad_images_name_file_and_problem(tmp_path, name, data, affine, message):
    path = _write(tmp_path / name, data, affine)
    with pytest.raises(InputError) as exc:
        load_image(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_image_without_usable_affine(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)  # qform and sform codes 0
    path = tmp_path / "noaffine.nii"
    nib.save(img, str(path))

    message = "no usable affine"
    with pytest.raises(InputError) as exc:
        load_image(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_not_nifti_and_missing(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_image(bad)
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.nii.gz")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    save_image(np.ones((3, 3, 3)), np.eye(4), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    np.testing.assert_array_equal(nib.load(str(target)).get_fdata(), 1.0)
