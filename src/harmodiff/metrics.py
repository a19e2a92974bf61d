"""Image similarity for the evaluation: SSIM and PSNR (scikit-image), across sites and vs truth.

    python -m harmodiff.metrics pairs --manifest SIMILARITY.tsv --output similarity_pairs.csv
        (the manifest's columns: image, mask, method, target, subject, site)
    python -m harmodiff.metrics truth-image --truth T --truth-mask TM --like SCAN --output O --mask-output OM

`pairs` compares the volumes of the same subject from every two sites (per method and target),
as the paper's Table 1 does; `truth_similarity` compares each harmonized scan with the same subject
rendered noise-free at the target site; `preprocessing_scores` scores each preprocessed scan against
its own noise- and bias-free rendering: brain-mask Dice and correlation inside both masks (synthetic
cohort only; their tables are `harmodiff.tables truth`). `truth-image` puts a truth rendering on a
scan's working grid.

Conventions (the paper does not state them): each volume is zero outside its own brain mask;
both are cropped to the bounding box of the union of the two masks, so the empty field of view
does not inflate SSIM; intensities are on the median-normalized scale (brain median 500), and the
data range is fixed at 1000 (twice the median) for every scan, so scores are comparable across
scans and methods. SSIM uses scikit-image's default 7-voxel window.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from harmodiff.io import InputError, check_outputs_or_exit, load_image, load_mask, write_table
from harmodiff.intensity import MEDIAN_TARGET, median_normalize
from harmodiff.manifests import add_manifest_option

DATA_RANGE = 2.0 * MEDIAN_TARGET


def _union_box(mask_a: np.ndarray, mask_b: np.ndarray) -> tuple[slice, ...]:
    union = mask_a | mask_b
    if not union.any():
        raise InputError("similarity: both brain masks are empty")
    return ndimage.find_objects(union.astype(np.int8))[0]


def ssim_psnr(a: np.ndarray, b: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray,
              data_range: float = DATA_RANGE) -> tuple[float, float]:
    """SSIM and PSNR (dB) of two brains on the same grid (see the module's conventions)."""
    if a.shape != b.shape:
        raise InputError(f"similarity: grids differ {a.shape} vs {b.shape}")
    box = _union_box(mask_a, mask_b)
    x = np.where(mask_a, a, 0.0)[box].astype(np.float64)
    y = np.where(mask_b, b, 0.0)[box].astype(np.float64)
    ssim = structural_similarity(x, y, data_range=data_range)
    psnr = peak_signal_noise_ratio(x, y, data_range=data_range)
    return float(ssim), float(psnr)


def best_monotone_map(source: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The source's intensities through the monotone curve that brings them closest to the target inside
    `mask` (least squares; isotonic regression, scikit-learn, fitted on these very voxels): no global
    intensity curve, histogram matching included, gets closer to this target. 0 outside the mask."""
    from sklearn.isotonic import IsotonicRegression

    mask = np.asarray(mask, bool)
    x = np.asarray(source, np.float64)[mask]
    y = np.asarray(target, np.float64)[mask]
    if y.size < 2:
        raise InputError("monotone map: fewer than two voxels inside the mask")
    out = np.zeros(mask.shape, np.float32)
    out[mask] = IsotonicRegression(increasing="auto", out_of_bounds="clip").fit(x, y).predict(x)
    return out


def pairwise_similarity(entries: pd.DataFrame, loader=None) -> pd.DataFrame:
    """SSIM/PSNR for every two sites of each subject, per method and target.

    `entries` has columns method, target, subject, site, image, mask; `loader(path)` returns
    an array (default: nibabel). Returns one row per pair.
    """
    loader = loader or _load_array
    rows = []
    for (method, target, subject), group in entries.groupby(["method", "target", "subject"], sort=True):
        group = group.sort_values("site")
        cache = {r.site: (loader(r.image), loader(r.mask) > 0.5) for r in group.itertuples()}
        for site_a, site_b in itertools.combinations(sorted(cache), 2):
            (a, ma), (b, mb) = cache[site_a], cache[site_b]
            s, p = ssim_psnr(a, b, ma, mb)
            rows.append({"method": method, "target": target, "subject": subject, "site_a": site_a,
                         "site_b": site_b, "ssim": s, "psnr": p})
    return pd.DataFrame(rows, columns=["method", "target", "subject", "site_a", "site_b", "ssim", "psnr"])


def summarize(pairs: pd.DataFrame, keys=("method", "target")) -> pd.DataFrame:
    """Mean and sample sd of SSIM and PSNR over pairs (the paper's mean +- sd)."""
    g = pairs.groupby(list(keys), sort=False)
    out = g.agg(ssim_mean=("ssim", "mean"), ssim_sd=("ssim", "std"), psnr_mean=("psnr", "mean"),
                psnr_sd=("psnr", "std"), pairs=("ssim", "size"), subjects=("subject", "nunique"))
    return out.reset_index()


def truth_on_grid(truth_path, like: nib.Nifti1Image, mask: np.ndarray | None = None) -> np.ndarray:
    """A truth image (any grid in MNI space) resampled onto `like`'s grid; median-normalized in `mask`."""
    t = load_image(truth_path)
    m = np.linalg.inv(t.affine) @ like.affine
    data = ndimage.affine_transform(np.asarray(t.dataobj, np.float32), m[:3, :3], m[:3, 3],
                                    output_shape=like.shape, order=1)
    return median_normalize(data, mask) if mask is not None else data


def detail_scores(image: np.ndarray, truth: np.ndarray, region: np.ndarray) -> dict:
    """How much of the truth's fine detail an image keeps, inside `region` (the true brain less a 2-voxel
    rim, so the brain's edge does not count):

    gradient_r: the correlation of the two gradient magnitudes (Sobel, scipy): 1 when every edge is
    where the truth has it, as strong relative to the others; blur and noise both lower it.
    detail_ratio: the image's share of fine detail over the truth's, each the mean squared Laplacian
    over the mean squared gradient (so a contrast change alone leaves it at 1): below 1 the image is
    smoother than the truth, above 1 it has detail (or noise) the truth lacks."""
    def gradient(v):
        v = np.asarray(v, np.float64)
        return np.sqrt(sum(ndimage.sobel(v, axis=k) ** 2 for k in range(v.ndim)))

    inner = ndimage.binary_erosion(region, iterations=2)
    if inner.sum() < 2:
        raise InputError("detail scores: the brain is too small (nothing left inside a 2-voxel rim)")
    g_image, g_truth = gradient(image)[inner], gradient(truth)[inner]

    def fine_share(v, g):
        return np.mean(ndimage.laplace(np.asarray(v, np.float64))[inner] ** 2) / max(np.mean(g ** 2), 1e-12)

    truth_share = fine_share(truth, g_truth)
    return {"gradient_r": float(np.corrcoef(g_image, g_truth)[0, 1]),
            "detail_ratio": float(fine_share(image, g_image) / truth_share) if truth_share > 0 else float("nan")}


def truth_scores(image: np.ndarray, mask: np.ndarray, truth: np.ndarray, truth_mask: np.ndarray) -> dict:
    """SSIM, PSNR and the mean absolute error inside the true brain (brain-median-500 units) of
    an image against its truth on the same grid, and how much of its detail it keeps (`detail_scores`)."""
    ssim, psnr = ssim_psnr(image, truth, mask, truth_mask)
    masked = np.where(mask, image, 0.0)
    mae = float(np.abs(masked - truth)[truth_mask].mean())
    return {"ssim": ssim, "psnr": psnr, "mae": mae, **detail_scores(masked, truth, truth_mask)}


def truth_similarity(images, masks, truths, truth_masks) -> list[dict]:
    """`truth_scores` of each image against its truth rendering.

    The truth is median-normalized inside the truth mask (as preprocessing normalizes a scan).
    """
    out = []
    for image, mask, truth, truth_mask in zip(images, masks, truths, truth_masks, strict=True):
        img = load_image(image)
        m = load_mask(mask, like=img)
        tm = truth_on_grid(truth_mask, img) > 0.5
        t = truth_on_grid(truth, img, tm)
        out.append(truth_scores(np.asarray(img.dataobj, np.float32), m, t, tm))
    return out


def preprocessing_scores(images, masks, truths, truth_masks) -> list[dict]:
    """Per preprocessed scan: Dice of its brain mask with the true one, and the correlation of the
    image with the scan's noise- and bias-free rendering inside both masks."""
    out = []
    for image, mask, truth, truth_mask in zip(images, masks, truths, truth_masks, strict=True):
        img = load_image(image)
        m = load_mask(mask, like=img)
        tm = truth_on_grid(truth_mask, img) > 0.5
        t = truth_on_grid(truth, img)
        both = m & tm
        data = np.asarray(img.dataobj, np.float32)
        out.append({"dice": float(2 * both.sum() / (m.sum() + tm.sum())),
                    "r": float(np.corrcoef(data[both], t[both])[0, 1]),
                    "median": float(np.median(data[m]))})
    return out


def _load_array(path) -> np.ndarray:
    return np.asarray(load_image(path).dataobj, np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.metrics", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pairs = sub.add_parser("pairs")
    image = sub.add_parser("truth-image", help="a truth rendering on a scan's working grid (median 500) + its mask")
    for name in ("truth", "truth-mask", "like", "output", "mask-output"):
        image.add_argument(f"--{name}", required=True)
    add_manifest_option(pairs, ("image", "mask", "method", "target", "subject", "site"))
    pairs.add_argument("--output", required=True)
    a = p.parse_args(argv)
    check_outputs_or_exit([a.output, getattr(a, "mask_output", None)],
                          inputs=[getattr(a, n, None) for n in ("truth", "truth_mask", "like")])
    try:
        if a.cmd == "truth-image":
            from harmodiff.io import save_image

            like = load_image(a.like)
            mask = truth_on_grid(a.truth_mask, like) > 0.5
            save_image(truth_on_grid(a.truth, like, mask), like.affine, a.output)
            save_image(mask, like.affine, a.mask_output, dtype=np.uint8)
            return 0
        df = pairwise_similarity(a.manifest)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_table(df, a.output)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
