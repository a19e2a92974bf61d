"""Evaluation tables from per-scan segmentations (paper sections 4 and 5).

    python -m harmodiff.evaluate ratios --volumes V1.json ... --methods M ... --targets T ... \
        --scan-ids S ... --subjects SUB ... --sites SITE ... --output tissue_ratios.csv
    python -m harmodiff.evaluate ttests --ratios tissue_ratios.csv --reference KPM --output ttests.csv
    python -m harmodiff.evaluate mixed --ratios tissue_ratios.csv --output table2.csv

`ttests` runs `stats.paired_site_tests` per method, target and tissue (GM, WM); `mixed` fits
`stats.mixed_model_r2` per method, target and tissue (Table 2 of the paper).
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from harmodiff import stats
from harmodiff.io import write_text

TISSUES = ("gm", "wm")


def collect_ratios(volumes, methods, targets, scan_ids, subjects, sites) -> pd.DataFrame:
    rows = []
    for path, method, target, scan_id, subject, site in zip(volumes, methods, targets, scan_ids, subjects, sites,
                                                            strict=True):
        with open(path) as f:
            v = json.load(f)
        rows.append({"method": method, "target": target, "scan_id": scan_id, "subject": subject, "site": site, **v})
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


def mixed_models(ratios: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, target), group in ratios.groupby(["method", "target"], sort=True):
        for tissue in TISSUES:
            r = stats.mixed_model_r2(group, value=f"{tissue}_ratio")
            rows.append({"method": method, "target": target, "tissue": tissue.upper(),
                         "r2_marginal": r["marginal"], "r2_conditional": r["conditional"],
                         "converged": r["converged"], "warnings": r["warnings"], "n_scans": len(group)})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratios")
    for name in ("volumes", "methods", "targets", "scan-ids", "subjects", "sites"):
        r.add_argument(f"--{name}", nargs="+", required=True)
    t = sub.add_parser("ttests")
    t.add_argument("--reference", required=True)
    m = sub.add_parser("mixed")
    for q in (t, m):
        q.add_argument("--ratios", required=True)
    for q in (r, t, m):
        q.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.cmd == "ratios":
        df = collect_ratios(a.volumes, a.methods, a.targets, a.scan_ids, a.subjects, a.sites)
    elif a.cmd == "ttests":
        df = ttests(pd.read_csv(a.ratios), a.reference)
    else:
        df = mixed_models(pd.read_csv(a.ratios))
    write_text(df.to_csv(index=False, float_format="%.6g"), a.output)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
