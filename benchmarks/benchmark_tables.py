"""The questions users ask of a harmonizer, per method, from one run's tables (`make benchmark`).

    python benchmarks/benchmark_tables.py benchmark-run/results > benchmarks/benchmark.md

Reads results/tables/{truth_summary,truth_ratios,biological_effect,target_pull,site_classifier,icc}.csv
(the evaluation's tissue fractions, the first target) and writes one markdown page: a per-method
table (truth SSIM / MAE, GM ratio error, site accuracy against chance, ICC, detail), the planted age
effect with its interval per method next to the truth, and the pull toward the target's training
subjects.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from harmodiff.tables import markdown_table  # noqa: E402

MAIN = ["preprocessed", "diffusion", "histmatch", "combat"]


def _interval(row, value="estimate", digits=3) -> str:
    if pd.isna(row[value]):
        return "n/a"
    if pd.isna(row["ci_low"]):
        return f"{row[value]:.{digits}f}"
    return f"{row[value]:.{digits}f} [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"


def per_method(tables: Path) -> pd.DataFrame:
    summary = pd.read_csv(tables / "truth_summary.csv").drop_duplicates("method").set_index("method")
    ratios = pd.read_csv(tables / "truth_ratios.csv")
    ratios = ratios[ratios.fractions == "posterior"].drop_duplicates(["method", "tissue"]).set_index(
        ["method", "tissue"])
    classifier = pd.read_csv(tables / "site_classifier.csv").drop_duplicates("method").set_index("method")
    icc = pd.read_csv(tables / "icc.csv").drop_duplicates(["method", "tissue"]).set_index(["method", "tissue"])
    rows = []
    for m in MAIN:
        row = {"method": m}
        if m in summary.index:
            row.update(ssim=summary.at[m, "ssim_mean"], mae=summary.at[m, "mae_mean"],
                       gradient_r=summary.at[m, "gradient_r_mean"], detail_ratio=summary.at[m, "detail_ratio_mean"])
        row.update(gm_ratio_mae=ratios.at[(m, "GM"), "mae"], gm_mae_vs_target=ratios.at[(m, "GM"), "mae_vs_target"])
        if m in classifier.index:
            row.update(site_accuracy=classifier.at[m, "site_accuracy"], chance=classifier.at[m, "chance"])
        row.update(icc_gm=icc.at[(m, "GM"), "icc"], icc_wm=icc.at[(m, "WM"), "icc"])
        rows.append(row)
    return pd.DataFrame(rows)


def effects(tables: Path) -> pd.DataFrame:
    t = pd.read_csv(tables / "biological_effect.csv")
    t = t[t.method.isin(["truth", "ideal", *MAIN, "combat_study", "combat_study_age"])].drop_duplicates(["method", "tissue"])
    return pd.DataFrame({"method": t.method, "tissue": t.tissue, "n": t.n_subjects,
                         "age effect per decade [95% CI]": [_interval(r, digits=4) for _, r in t.iterrows()],
                         "true": t.true_effect.round(4), "CI covers truth": t.ci_covers_truth,
                         "note": t.note.astype(object).fillna("")})


def pull(tables: Path) -> pd.DataFrame:
    t = pd.read_csv(tables / "target_pull.csv")
    t = t[t.method.isin(MAIN)].drop_duplicates(["method", "tissue"])
    return pd.DataFrame({"method": t.method, "tissue": t.tissue, "n": t.n_subjects,
                         "pull [95% CI]": [_interval(r, "pull") for _, r in t.iterrows()],
                         "target's training subjects": t.target_training_subjects})


def main(results: str) -> None:
    tables = Path(results) / "tables"
    print(f"# Benchmark: the questions users ask of a harmonizer\n\n`make benchmark` (tables of "
          f"{tables}; `python benchmarks/benchmark_tables.py {results}`).\n")
    print("## Per method\n\nTruth SSIM / MAE against each traveling subject rendered at the target; GM ratio MAE "
          "against the true ratio and against the segmented truth at the target; held-out-subject site "
          "accuracy (goal: chance); ICC(2,1) of the ratios across sites; gradient r and detail ratio (1: the "
          "truth's fine detail).\n")
    print(markdown_table(per_method(tables)) + "\n")
    print("## The planted age effect\n\nOne scan per traveling subject at its study site (site and age partly "
          "confounded); slope of the ratio on age per decade, 95 % CI, next to the true slope. `ideal`: "
          "the same slope on each subject's truth rendered at the target and segmented alike (what the "
          "segmentation lets a perfect harmonizer keep).\n")
    print(markdown_table(effects(tables)) + "\n")
    print("## Pull toward the target's training subjects\n\nSlope of the harmonized ratio's error on the "
          "distance to the target's training subjects' mean ratio (0: none, 1: replaced).\n")
    print(markdown_table(pull(tables)))


if __name__ == "__main__":
    main(sys.argv[1])
