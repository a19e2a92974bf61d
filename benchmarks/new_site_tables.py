"""A target scanner the shipped demo model never saw, truth-scored, from one run's results (`make new-site`).

    python benchmarks/new_site_tables.py new-site-run/results > benchmarks/new_site.md

Reads results/tables/truth_summary.csv (each method's SSIM / MAE against the traveling subjects rendered
at each target), the learned site's file and its job's benchmark, and scores every image harmonized
to a learned site against the subject's truth at that site and at each training site: if the learned
token were a copy of a training site's, the images would be closest to that site's truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from harmodiff.io import load_mask  # noqa: E402
from harmodiff.metrics import ssim_psnr, truth_on_grid  # noqa: E402
from harmodiff.sites import LearnedSite  # noqa: E402
from harmodiff.tables import markdown_table  # noqa: E402


def per_target(tables: Path) -> pd.DataFrame:
    t = pd.read_csv(tables / "truth_summary.csv")
    t = t[t["method"].isin(["preprocessed", "diffusion", "histmatch"])]  # not the sweep's settings
    return t[["method", "target", "scans", "ssim_mean", "ssim_sd", "mae_mean", "gradient_r_mean",
              "detail_ratio_mean"]].sort_values(["target", "method"])


def closest_truth(results: Path, target: str, methods=("diffusion", "histmatch")) -> pd.DataFrame:
    """Per method harmonized to `target`: mean SSIM of its images against each site's truth of the subject,
    and how many images are closest to the target's own."""
    synthetic = results / "synthetic"
    sheet = pd.read_csv(synthetic / "scans.tsv", sep="\t").set_index("scan_id")
    truth_sites = sorted(p.name for p in (synthetic / "truth/at_site").iterdir())
    rows = []
    for method in methods:
        images = sorted((results / "harmonized" / method / target).rglob("*.nii.gz"))
        if not images:
            continue
        scores = {s: [] for s in truth_sites}
        closest = 0
        for path in images:
            scan = path.name.removesuffix(".nii.gz")
            site, subject = sheet.at[scan, "site"], sheet.at[scan, "subject"]
            img = nib.load(path)
            mask = load_mask(results / "preprocessed/test" / site / f"{scan}_mask.nii.gz", like=img)
            data = np.asarray(img.dataobj, np.float32)
            truth_mask = truth_on_grid(synthetic / f"truth/subjects/{subject}_mask.nii.gz", img) > 0.5
            by_site = {}
            for s in truth_sites:
                truth = truth_on_grid(synthetic / f"truth/at_site/{s}/{subject}.nii.gz", img, truth_mask)
                by_site[s] = ssim_psnr(data, truth, mask, truth_mask)[0]
                scores[s].append(by_site[s])
            closest += max(by_site, key=by_site.get) == target
        rows.append({"method": method, "target": target, "images": len(images),
                     **{f"SSIM vs truth at {s}": float(np.mean(v)) for s, v in scores.items()},
                     "closest to the target's truth": f"{closest}/{len(images)}"})
    return pd.DataFrame(rows)


def main(results: str) -> None:
    results = Path(results)
    sites = sorted((results / "model").glob("*/sites/*.site.pt"))
    print("# A target scanner the model never saw (the demo model, truth-scored)\n")
    print(f"`make new-site` (config/new-site.yaml on top of config/config.yaml; "
          f"`python benchmarks/new_site_tables.py {results}`). The demo cohort plus one new site NSA "
          "(four subjects' target-only scans); the shipped demo model (trained on TRA, TRB, TRC) harmonizes "
          "the nine traveling-subject scans to the training site TRA and to NSA, whose token the `learn_site` "
          "rule fitted to NSA's scans with the network frozen. Scored against each subject rendered "
          "noise-free at the target. `preprocessed` is the unharmonized scan scored against each target's "
          "truth.\n")
    for path in sites:
        site = LearnedSite.load(path)
        bench = results / "benchmarks/learn_site" / path.parents[1].name / f"{site.name}.tsv"  # <run>/sites/
        seconds = float(pd.read_csv(bench, sep="\t")["s"].iloc[0]) if bench.is_file() else float("nan")
        loss = np.asarray(site.loss)
        print(f"Learned site {site.name}: {len(site.scans)} scans, {site.steps} steps, loss "
              f"{loss[:10].mean():.4f} (first 10 steps) -> {loss[-10:].mean():.4f} (last 10), "
              f"{seconds / 60:.1f} min on the run's machine.\n")
    print("## Against the truth at each target\n")
    print(markdown_table(per_target(results / "tables")) + "\n")
    targets = sorted(p.name for p in (results / "harmonized/diffusion").iterdir())
    print("## Is a learned token a copy of a training site's?\n")
    print("Each image harmonized to a target, scored against the same subject rendered noise-free at every "
          "site the cohort renders truth at (mean SSIM inside the brain). A training target's row says how "
          "far the model steers toward its target at all: if its images are not closest to their own "
          "target's truth either, the check cannot tell a learned token from a copy.\n")
    print(markdown_table(pd.concat([closest_truth(results, t) for t in targets], ignore_index=True)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
