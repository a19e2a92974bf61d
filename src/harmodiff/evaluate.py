"""Evaluation tables from per-scan segmentations (paper sections 4 and 5).

    python -m harmodiff.evaluate ratios --manifest SEGMENTATIONS.tsv [--combat-reference SITE] --output tissue_ratios.csv
        (the manifest's columns: volumes, method, target, scan_id, subject, site)
    python -m harmodiff.evaluate ttests --ratios tissue_ratios.csv --reference KPM --output ttests.csv
    python -m harmodiff.evaluate icc --ratios tissue_ratios.csv --output icc.csv

`ttests` runs `stats.paired_site_tests` per method, target and tissue (GM, WM); `icc` the traveling
subjects' `stats.traveling_icc`. `ratios` with
`--combat-reference` adds the ComBat baseline: the preprocessed scans' ratios adjusted by
`combat.combat_ratios` (reference site if it is among the scans' sites, else the pooled mean).
`truth_errors` scores every method's ratios against the synthetic cohort's true ratios (its table is
`harmodiff.tables truth`; Table 2 is `harmodiff.tables table2`).
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from harmodiff import stats
from harmodiff.combat import combat_ratios
from harmodiff.io import check_outputs_or_exit, write_table
from harmodiff.manifests import add_manifest_option

TISSUES = ("gm", "wm")
FRACTIONS = ("posterior", "unmix")  # = segment.FRACTIONS (not imported: the stats env has no ANTs stack)


def collect_ratios(segmentations: pd.DataFrame) -> pd.DataFrame:
    """One row per segmentation (its method, target, scan_id, subject, site) with the tissue volumes and
    ratios of its `volumes` file."""
    rows = []
    for r in segmentations.to_dict("records"):
        with open(r["volumes"]) as f:
            v = json.load(f)
        rows.append({k: r[k] for k in ("method", "target", "scan_id", "subject", "site")} | v)
    return pd.DataFrame(rows)


def add_combat(ratios: pd.DataFrame, reference_site: str | None) -> pd.DataFrame:
    """Append method 'combat': ComBat of the preprocessed ratios, target = the reference or 'pooled'."""
    pre = ratios[ratios["method"] == "preprocessed"]
    ref = reference_site if reference_site in set(pre["site"]) else None
    adjusted = combat_ratios(pre, ref).assign(method="combat", target=ref or "pooled")
    # ComBat adjusts the evaluation's ratios only: volumes and the alternative fractions' ratios are not its
    unadjusted = [c for c in adjusted.columns if c.endswith("_ml") or c.startswith(tuple(f"{f}_" for f in FRACTIONS))]
    adjusted[unadjusted] = float("nan")
    return pd.concat([ratios, adjusted], ignore_index=True)


def truth_errors(ratios: pd.DataFrame, truth: pd.DataFrame, target_truth: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method, target, tissue fractions (`FRACTIONS`) and tissue: mean absolute
    error, mean error and correlation vs the true ratios. Where the segmentation wrote every
    fractions method's ratios (`unmix_gm_ratio`, ...), each is scored; otherwise (ComBat) the
    evaluation's ratios, under their `fractions` label.

    `target_truth` (columns subject, target and the segmentation's ratios) holds the ratios the
    same segmentation finds on each subject rendered noise-free at each target site: what a
    perfect harmonization would give. Against it: `mae_vs_target` and `bias_vs_target` (rows whose
    target is not a rendered one, the unharmonized scans and ComBat, use the first target)."""
    m = ratios.merge(truth[["subject"] + [f"{t}_ratio" for t in TISSUES]], on="subject", suffixes=("", "_true"))
    if target_truth is not None and len(target_truth):
        rendered = list(dict.fromkeys(target_truth["target"]))
        m["_truth_target"] = [t if t in rendered else rendered[0] for t in m["target"]]
        m = m.merge(target_truth.rename(columns={"target": "_truth_target"}), on=["subject", "_truth_target"],
                    how="left", suffixes=("", "_at_target"))
    rows = []
    for (method, target), group in m.groupby(["method", "target"], sort=True):
        variants = [(f, f"{f}_") for f in FRACTIONS if f"{f}_gm_ratio" in group and group[f"{f}_gm_ratio"].notna().all()]
        if not variants:
            label = group["fractions"].iloc[0] if "fractions" in group and group["fractions"].notna().all() else ""
            variants = [(label, "")]
        for fractions, prefix in variants:
            for tissue in TISSUES:
                est, true = group[f"{prefix}{tissue}_ratio"], group[f"{tissue}_ratio_true"]
                row = {"method": method, "target": target, "fractions": fractions, "tissue": tissue.upper(),
                       "mae": float((est - true).abs().mean()), "bias": float((est - true).mean()),
                       "r": float(est.corr(true)), "n_scans": len(group)}
                at_target = f"{fractions}_{tissue}_ratio_at_target"
                if at_target in group:
                    row.update(mae_vs_target=float((est - group[at_target]).abs().mean()),
                               bias_vs_target=float((est - group[at_target]).mean()))
                rows.append(row)
    return pd.DataFrame(rows)


def ttests(ratios: pd.DataFrame, reference: str) -> pd.DataFrame:
    out = []
    for (method, target), group in ratios.groupby(["method", "target"], sort=True):
        for tissue in TISSUES:
            res = stats.paired_site_tests(group, reference, value=f"{tissue}_ratio")
            res.insert(0, "tissue", tissue.upper())
            res.insert(0, "target", target)
            res.insert(0, "method", method)
            out.append(res)
    return pd.concat(out, ignore_index=True)


def icc(ratios: pd.DataFrame) -> pd.DataFrame:
    """Per method, target and tissue: how reproducible the ratio is across sites for the same traveling
    subject (`stats.traveling_icc`, ICC(2,1) with its 95 % CI)."""
    rows = [{"method": method, "target": target, "tissue": tissue.upper(),
             **stats.traveling_icc(group, value=f"{tissue}_ratio")}
            for (method, target), group in ratios.groupby(["method", "target"], sort=True) for tissue in TISSUES]
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratios")
    add_manifest_option(r, ("volumes", "method", "target", "scan_id", "subject", "site"))
    r.add_argument("--combat-reference", help="add the ComBat baseline, mapped onto this site when present")
    t = sub.add_parser("ttests")
    t.add_argument("--reference", required=True)
    i = sub.add_parser("icc", help="the traveling subjects' ICC(2,1) of each ratio across sites, per method")
    for q in (t, i):
        q.add_argument("--ratios", required=True)
    for q in (r, t, i):
        q.add_argument("--output", required=True)
    a = p.parse_args(argv)
    check_outputs_or_exit([a.output], inputs=[getattr(a, "ratios", None)])
    if a.cmd == "ratios":
        df = collect_ratios(a.manifest)
        if a.combat_reference:
            df = add_combat(df, a.combat_reference)
    elif a.cmd == "icc":
        df = icc(pd.read_csv(a.ratios))
    else:
        df = ttests(pd.read_csv(a.ratios), a.reference)
    write_table(df, a.output)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
