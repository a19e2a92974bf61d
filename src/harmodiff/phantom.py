"""A small phantom population for checking that the diffusion model can learn to harmonize.

Each subject is a random ellipsoidal "brain" of 32^3 voxels: a wavy white-matter core, a grey
matter shell, an outer CSF layer and a ventricle, as partial-volume tissue maps. A site renders
the maps with tissue intensities and a power-law contrast curve (`SITES`), plus Gaussian noise;
the noise-free rendering of the same subject at another site is the ideal harmonization. The
sites differ by their contrast curve (log-gamma -0.6 / 0 / +0.47), inside the range the
training's anatomy perturbation covers, so the anatomy map cannot tell them apart and the site
label has to carry the contrast.

Used by the learnability test (tests/test_learnability.py) and benchmarks/training_options.py.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from harmodiff.intensity import median_normalize

SHAPE = (32, 32, 32)
TISSUES = (0.25, 0.55, 0.95)          # CSF, GM, WM before the site's curve
# power-law exponent of each site's contrast curve; D is never a training site (the scanner a site token
# is learned for with the network frozen, tests/test_learnability.py)
SITES = {"A": 1.0, "B": 0.55, "C": 1.6, "D": 1.3}


def subject_maps(index: int, shape=SHAPE) -> tuple[list[np.ndarray], np.ndarray]:
    """([CSF, GM, WM] partial-volume maps, brain mask) of phantom subject `index`."""
    rng = np.random.default_rng([7, index])
    grid = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    radii = rng.uniform(11, 14, 3) * min(shape) / 32
    wave = ndimage.gaussian_filter(rng.normal(0, 1, shape), 4)
    wave /= wave.std() + 1e-9
    rho = np.sqrt(sum((z / a) ** 2 for z, a in zip(grid, radii)))
    brain = rho < 1.0
    wm = rho < rng.uniform(0.5, 0.7) * (1 + 0.12 * wave)
    csf = (rho > 0.88 + 0.05 * wave) & brain
    centre, axes = rng.uniform(-2, 2, 3), rng.uniform(2, 3.5, 3)
    csf |= (np.sqrt(sum(((z - c) / a) ** 2 for z, c, a in zip(grid, centre, axes))) < 1) & brain
    wm &= ~csf
    gm = brain & ~wm & ~csf
    return [ndimage.gaussian_filter(m.astype(np.float32), 0.6) for m in (csf, gm, wm)], brain


def render(maps, brain: np.ndarray, site: str, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    """The subject at a site, brain median 500 (as preprocessing leaves a scan); `noise` is the
    Gaussian noise sd relative to WM before the curve (0: the noise-free truth)."""
    image = sum(t * m for t, m in zip(TISSUES, maps)) ** SITES[site]
    if noise:
        image = image + np.random.default_rng(seed).normal(0, noise, image.shape)
    image = np.where(brain, np.clip(image, 0.01, None), 0).astype(np.float32)
    return median_normalize(image, brain)
