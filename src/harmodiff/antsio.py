"""ANTs <-> nibabel conversions shared by every stage that calls ANTs (preprocessing,
segmentation, external methods, back-projection to native space). antspyx is imported on first
use: modules that only read NIfTI never load it."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from harmodiff.io import load_image, save_image


def set_threads(n: int) -> None:
    """ITK/ANTs and torch thread counts; must run before the first ANTs call to take effect."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(n))
    os.environ["OMP_NUM_THREADS"] = str(int(n))


def _ants():
    import ants

    return ants


def to_ants(img: nib.Nifti1Image):
    out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    out.header.set_xyzt_units("mm", "sec")  # otherwise ITK warns on every conversion
    return _ants().from_nibabel_nifti(out)


def to_nib(image) -> nib.Nifti1Image:
    return _ants().to_nibabel_nifti(image)


def to_native(harmonized, native_reference, transform, output) -> None:
    """Bring a working-grid image (a file or an image in memory) back to its native scan through
    the inverse of the preprocessing's affine (`*_to_mni.mat`)."""
    ref = to_ants(load_image(native_reference))
    moving = to_ants(harmonized if isinstance(harmonized, nib.Nifti1Image) else load_image(harmonized))
    out = _ants().apply_transforms(fixed=ref, moving=moving, transformlist=[str(transform)], whichtoinvert=[True])
    img = to_nib(out)
    save_image(np.asarray(img.dataobj), img.affine, output)
