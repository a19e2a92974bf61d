"""How much site information leaks into the anatomical map A (the paper's stated limitation).

A cross-validated logistic regression predicts the site of each scan from an intensity histogram
inside the brain, once from the preprocessed image and once from A. Site accuracy from A well
above chance means A still carries site cues the diffusion model could exploit.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import pandas as pd

from harmodiff.io import check_outputs_or_exit, load_image, load_mask, write_text
from harmodiff.manifests import add_manifest_option, listed_files

HIST_BINS = 32
IMAGE_RANGE = (0.0, 1500.0)  # preprocessed images: brain median 500
ANATOMY_RANGE = (-1.0, 1.0)


def histogram_features(values: np.ndarray, value_range, bins: int = HIST_BINS) -> np.ndarray:
    h, _ = np.histogram(np.clip(values, *value_range), bins=bins, range=value_range)
    return (h / max(h.sum(), 1)).astype(np.float64)


def site_accuracy(features: np.ndarray, sites, folds: int = 3, seed: int = 0) -> tuple[float, int]:
    """Mean stratified-CV accuracy of a standardized logistic regression; returns (acc, folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sites = np.asarray(sites)
    k = int(min(folds, min(Counter(sites).values())))
    if k < 2:
        raise ValueError("leakage: every site needs at least 2 scans for cross-validation")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, features, sites, cv=cv).mean()), k


def leakage_table(images, masks, anatomies, sites, folds: int = 3) -> pd.DataFrame:
    """Site accuracy from image and from A. Sites with a single scan cannot be cross-validated
    and are left out (the table says how many sites and scans were used)."""
    counts = Counter(sites)
    keep = [counts[s] >= 2 for s in sites]
    if sum(keep) < 4 or len({s for s, k in zip(sites, keep) if k}) < 2:
        raise ValueError("leakage: need at least two sites with two or more scans each")
    images, masks, anatomies, sites = ([x for x, k in zip(seq, keep) if k]
                                       for seq in (images, masks, anatomies, sites))
    img_f, ana_f = [], []
    for img_p, mask_p, ana_p in zip(images, masks, anatomies, strict=True):
        img = load_image(img_p)
        mask = load_mask(mask_p, like=img)
        img_f.append(histogram_features(np.asarray(img.dataobj)[mask], IMAGE_RANGE))
        ana_f.append(histogram_features(np.asarray(load_image(ana_p).dataobj)[mask], ANATOMY_RANGE))
    counts = Counter(sites)
    chance = max(counts.values()) / len(sites)  # always guessing the commonest site
    rows = []
    for name, feats in (("image", img_f), ("anatomy_map", ana_f)):
        acc, k = site_accuracy(np.array(feats), sites, folds)
        rows.append({"features": name, "site_accuracy": acc, "chance": chance,
                     "n_scans": len(sites), "n_sites": len(counts), "folds": k})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.leakage", description=__doc__.split("\n")[0])
    add_manifest_option(p, ("image", "mask", "anatomy", "site"))
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    scans = a.manifest
    check_outputs_or_exit([a.output], inputs=listed_files(scans))
    table = leakage_table(list(scans["image"]), list(scans["mask"]), list(scans["anatomy"]), list(scans["site"]), a.folds)
    write_text(table.to_csv(index=False, float_format="%.4f"), a.output)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
