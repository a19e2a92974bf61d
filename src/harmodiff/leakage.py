"""How much site information is left in an image: a cross-validated site classifier.

    python -m harmodiff.leakage anatomy --manifest LEAKAGE.tsv --folds 3 --output leakage.csv
    python -m harmodiff.leakage harmonized --manifest SIMILARITY.tsv --output site_classifier.csv

A standardized logistic regression (scikit-learn) predicts the site of each scan from an intensity
histogram inside the brain. `anatomy`: from the preprocessed image and from the anatomical map A
(the paper's stated limitation): site accuracy from A well above chance means A still carries
site cues the diffusion model could exploit. `harmonized`: from each method's images of the
traveling subjects, one subject's scans held out at a time (the classifier never saw the subject it
is asked about): a harmonizer's goal is chance.
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


def held_out_subject_accuracy(features: np.ndarray, sites, subjects, seed: int = 0) -> float:
    """Accuracy of the standardized logistic regression predicting each scan's site, trained on the
    other subjects' scans (leave one subject out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed))
    scores = cross_val_score(clf, features, np.asarray(sites), groups=np.asarray(subjects), cv=LeaveOneGroupOut())
    return float(scores.mean())


def site_classifier_table(entries: pd.DataFrame, loader=None) -> pd.DataFrame:
    """Per method and target (entries: image, mask, method, target, subject, site): how well the site of
    each image is predicted from its brain's intensity histogram, next to chance (the commonest site's
    share). Only groups with two or more subjects seen at two or more sites each are scored (the guidance
    sweep's single subject is not)."""
    def load(image, mask):
        img = load_image(image)
        return np.asarray(img.dataobj, np.float32)[load_mask(mask, like=img)]

    loader = loader or load
    rows = []
    for (method, target), group in entries.groupby(["method", "target"], sort=False):
        per_subject = group.groupby("subject")["site"].nunique()
        group = group[group["subject"].isin(per_subject[per_subject >= 2].index)]
        if group["subject"].nunique() < 2:
            continue
        features = np.array([histogram_features(loader(r.image, r.mask), IMAGE_RANGE) for r in group.itertuples()])
        counts = Counter(group["site"])
        rows.append({"method": method, "target": target, "site_accuracy": held_out_subject_accuracy(
                         features, group["site"], group["subject"]),
                     "chance": max(counts.values()) / len(group), "n_scans": len(group), "n_sites": len(counts),
                     "n_subjects": group["subject"].nunique()})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.leakage", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    anatomy = sub.add_parser("anatomy", help="site from the preprocessed image and from A")
    add_manifest_option(anatomy, ("image", "mask", "anatomy", "site"))
    anatomy.add_argument("--folds", type=int, default=3)
    harmonized = sub.add_parser("harmonized", help="site from each method's images, one subject held out at a time")
    add_manifest_option(harmonized, ("image", "mask", "method", "target", "subject", "site"))
    for q in (anatomy, harmonized):
        q.add_argument("--output", required=True)
    a = p.parse_args(argv)
    scans = a.manifest
    check_outputs_or_exit([a.output], inputs=listed_files(scans))
    if a.cmd == "harmonized":
        table = site_classifier_table(scans)
    else:
        table = leakage_table(list(scans["image"]), list(scans["mask"]), list(scans["anatomy"]), list(scans["site"]),
                              a.folds)
    write_text(table.to_csv(index=False, float_format="%.4f"), a.output)
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
