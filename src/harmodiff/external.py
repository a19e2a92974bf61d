"""Bring another method's harmonized scans (STGAN, HACA3, IGUANE, ...) onto the working grid.

    python -m harmodiff.external --input THEIRS.nii.gz --mask MASK.nii.gz --space native|mni \
        [--transform SCAN_to_mni.mat] --output OUT.nii.gz

External tools write their results either in the scan's native space (`native`: moved with the
scan's own preprocessing affine, so it lands on exactly the voxels of our preprocessed scan)
or in MNI space (`mni`: resampled by world coordinates). Either way the result is masked with
our brain mask and median-normalized like a preprocessed scan, so every method is scored on the
same voxels and the same intensity scale.
"""

from __future__ import annotations

import argparse

import numpy as np

from harmodiff.intensity import median_normalize
from harmodiff.antsio import to_ants
from harmodiff.io import InputError, check_outputs, load_image, load_mask, save_image, one_line_errors

SPACES = ("native", "mni")


def import_external(input_path, mask_path, space: str, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """The external image on the working grid of `mask_path`, masked and median-normalized."""
    import ants

    if space not in SPACES:
        raise InputError(f"external method: space must be one of {SPACES}, got {space!r}")
    if space == "native" and not transform:
        raise InputError(f"{input_path}: a native-space external image needs the scan's --transform")
    grid = load_image(mask_path)
    mask = load_mask(mask_path)
    moving = to_ants(load_image(input_path))
    fixed = to_ants(grid)
    if space == "native":
        moved = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(transform)],
                                      interpolator="linear").numpy()
    else:
        moved = ants.resample_image_to_target(moving, fixed, interp_type="linear").numpy()
    inside = moved[mask]
    if not np.isfinite(inside).all() or (inside <= 0).mean() > 0.5:
        raise InputError(f"{input_path}: after resampling most of the brain mask is empty; is --space "
                         f"{space!r} right for this file?")
    return median_normalize(moved, mask), grid.affine


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.external", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="the external method's harmonized scan")
    p.add_argument("--mask", required=True, help="our preprocessed brain mask of the same scan (working grid)")
    p.add_argument("--space", choices=SPACES, required=True)
    p.add_argument("--transform", help="the scan's *_to_mni.mat from preprocessing (space native)")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    check_outputs([a.output], inputs=[a.input, a.mask, a.transform])
    data, affine = import_external(a.input, a.mask, a.space, a.transform)
    save_image(data, affine, a.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
