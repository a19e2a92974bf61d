"""Figures of the evaluation (the paper's Figures 2 and 3, the loss curve, the users' questions); tables: `harmodiff.tables`.

    python -m harmodiff.figures figure2 --manifest FIGURE2.tsv --subject S --output F.png [F.pdf]
        (the manifest's columns: image, method, site)
    python -m harmodiff.figures figure3 --ratios tissue_ratios.csv --ttests ttests.csv --reference SITE \
        --output F.png [F.pdf]
    python -m harmodiff.figures loss --loss loss.csv --output F.png [F.pdf]
    python -m harmodiff.figures questions --effects biological_effect.csv --site-classifier site_classifier.csv \
        --icc icc.csv --output F.png [F.pdf]

Each figure is written in every format named by --output (by suffix), atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from harmodiff.io import InputError, atomic_path, check_outputs_or_exit, load_image, one_line_errors
from harmodiff.metrics import DATA_RANGE
from harmodiff.plotting import plot_loss
from harmodiff.manifests import add_manifest_option

GUIDANCE_LABELS = {"none": "no guidance", "cfg": "CFG w", "cfgpp": "CFG++ lambda"}


def _save(fig, outputs) -> None:
    for out in outputs:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=Path(out).suffix.lstrip("."), dpi=110, bbox_inches="tight")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure2(entries: pd.DataFrame, subject: str, outputs) -> None:
    """Central axial slice of one subject at two sites, one row per method, plus their difference.

    `entries`: image, method (the row label, `method` or `method:target`) and site."""
    plt = _plt()
    order = list(dict.fromkeys(entries["method"]))
    two = list(dict.fromkeys(entries["site"]))[:2]  # evaluation.figure_sites, in the order given (the paper: ATV, KUS)
    if len(two) < 2:
        raise InputError(f"figure 2: subject {subject} needs scans from two sites, got {two}")
    lookup = {(r.method, r.site): r.image for r in entries.itertuples()}
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


def question_panels(effects: pd.DataFrame, classifier: pd.DataFrame, icc: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What the questions figure draws, per method (the first target of each): the GM age effect with its
    interval (and the true effect), the site accuracy (and chance), the ICC of GM and WM."""
    gm = effects[(effects["tissue"] == "GM") & (effects["method"] != "truth")].drop_duplicates("method")
    return {"effect": gm[["method", "estimate", "ci_low", "ci_high", "true_effect"]].reset_index(drop=True),
            "site": classifier.drop_duplicates("method")[["method", "site_accuracy", "chance"]].reset_index(drop=True),
            "icc": icc.drop_duplicates(["method", "tissue"]).pivot(index="method", columns="tissue", values="icc")
            .reset_index()}


def questions_figure(effects: pd.DataFrame, classifier: pd.DataFrame, icc: pd.DataFrame, outputs) -> None:
    """Three questions users ask of a harmonizer, one panel each: is the biology kept (the planted age
    effect on the GM ratio with its 95 % CI, the truth dashed), can a classifier still tell the site
    (chance dashed), are the volumes reproducible across sites (ICC of GM and WM)."""
    plt = _plt()
    panels = question_panels(effects, classifier, icc)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    e = panels["effect"]
    y = np.arange(len(e))
    low = (e["estimate"] - e["ci_low"]).fillna(0).clip(lower=0)
    high = (e["ci_high"] - e["estimate"]).fillna(0).clip(lower=0)
    axes[0].errorbar(e["estimate"], y, xerr=[low, high], fmt="o", capsize=3)
    if len(e):
        axes[0].axvline(e["true_effect"].iloc[0], ls="--", c="k", lw=1, label="true effect")
        axes[0].legend(fontsize=7)
    axes[0].set_yticks(y, e["method"])
    axes[0].set_xlabel("GM ratio change per decade of age")
    axes[0].set_title("biology kept? (study confounded with site)")
    c = panels["site"]
    axes[1].bar(np.arange(len(c)), c["site_accuracy"])
    axes[1].hlines(c["chance"], np.arange(len(c)) - 0.4, np.arange(len(c)) + 0.4, colors="k", linestyles="--",
                   label="chance")
    axes[1].set_xticks(np.arange(len(c)), c["method"], rotation=30, ha="right")
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("held-out-subject site accuracy")
    axes[1].set_title("site still predictable?")
    axes[1].legend(fontsize=7)
    i = panels["icc"]
    for k, tissue in enumerate(("GM", "WM")):
        if tissue in i:
            axes[2].bar(np.arange(len(i)) + (k - 0.5) * 0.4, i[tissue], width=0.4, label=tissue)
    axes[2].set_xticks(np.arange(len(i)), i["method"], rotation=30, ha="right")
    axes[2].set_ylim(min(0.0, float(np.nanmin(i[["GM", "WM"]].to_numpy(float), initial=0.0))), 1)
    axes[2].set_ylabel("ICC(2,1) across sites")
    axes[2].set_title("volumes reproducible?")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, outputs)
    plt.close(fig)


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.figures", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f2 = sub.add_parser("figure2")
    add_manifest_option(f2, ("image", "method", "site"))
    f2.add_argument("--subject", required=True)
    f3 = sub.add_parser("figure3")
    f3.add_argument("--ratios", required=True)
    f3.add_argument("--ttests", required=True)
    f3.add_argument("--reference", required=True)
    lo = sub.add_parser("loss")
    lo.add_argument("--loss", required=True)
    qu = sub.add_parser("questions")
    for name in ("effects", "site-classifier", "icc"):
        qu.add_argument(f"--{name}", required=True)
    for q in (f2, f3, lo, qu):
        q.add_argument("--output", nargs="+", required=True, help="one path per format (.png, .pdf)")
    a = p.parse_args(argv)
    check_outputs_or_exit(a.output, inputs=[getattr(a, n, None) for n in ("ratios", "ttests", "loss", "effects",
                                                                         "site_classifier", "icc")])
    if a.cmd == "figure2":
        figure2(a.manifest, a.subject, a.output)
    elif a.cmd == "questions":
        questions_figure(pd.read_csv(a.effects), pd.read_csv(a.site_classifier), pd.read_csv(a.icc), a.output)
    elif a.cmd == "figure3":
        figure3(pd.read_csv(a.ratios), pd.read_csv(a.ttests), a.reference, a.output)
    else:
        rows = pd.read_csv(a.loss).to_dict("records")
        for out in a.output:
            plot_loss(rows, Path(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
