"""The site-invariant anatomical prior A and its coarse context A_coarse (paper section 2.2).

    I' = gamma_perturb(I)                 brain scaled to [0, 1], raised to exp(log_gamma)
    G  = |grad I'|                        central differences, voxel units
    H  = |I' - Gauss_sigma(I')|           Gaussian truncated at radius r = max(1, ceil(3 sigma))
    A  = alpha G + (1 - alpha) H          then quantile-normalized: the 0.5th / 99.5th brain
                                          percentiles map to -1 / 1, clipped; background -1

A multi-scale variant (the authors' released code) is a weighted sum of terms, each either the
gradient magnitude of a Gaussian-smoothed image ("grad", sigma) or a high-frequency residual
("hf", sigma): pass `terms=[("grad", s1, 0.5), ("grad", s2, 0.3), ("hf", s, 0.2)]`.

A_coarse: mode `local` downsamples A trilinearly by `factor` and brings it back to A's grid, so a
patch of it is cut at the patch's own coordinates; mode `global` resamples the whole A to the
patch shape (one volume-wide context shared by every patch).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from harmodiff.config import AnatomyConfig, GridConfig, add_setting_options, load_settings
from harmodiff.io import (one_line_errors, InputError, json_sidecar, load_image, load_mask, outputs_together,
                          save_image, write_json)

QUANTILES = (0.5, 99.5)
_DEFAULT = AnatomyConfig  # every default of the anatomy map lives in harmodiff.config
NORMALIZE_EROSION = _DEFAULT.normalize_erosion  # voxels of the brain rim left out of the normalizing percentiles


def kernel_radius(sigma: float) -> int:
    """Radius of the truncated Gaussian kernel: r = max(1, ceil(3 sigma)); kernel side 2r + 1."""
    return max(1, int(math.ceil(3.0 * float(sigma))))


def gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=float(sigma), radius=kernel_radius(sigma), mode="nearest")


def gamma_perturb(image: np.ndarray, mask: np.ndarray, log_gamma: float = 0.0) -> np.ndarray:
    """Scale the brain to [0, 1] (min/max inside the mask), raise to exp(log_gamma); background 0."""
    if not mask.any():
        raise InputError("gamma_perturb: the brain mask is empty")
    values = image[mask]
    lo, hi = float(values.min()), float(values.max())
    scaled = np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    scaled = np.where(mask, scaled, 0.0)
    if log_gamma != 0.0:
        scaled = np.power(scaled, math.exp(log_gamma))
    return scaled.astype(np.float32)


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """|grad I| with central differences (one-sided at the borders), in voxel units."""
    grads = np.gradient(image.astype(np.float64))
    return np.sqrt(sum(g * g for g in grads)).astype(np.float32)


def high_frequency(image: np.ndarray, sigma: float) -> np.ndarray:
    """|I - Gauss_sigma(I)|."""
    return np.abs(image - gaussian(image, sigma)).astype(np.float32)


def raw_anatomy(perturbed: np.ndarray, *, alpha: float = _DEFAULT.alpha, sigma: float = _DEFAULT.sigma,
                terms: Sequence[tuple[str, float, float]] | None = None) -> np.ndarray:
    """alpha G + (1 - alpha) H of an already perturbed image, or the weighted multi-scale sum."""
    if terms is None:
        return (alpha * gradient_magnitude(perturbed) + (1 - alpha) * high_frequency(perturbed, sigma)).astype(np.float32)
    out = np.zeros(perturbed.shape, np.float32)
    for kind, s, weight in terms:
        if kind == "grad":
            out += weight * gradient_magnitude(gaussian(perturbed, s) if s > 0 else perturbed)
        elif kind == "hf":
            out += weight * high_frequency(perturbed, s)
        else:
            raise ValueError(f"anatomy term kind must be 'grad' or 'hf', got {kind!r}")
    return out


def quantile_normalize(values: np.ndarray, mask: np.ndarray, quantiles=QUANTILES, erosion: int = 0) -> np.ndarray:
    """Map the lower/upper quantiles of the brain eroded by `erosion` voxels (the whole brain when
    the erosion would leave nothing) to -1/1, clip to [-1, 1]; background -1."""
    inner = ndimage.binary_erosion(mask, iterations=int(erosion)) if erosion > 0 else mask
    if not inner.any():
        inner = mask
    lo, hi = np.percentile(values[inner], quantiles)
    scaled = 2.0 * (values - lo) / max(float(hi - lo), 1e-12) - 1.0
    return np.where(mask, np.clip(scaled, -1.0, 1.0), -1.0).astype(np.float32)


def anatomy_map(image: np.ndarray, mask: np.ndarray, *, alpha: float = _DEFAULT.alpha, sigma: float = _DEFAULT.sigma,
                log_gamma: float = 0.0, terms=None, erosion: int = NORMALIZE_EROSION) -> np.ndarray:
    """The anatomical map A in [-1, 1] (see the module docstring)."""
    mask = np.asarray(mask, bool)
    perturbed = gamma_perturb(image, mask, log_gamma)
    return quantile_normalize(raw_anatomy(perturbed, alpha=alpha, sigma=sigma, terms=terms), mask, erosion=erosion)


def anatomy_map_from_config(image: np.ndarray, mask: np.ndarray, settings: AnatomyConfig,
                            log_gamma: float = 0.0) -> np.ndarray:
    """`anatomy_map` under a config's `anatomy` settings (training and inference)."""
    return anatomy_map(image, mask, alpha=settings.alpha, sigma=settings.sigma, log_gamma=log_gamma,
                       erosion=settings.normalize_erosion)


