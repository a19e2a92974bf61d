"""The MNI152 2009a templates shipped inside nilearn and the working grid derived from them.

The working grid is an MNI-space box of `shape` voxels at `spacing` mm, centred on the template
brain's bounding box and snapped to the template's 1 mm lattice (so at 1 mm no half-voxel
interpolation happens). The paper's grid is 1 mm, 160x192x160; the demo's 2 mm, 80x96x80.
"""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np


@lru_cache(maxsize=1)
def mni_images() -> dict[str, nib.Nifti1Image]:
    """T1 (brain only), brain mask, GM, WM and CSF (= mask - GM - WM) maps at 1 mm."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    m = mask.get_fdata(dtype=np.float32)
    g = gm.get_fdata(dtype=np.float32) * m
    w = wm.get_fdata(dtype=np.float32) * m
    csf = np.clip(m - g - w, 0, 1)
    aff = mask.affine
    return {
        "t1": nib.Nifti1Image(t1.get_fdata(dtype=np.float32) * m, aff),
        "mask": nib.Nifti1Image(m, aff),
        "gm": nib.Nifti1Image(g, aff),
        "wm": nib.Nifti1Image(w, aff),
        "csf": nib.Nifti1Image(csf, aff),
    }


def brain_centre_mm() -> np.ndarray:
    """World (RAS mm) centre of the template brain mask's bounding box, on the 1 mm lattice."""
    mask = mni_images()["mask"]
    idx = np.argwhere(np.asarray(mask.dataobj) > 0.5)
    centre_vox = np.floor((idx.min(0) + idx.max(0)) / 2.0)
    return (mask.affine @ np.r_[centre_vox, 1.0])[:3]


def working_grid(spacing: float, shape) -> np.ndarray:
    """RAS voxel-to-world affine of the working grid (axes aligned with MNI's RAS axes)."""
    shape = np.asarray(shape, dtype=float)
    if spacing <= 0 or shape.size != 3 or (shape < 2).any():
        raise ValueError(f"working grid: need spacing > 0 and three sides >= 2, got {spacing}, {shape}")
    origin = brain_centre_mm() - spacing * np.floor(shape / 2.0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    return affine
