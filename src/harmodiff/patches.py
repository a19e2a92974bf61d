"""Patch planning, extraction and Hann-weighted fusion (paper sections 2.3 and 2.7).

Fusion is the weighted average X(v) = sum_i w_i(v) x_i(v) / sum_i w_i(v), with w_i the patch's
separable 3-D Hann window placed at its corner.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def _axis_positions(n: int, p: int, min_overlap: float) -> list[int]:
    if p > n:
        raise ValueError(f"patch side {p} is larger than the volume side {n}")
    if p == n:
        return [0]
    max_stride = max(1, int(math.floor(p * (1.0 - min_overlap))))
    count = int(math.ceil((n - p) / max_stride)) + 1
    # floor of evenly spaced reals: consecutive gaps <= ceil(real gap) <= max_stride, last = n - p
    return [int(math.floor(i * (n - p) / (count - 1))) for i in range(count)]


def grid_positions(volume_shape, patch_shape, min_overlap: float = 0.5) -> list[tuple[int, int, int]]:
    """Corners of a dense patch grid covering every voxel, neighbours overlapping >= min_overlap.

    160x192x160 with 80x96x80 patches at 0.5 gives 3 positions per axis (27 patches).
    """
    if not 0.0 <= min_overlap < 1.0:
        raise ValueError(f"min_overlap must be in [0, 1), got {min_overlap}")
    axes = [_axis_positions(int(n), int(p), min_overlap) for n, p in zip(volume_shape, patch_shape)]
    return [tuple(c) for c in itertools.product(*axes)]


def hann_1d(n: int, floor: float = 1e-3) -> np.ndarray:
    """Symmetric Hann weights sampled at voxel centres, sin^2(pi (i + 1/2) / n), lifted by `floor`.

    Sampling at voxel centres keeps every weight positive; the floor keeps voxels that only one
    patch covers (the volume border) from being divided by a near-zero weight sum.
    """
    i = np.arange(n, dtype=np.float64)
    w = np.sin(np.pi * (i + 0.5) / n) ** 2
    return (floor + (1.0 - floor) * w).astype(np.float64)


def hann_window(patch_shape, floor: float = 1e-3) -> np.ndarray:
    """Separable 3-D Hann window: outer product of `hann_1d` along each axis."""
    wx, wy, wz = (hann_1d(int(n), floor) for n in patch_shape)
    return (wx[:, None, None] * wy[None, :, None] * wz[None, None, :]).astype(np.float32)


def extract(volume: np.ndarray, corner, patch_shape) -> np.ndarray:
    sl = tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corner, patch_shape))
    return volume[(..., *sl)]


def fuse(patches: Sequence[np.ndarray], positions, volume_shape, window: np.ndarray) -> np.ndarray:
    """Hann-weighted average of patches placed at their corners; every voxel must be covered."""
    num = np.zeros(tuple(volume_shape), np.float64)
    den = np.zeros(tuple(volume_shape), np.float64)
    for patch, corner in zip(patches, positions, strict=True):
        sl = tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corner, patch.shape))
        num[sl] += window * patch
        den[sl] += window
    if (den <= 0).any():
        raise ValueError(f"fuse: {int((den <= 0).sum())} voxels are covered by no patch")
    return (num / den).astype(np.float32)


def brain_bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (low, high) voxel corners of the mask's bounding box."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("brain_bbox: the mask is empty")
    return idx.min(0), idx.max(0)


def random_patch(volume_shape, patch_shape, bbox, rng: np.random.Generator) -> tuple[int, int, int]:
    """A training patch corner, uniform over corners that keep the patch inside the volume and
    overlapping the brain bounding box `bbox` = (low, high), inclusive."""
    lo_b, hi_b = bbox
    corner = []
    for n, p, b0, b1 in zip(volume_shape, patch_shape, lo_b, hi_b):
        if p > n:
            raise ValueError(f"patch side {p} is larger than the volume side {n}")
        low = max(0, int(b0) - int(p) + 1)
        high = min(int(n) - int(p), int(b1))
        if low > high:
            raise ValueError("random_patch: no patch position overlaps the bounding box")
        corner.append(int(rng.integers(low, high + 1)))
    return tuple(corner)


def seam_ratio(volume: np.ndarray, positions, patch_shape) -> float:
    """Mean |difference between neighbouring voxels| across patch borders over that inside patches.

    Borders are the planes where some patch starts or ends; a value near 1 means no seams.
    """
    border, inside = [], []
    for axis in range(3):
        diffs = np.abs(np.diff(volume, axis=axis))  # diffs[i] is between planes i and i+1
        cuts = set()
        for c in positions:
            start, end = int(c[axis]), int(c[axis]) + int(patch_shape[axis])
            if start > 0:
                cuts.add(start - 1)
            if end < volume.shape[axis]:
                cuts.add(end - 1)
        for i in range(diffs.shape[axis]):
            (border if i in cuts else inside).append(float(np.take(diffs, i, axis=axis).mean()))
    return float(np.mean(border) / np.mean(inside))
