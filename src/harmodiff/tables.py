"""The tables the report shows, each built and printed here (paper Tables 1 and 2; the truth scores).

    python -m harmodiff.tables table1 --pairs similarity_pairs.csv --sweep-methods cfg_2 cfgpp_0.6 ... \
        [--sweep-manifest subjects.tsv] --output-csv table1.csv --output-md table1.md
    python -m harmodiff.tables table2 --ratios tissue_ratios.csv --output-csv table2.csv --output-md table2.md
    python -m harmodiff.tables truth --ratios tissue_ratios.csv --truth subjects.tsv \
        --similarity-manifest S.tsv --preprocessing-manifest P.tsv [--target-manifest T.tsv] \
        --output-ratios truth_ratios.csv --output-similarity truth_similarity.csv \
        --output-summary truth_summary.csv --output-summary-md truth_summary.md \
        --output-preprocessing truth_preprocessing.csv

Table 1: SSIM and PSNR across sites (`metrics.pairwise_similarity`), the guidance sweep on its
subjects, then every image method. Table 2: the variance of each tissue ratio explained by site
(`stats.mixed_model_r2`). The truth tables (synthetic cohort): tissue ratio errors
(`evaluate.truth_errors`), SSIM/PSNR/MAE of every harmonized scan against the subject rendered at
the target (`metrics.truth_similarity`) and their summary per method, preprocessing against each
scan's own noise-free rendering (`metrics.preprocessing_scores`).
"""

from __future__ import annotations

import argparse
import io

import pandas as pd

from harmodiff import stats
from harmodiff.evaluate import FRACTIONS, TISSUES, collect_ratios, truth_errors
from harmodiff.io import check_outputs, one_line_errors, table_text, write_table, write_text
from harmodiff.layout import parse_sweep_method
from harmodiff.manifests import add_manifest_option
from harmodiff.metrics import preprocessing_scores, summarize, truth_similarity

GUIDANCE_LABELS = {"none": "no guidance", "cfg": "CFG w", "cfgpp": "CFG++ lambda"}
SEED_SUFFIX = r"_seed\d+$"  # the main harmonization under another run seed (evaluation.guidance_sweep.seeds)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Table 1


def table1(pairs: pd.DataFrame, sweep_methods: list[str], sweep_subjects: list[str]) -> pd.DataFrame:
    """Guidance sweep (on the sweep subjects, with the preprocessed baseline on the same subjects,
    and the main setting's seed replicates `<method>_seed<N>`) followed by every image method on all
    subjects; mean and sd over subject-site pairs."""
    sweep_rows = pairs[pairs["subject"].isin(sweep_subjects)]
    base = summarize(sweep_rows[sweep_rows["method"] == "preprocessed"]).assign(section="guidance sweep")
    sweep = summarize(sweep_rows[sweep_rows["method"].isin(sweep_methods)]).assign(section="guidance sweep")
    if len(sweep):
        parsed = [parse_sweep_method(m) for m in sweep["method"]]
        sweep["guidance"] = [g for g, _ in parsed]
        sweep["scale"] = [s for _, s in parsed]
        sweep = sweep.sort_values(["guidance", "scale"])
    seeded = pairs["method"].str.contains(SEED_SUFFIX, regex=True)
    seeds = summarize(sweep_rows[seeded.loc[sweep_rows.index]]).assign(section="guidance sweep")
    methods = summarize(pairs[~pairs["method"].isin(sweep_methods) & ~seeded]).assign(section="methods")
    out = pd.concat([base, sweep, seeds, methods], ignore_index=True)
    cols = ["section", "method", "target", "guidance", "scale", "ssim_mean", "ssim_sd", "psnr_mean", "psnr_sd",
            "pairs", "subjects"]
    return out.reindex(columns=cols)


