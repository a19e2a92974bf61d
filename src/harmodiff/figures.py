"""Tables and figures of the evaluation (the paper's Table 1, Figure 2, Figure 3; loss curve).

    python -m harmodiff.figures table1 --pairs similarity_pairs.csv --sweep-methods cfg_2 cfgpp_0.6 ... \
        --sweep-subjects S1 ... --output-csv table1.csv --output-md table1.md
    python -m harmodiff.figures figure2 --images ... --methods ... --sites ... --subject S --output F.png [F.pdf]
    python -m harmodiff.figures figure3 --ratios tissue_ratios.csv --ttests ttests.csv --reference SITE \
        --output F.png [F.pdf]
    python -m harmodiff.figures loss --loss loss.csv --output F.png [F.pdf]

Each figure is written in every format named by --output (by suffix), atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from harmodiff.evaluate import markdown_table
from harmodiff.io import InputError, atomic_path, check_outputs_or_exit, load_image, write_text, one_line_errors
from harmodiff.metrics import DATA_RANGE, summarize
from harmodiff.plotting import plot_loss
from harmodiff.layout import add_list_options, parse_sweep_method, resolve_lists

GUIDANCE_LABELS = {"none": "no guidance", "cfg": "CFG w", "cfgpp": "CFG++ lambda"}


SEED_SUFFIX = r"_seed\d+$"  # the main harmonization under another run seed (evaluation.guidance_sweep.seeds)


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


def _save(fig, outputs) -> None:
    for out in outputs:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=Path(out).suffix.lstrip("."), dpi=110, bbox_inches="tight")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure2(images: list[str], methods: list[str], sites: list[str], subject: str, outputs) -> None:
    """Central axial slice of one subject at two sites, one row per method, plus their difference.

    `methods` are row labels, `method` or `method:target`."""
    plt = _plt()
    order = list(dict.fromkeys(methods))
    two = list(dict.fromkeys(sites))[:2]  # evaluation.figure_sites, in the order given (the paper: ATV, KUS)
    if len(two) < 2:
        raise InputError(f"figure 2: subject {subject} needs scans from two sites, got {two}")
    lookup = {(m, s): p for p, m, s in zip(images, methods, sites, strict=True)}
    fig, axes = plt.subplots(len(order), 3, figsize=(7.5, 2.6 * len(order)), squeeze=False)
    for i, method in enumerate(order):
        vols = [np.asarray(load_image(lookup[(method, s)]).dataobj, np.float32) for s in two]
        z = vols[0].shape[2] // 2
        slices = [np.rot90(v[:, :, z]) for v in vols]
        for j, (sl, site) in enumerate(zip(slices, two)):
            axes[i, j].imshow(sl, cmap="gray", vmin=0, vmax=DATA_RANGE)
            axes[i, j].set_title(f"{method.replace(':', ' → ')}: {site}", fontsize=9)
        im = axes[i, 2].imshow(slices[1] - slices[0], cmap="RdBu_r", vmin=-DATA_RANGE / 4, vmax=DATA_RANGE / 4)
        axes[i, 2].set_title(f"{two[1]} - {two[0]}", fontsize=9)
        fig.colorbar(im, ax=axes[i, 2], fraction=0.046)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"{subject}, axial slice {z}", fontsize=10)
    _save(fig, outputs)
    plt.close(fig)


def stars(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def figure3(ratios: pd.DataFrame, ttests: pd.DataFrame, reference: str, outputs) -> None:
    """GM and WM ratio per site and method (mean ± sd over subjects); stars: FDR-corrected paired
    t-test of the site against the reference site (* < 0.05, ** < 0.01, *** < 0.001)."""
    plt = _plt()
    ratios = ratios.assign(label=ratios["method"] + np.where(ratios["target"].isin(["none"]), "",
                                                              " → " + ratios["target"].astype(str)))
    labels = list(dict.fromkeys(ratios.sort_values(["method", "target"])["label"]))
    sites = sorted(set(ratios["site"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(labels), 1)
    for ax, tissue in zip(axes, ("gm", "wm")):
        for k, label in enumerate(labels):
            g = ratios[ratios["label"] == label]
            method, target = g["method"].iloc[0], g["target"].iloc[0]
            stats = g.groupby("site")[f"{tissue}_ratio"].agg(["mean", "std"]).reindex(sites)
            x = np.arange(len(sites)) + (k - (len(labels) - 1) / 2) * width
            ax.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0), fmt="o", ms=4, capsize=2, label=label)
            tt = ttests[(ttests["method"] == method) & (ttests["target"].astype(str) == str(target))
                        & (ttests["tissue"] == tissue.upper())].set_index("site")
            for xi, site in zip(x, sites):
                if site in tt.index and stars(float(tt.loc[site, "p_fdr"])):
                    top = stats.loc[site, "mean"] + (stats.loc[site, "std"] if np.isfinite(stats.loc[site, "std"]) else 0)
                    ax.text(xi, top, stars(float(tt.loc[site, "p_fdr"])), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels([f"{s}\n(ref)" if s == reference else s for s in sites])
        ax.set_ylabel(f"{tissue.upper()} ratio")
        ax.set_title(f"{tissue.upper()} / (GM + WM + CSF)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, outputs)
    plt.close(fig)


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.figures", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t1 = sub.add_parser("table1")
    t1.add_argument("--pairs", required=True)
    t1.add_argument("--sweep-methods", nargs="*", default=[])
    add_list_options(t1, ("subject",), manifest="--sweep-manifest", required=False,
                     options={"subject": "sweep-subjects"})
    t1.add_argument("--output-csv", required=True)
    t1.add_argument("--output-md", required=True)
    f2 = sub.add_parser("figure2")
    add_list_options(f2, ("image", "method", "site"))
    f2.add_argument("--subject", required=True)
    f3 = sub.add_parser("figure3")
    f3.add_argument("--ratios", required=True)
    f3.add_argument("--ttests", required=True)
    f3.add_argument("--reference", required=True)
    lo = sub.add_parser("loss")
    lo.add_argument("--loss", required=True)
    for q in (f2, f3, lo):
        q.add_argument("--output", nargs="+", required=True, help="one path per format (.png, .pdf)")
    a = resolve_lists(p, p.parse_args(argv))
    outputs = [a.output_csv, a.output_md] if a.cmd == "table1" else a.output
    check_outputs_or_exit(outputs, inputs=[getattr(a, n, None) for n in ("pairs", "ratios", "ttests", "loss")])
    if a.cmd == "table1":
        t = table1(pd.read_csv(a.pairs), a.sweep_methods, a.sweep_subjects)
        write_text(t.to_csv(index=False, float_format="%.6g"), a.output_csv)
        write_text(table1_markdown(t), a.output_md)
        print(t.to_string(index=False))
    elif a.cmd == "figure2":
        figure2(a.images, a.methods, a.sites, a.subject, a.output)
    elif a.cmd == "figure3":
        figure3(pd.read_csv(a.ratios), pd.read_csv(a.ttests), a.reference, a.output)
    else:
        rows = pd.read_csv(a.loss).to_dict("records")
        for out in a.output:
            plot_loss(rows, Path(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
