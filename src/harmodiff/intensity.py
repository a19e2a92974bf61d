"""The intensity scale every stage shares: brain median 500, and the model's units.

Preprocessing divides each brain by its median inside the brain mask and multiplies by 500
(`median_normalize`); the network sees x / 500 - 1, so the brain median is 0 and the background
exactly -1 (`to_model_units`); `from_model_units` inverts it.
"""

from __future__ import annotations

import numpy as np

from harmodiff.io import InputError

MEDIAN_TARGET = 500.0


def median_normalize(data: np.ndarray, mask: np.ndarray, target: float = MEDIAN_TARGET) -> np.ndarray:
    """Scale so the median inside `mask` is `target`; background 0, negatives clipped to 0."""
    if not mask.any():
        raise InputError("median normalization: the brain mask is empty")
    med = float(np.median(data[mask]))
    if med <= 0:
        raise InputError(f"median normalization: brain median is {med:.3g} (must be > 0)")
    out = np.where(mask, np.clip(data, 0, None) * (target / med), 0.0)
    return out.astype(np.float32)


def to_model_units(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """What the network sees: x / 500 - 1 (brain median 0); background exactly -1."""
    x = data / MEDIAN_TARGET - 1.0
    if mask is not None:
        x = np.where(mask, x, -1.0)
    return x.astype(np.float32)


def from_model_units(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `to_model_units`: (y + 1) * 500, clipped at 0, background 0."""
    y = np.clip((x + 1.0) * MEDIAN_TARGET, 0, None)
    if mask is not None:
        y = np.where(mask, y, 0.0)
    return y.astype(np.float32)