def _mean_sd(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if pd.isna(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"  # one pair: no sd


def table1_markdown(t: pd.DataFrame) -> str:
    show = pd.DataFrame({
        "section": t["section"],
        "method": [m if pd.isna(g) else f"{GUIDANCE_LABELS.get(g, g)} = {s:g}"
                   for m, g, s in zip(t["method"], t["guidance"], t["scale"])],
        "target": t["target"],
        "SSIM": [_mean_sd(m, s, 3) for m, s in zip(t["ssim_mean"], t["ssim_sd"])],
        "PSNR (dB)": [_mean_sd(m, s, 2) for m, s in zip(t["psnr_mean"], t["psnr_sd"])],
        "pairs": t["pairs"], "subjects": t["subjects"],
    })
    return ("Table 1: SSIM and PSNR between the volumes of the same subject at two sites, mean ± sd over "
            "subject-site pairs.\n\n" + markdown_table(show))


# ---------------------------------------------------------------------------------------------
# Table 2


def table2(ratios: pd.DataFrame) -> pd.DataFrame:
    """Mixed models ratio ~ site + (1 | subject) per method, target and tissue: marginal and
    conditional R2 (`stats.mixed_model_r2`)."""
    rows = []
    for (method, target), group in ratios.groupby(["method", "target"], sort=True):
        for tissue in TISSUES:
            r = stats.mixed_model_r2(group, value=f"{tissue}_ratio")
            rows.append({"method": method, "target": target, "tissue": tissue.upper(),
                         "r2_marginal": r["marginal"], "r2_conditional": r["conditional"],
                         "converged": r["converged"], "warnings": r["warnings"], "n_scans": len(group)})
    return pd.DataFrame(rows)


def table2_markdown(t: pd.DataFrame) -> str:
    show = t[["method", "target", "tissue", "r2_marginal", "r2_conditional", "converged", "n_scans"]]
    return ("Table 2: variance of the tissue ratios explained by site (marginal R2) and by site "
            "and subject (conditional R2), ratio ~ site + (1 | subject).\n\n" + markdown_table(show))


# ---------------------------------------------------------------------------------------------
# truth (synthetic cohort)


def truth_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """Per method and target: mean (and sd over scans) of SSIM, PSNR and MAE against the truth.

    Methods named `<method>_seed<N>` are the same harmonization under other run seeds: their
    scans' spread over seeds (mean over scans of the per-scan sd across `<method>` and its seed
    replicates) is reported on `<method>`'s row as `ssim_seed_sd` / `mae_seed_sd`, with the number
    of seeds; the replicates get no row of their own."""
    base = scores["method"].str.replace(SEED_SUFFIX, "", regex=True)
    replicated = scores.assign(base=base)
    rows = []
    for (method, target), group in scores[base == scores["method"]].groupby(["method", "target"], sort=False):
        row = {"method": method, "target": target, "scans": len(group),
               "ssim_mean": group["ssim"].mean(), "ssim_sd": group["ssim"].std(),
               "psnr_mean": group["psnr"].mean(), "mae_mean": group["mae"].mean(), "mae_sd": group["mae"].std(),
               "gradient_r_mean": group["gradient_r"].mean(), "detail_ratio_mean": group["detail_ratio"].mean()}
        runs = replicated[(replicated["base"] == method) & (replicated["target"] == target)]
        runs = runs[runs["scan_id"].isin(runs.loc[runs["method"] != method, "scan_id"])]
        if len(runs):
            spread = runs.groupby("scan_id")[["ssim", "mae"]].std()
            row.update(seeds=int(runs.groupby("scan_id").size().max()), seed_scans=len(spread),
                       ssim_seed_sd=spread["ssim"].mean(), mae_seed_sd=spread["mae"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def target_truth_ratios(targets: pd.DataFrame) -> pd.DataFrame:
    """Each subject's tissue ratios rendered noise-free at each target and segmented (the manifest's
    volumes, target, subject): what a perfect harmonization would give. Columns subject, target and
    each fractions method's ratios."""
    ratios = collect_ratios(targets.assign(method="truth", scan_id=targets["subject"], site=targets["target"]))
    keep = ["subject", "target"] + [f"{f}_{t}_ratio" for f in FRACTIONS for t in TISSUES]
    return ratios[[c for c in keep if c in ratios]]


def truth_tables(ratios: pd.DataFrame, truth: pd.DataFrame, similarity: pd.DataFrame, preprocessing: pd.DataFrame,
                 targets: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The synthetic cohort's truth tables from the manifests' rows: `similarity` (image, mask, method,
    target, scan_id, truth, truth_mask), `preprocessing` (image, mask, scan_id, truth, truth_mask) and
    `targets` (volumes, target, subject: each subject rendered noise-free at a target and segmented)."""
    target_truth = target_truth_ratios(targets) if targets is not None and len(targets) else None
    columns = ["image", "mask", "truth", "truth_mask"]
    scores = similarity[["method", "target", "scan_id"]].reset_index(drop=True)
    scores = pd.concat([scores, pd.DataFrame(truth_similarity(*(list(similarity[c]) for c in columns)))], axis=1)
    pre = pd.DataFrame(preprocessing_scores(*(list(preprocessing[c]) for c in columns)))
    pre.insert(0, "scan_id", list(preprocessing["scan_id"]))
    # the summary is of the similarity table as written (6 significant digits), so that it can be
    # recomputed from the published CSV to the last digit
    written = pd.read_csv(io.StringIO(table_text(scores)))
    return {"ratios": truth_errors(ratios, truth, target_truth), "similarity": scores,
            "summary": truth_summary(written), "preprocessing": pre}


# ---------------------------------------------------------------------------------------------
# command line


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.tables", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t1 = sub.add_parser("table1")
    t1.add_argument("--pairs", required=True)
    t1.add_argument("--sweep-methods", nargs="*", default=[])
    add_manifest_option(t1, ("subject",), option="--sweep-manifest", required=False,
                        help="the sweep's subjects (default: every subject)")
    t2 = sub.add_parser("table2")
    t2.add_argument("--ratios", required=True)
    for q in (t1, t2):
        q.add_argument("--output-csv", required=True)
        q.add_argument("--output-md", required=True)
    tr = sub.add_parser("truth")
    for name in ("ratios", "truth"):
        tr.add_argument(f"--{name}", required=True)
    add_manifest_option(tr, ("image", "mask", "method", "target", "scan_id", "truth", "truth_mask"),
                        option="--similarity-manifest", help="each image and the truth it is scored against")
    add_manifest_option(tr, ("image", "mask", "scan_id", "truth", "truth_mask"), option="--preprocessing-manifest",
                        help="each preprocessed scan and its subject's rendering")
    add_manifest_option(tr, ("volumes", "target", "subject"), option="--target-manifest", required=False,
                        help="the truth rendered at each target and segmented")
    for name in ("ratios", "similarity", "summary", "summary-md", "preprocessing"):
        tr.add_argument(f"--output-{name}", required=True)
    a = p.parse_args(argv)
    if a.cmd == "truth":
        outputs = [a.output_ratios, a.output_similarity, a.output_summary, a.output_summary_md, a.output_preprocessing]
        manifests = [a.similarity_manifest, a.preprocessing_manifest, a.target_manifest]
        check_outputs(outputs, inputs=[a.ratios, a.truth, *(m.attrs["path"] for m in manifests if m is not None)])
        tables = truth_tables(pd.read_csv(a.ratios), pd.read_csv(a.truth, sep="\t"), *manifests)
        for name, path in (("ratios", a.output_ratios), ("similarity", a.output_similarity),
                           ("summary", a.output_summary), ("preprocessing", a.output_preprocessing)):
            write_table(tables[name], path)
        write_text(markdown_table(tables["summary"]) + "\n", a.output_summary_md)
        for name, table in tables.items():
            print(f"{name}:\n{table.to_string(index=False)}\n")
        return 0
    check_outputs([a.output_csv, a.output_md], inputs=[getattr(a, "pairs", None), getattr(a, "ratios", None)])
    if a.cmd == "table1":
        subjects = [] if a.sweep_manifest is None else list(a.sweep_manifest["subject"])
        t = table1(pd.read_csv(a.pairs), a.sweep_methods, subjects)
        markdown = table1_markdown(t)
    else:
        t = table2(pd.read_csv(a.ratios))
        markdown = table2_markdown(t)
    write_table(t, a.output_csv)
    write_text(markdown, a.output_md)
    print(t.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
