"""Histogram matching to a target site: the classical image-level baseline.

    python -m harmodiff.histmatch reference --manifest TRA_TRAINING.tsv --output TRA_reference.npy
        (the manifest's columns: image, mask: the target site's preprocessed training scans)
    python -m harmodiff.histmatch match --input PRE.nii.gz --mask MASK.nii.gz --reference TRA_reference.npy \
        --output OUT.nii.gz

The target site's intensity distribution is the pool of its preprocessed training brains, each
contributing the same number of quantiles (so one large scan cannot dominate and memory stays
bounded at 1 mm). scikit-image's `match_histograms` then maps the input brain's intensities
monotonically onto that pool; the background stays 0. The pool is built once per target site
(`reference`) and read by every scan's `match`.
"""

from __future__ import annotations

import argparse

import numpy as np
from skimage.exposure import match_histograms

from harmodiff.io import InputError, atomic_path, check_outputs, load_image, load_mask, save_image, one_line_errors
from harmodiff.manifests import add_manifest_option, listed_files

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


def load_reference(path) -> np.ndarray:
    try:
        reference = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a reference distribution written by `histmatch reference` ({exc})") from None
    if reference.ndim != 1 or reference.size == 0 or not np.isfinite(reference).all():
        raise InputError(f"{path}: a reference distribution must be a non-empty 1-D array of finite values")
    return reference


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.histmatch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference", help="pool the target site's training brains into one distribution (.npy)")
    add_manifest_option(r, ("image", "mask"), help="the target site's preprocessed training scans")
    r.add_argument("--output", required=True)
    m = sub.add_parser("match", help="match one brain's histogram to a reference distribution")
    m.add_argument("--input", required=True)
    m.add_argument("--mask", required=True)
    m.add_argument("--reference", required=True, help="written by `histmatch reference`")
    m.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.command == "reference":
        check_outputs([a.output], inputs=listed_files(a.manifest))
        refs, ref_masks = [], []
        for ri, rm in zip(a.manifest["image"], a.manifest["mask"]):
            img = load_image(ri)
            refs.append(np.asarray(img.dataobj, np.float32))
            ref_masks.append(load_mask(rm, like=img))
        reference = reference_distribution(refs, ref_masks)
        with atomic_path(a.output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, reference)
        return 0
    check_outputs([a.output], inputs=[a.input, a.mask, a.reference])
    img = load_image(a.input)
    mask = load_mask(a.mask, like=img)
    out = histogram_match(np.asarray(img.dataobj, np.float32), mask, load_reference(a.reference))
    save_image(out, img.affine, a.output, header=img.header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