def _trilinear(volume: np.ndarray, size) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0, 0].numpy()


def check_settings(anatomy_path, trained: AnatomyConfig, checkpoint) -> None:
    """A file made with other anatomy settings than the model was trained with is an error naming
    both (a file without its settings JSON is taken as it is)."""
    recorded = json_sidecar(anatomy_path)
    if not recorded.is_file():
        return
    try:
        made = AnatomyConfig.of(json.loads(recorded.read_text())["anatomy"]).to_dict()
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{recorded}: not an anatomy settings file ({exc})") from None
    wanted = trained.to_dict()
    differ = [f"{k} {made[k]!r} (the model: {wanted[k]!r})" for k in made if made[k] != wanted[k]]
    if differ:
        raise InputError(f"{anatomy_path} was made with anatomy {', '.join(differ)}; the model {checkpoint} was "
                         f"trained with other settings: remake A with the model's settings")


def coarse_map(anatomy: np.ndarray, factor: int = _DEFAULT.coarse_factor, mode: str = _DEFAULT.coarse_mode,
               patch_shape=None) -> np.ndarray:
    """A_coarse: `local` -> A downsampled by `factor` and back on A's grid; `global` -> A at patch shape."""
    if mode == "local":
        small = [max(1, int(round(s / factor))) for s in anatomy.shape]
        return _trilinear(_trilinear(anatomy, small), anatomy.shape)
    if mode == "global":
        if patch_shape is None:
            raise ValueError("coarse_map mode 'global' needs patch_shape")
        return _trilinear(anatomy, patch_shape)
    raise ValueError(f"coarse_map mode must be 'local' or 'global', got {mode!r}")


def coarse_patch(coarse: np.ndarray, corner, patch_shape, mode: str = _DEFAULT.coarse_mode) -> np.ndarray:
    """The A_coarse input of the patch at `corner`."""
    if mode == "global":
        return coarse
    sl = tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corner, patch_shape))
    return coarse[sl]


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.anatomy", description="Compute A and A_coarse.")
    p.add_argument("--input", required=True, help="preprocessed image (working grid)")
    p.add_argument("--mask", required=True, help="its brain mask")
    p.add_argument("--output", required=True, help="A (.nii.gz)")
    p.add_argument("--coarse-output", required=True, help="A_coarse (.nii.gz)")
    p.add_argument("--config", help="settings file (its grid and anatomy sections: the workflow's "
                   "results/config/anatomy.yaml, or a workflow config); the options below override it")
    add_setting_options(p, AnatomyConfig, GridConfig, skip=("spacing", "shape"))
    p.add_argument("--log-gamma", type=float, default=0.0, help="A under this log-gamma contrast (training "
                   "perturbs it; inference: 0)")
    a = p.parse_args(argv)
    settings = load_settings(AnatomyConfig, a.config, a)
    patch_shape = load_settings(GridConfig, a.config, a).patch_shape
    with outputs_together([a.output, a.coarse_output, json_sidecar(a.output)], inputs=[a.input, a.mask]):
        img = load_image(a.input)
        mask = load_mask(a.mask, like=img)
        if not mask.any():
            raise InputError(f"{a.mask}: brain mask is empty")
        A = anatomy_map(np.asarray(img.dataobj, np.float32), mask, alpha=settings.alpha, sigma=settings.sigma,
                        log_gamma=a.log_gamma, erosion=settings.normalize_erosion)
        coarse = coarse_map(A, settings.coarse_factor, settings.coarse_mode, patch_shape)
        save_image(A, img.affine, a.output)
        coarse_affine = img.affine
        if settings.coarse_mode == "global":  # the whole field of view at patch shape
            coarse_affine = img.affine.copy()
            coarse_affine[:3, :3] = img.affine[:3, :3] @ np.diag(np.array(img.shape) / np.array(coarse.shape))
        save_image(coarse, coarse_affine, a.coarse_output)
        write_json({"anatomy": settings.to_dict(), "log_gamma": a.log_gamma, "input": str(a.input)},
                   json_sidecar(a.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
