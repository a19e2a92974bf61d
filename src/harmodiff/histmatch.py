"""Histogram matching to a target site: the classical image-level baseline.

    python -m harmodiff.histmatch --input PRE.nii.gz --mask MASK.nii.gz \
        --reference-images TRA1.nii.gz ... --reference-masks TRA1_mask.nii.gz ... --output OUT.nii.gz

The target site's intensity distribution is the pool of its preprocessed training brains, each
contributing the same number of quantiles (so one large scan cannot dominate and memory stays
bounded at 1 mm). scikit-image's `match_histograms` then maps the input brain's intensities
monotonically onto that pool; the background stays 0.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from skimage.exposure import match_histograms

from harmodiff.io import InputError, load_image, load_mask, save_image

QUANTILES_PER_SCAN = 4096


def reference_distribution(images: list[np.ndarray], masks: list[np.ndarray],
                           n_quantiles: int = QUANTILES_PER_SCAN) -> np.ndarray:
    """Pooled in-brain intensities of the target site: `n_quantiles` quantiles per scan."""
    if not images:
        raise InputError("histogram matching: the target site has no reference scans")
    q = np.linspace(0.0, 1.0, n_quantiles)
    return np.concatenate([np.quantile(im[m], q) for im, m in zip(images, masks, strict=True)]).astype(np.float32)


def histogram_match(image: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map the in-mask intensities of `image` onto the distribution `reference`; 0 outside."""
    if not mask.any():
        raise InputError("histogram matching: the brain mask is empty")
    out = np.zeros(image.shape, np.float32)
    out[mask] = match_histograms(image[mask], reference)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.histmatch", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--reference-images", nargs="+", required=True, help="the target site's preprocessed training scans")
    p.add_argument("--reference-masks", nargs="+", required=True)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    try:
        if len(a.reference_images) != len(a.reference_masks):
            raise InputError(f"--reference-images ({len(a.reference_images)}) and --reference-masks "
                             f"({len(a.reference_masks)}) must pair up")
        img = load_image(a.input)
        mask = load_mask(a.mask, like=img)
        refs, ref_masks = [], []
        for ri, rm in zip(a.reference_images, a.reference_masks):
            r = load_image(ri)
            refs.append(np.asarray(r.dataobj, np.float32))
            ref_masks.append(load_mask(rm, like=r))
        out = histogram_match(np.asarray(img.dataobj, np.float32), mask, reference_distribution(refs, ref_masks))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_image(out, img.affine, a.output, header=img.header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
