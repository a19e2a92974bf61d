"""How far apart the synthetic sites are for a global intensity curve: the two site models compared.

    python benchmarks/site_models.py > benchmarks/site_models.md

For each site model (cohort.synthetic.site_model: contrast, tissue) and cohort seed, one subject is
rendered noise-free at six sites (harmodiff.synth, 1.5 mm) and every ordered pair of sites is scored:
the source site's brain sent through the best monotone intensity curve onto the target site's
(isotonic regression fitted on the target itself: a bound no histogram matching can beat), against
the target. MAE in brain-median-500 units over the brain and over deep gray matter (GM > 0.5 near the
basal ganglia and thalamus ROIs, synth.deep_gm_centres), and SSIM (harmodiff.metrics conventions). The
unharmonized pair (the source as it is) is the baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from harmodiff import synth  # noqa: E402
from harmodiff.intensity import median_normalize  # noqa: E402
from harmodiff.metrics import best_monotone_map, ssim_psnr  # noqa: E402

SEEDS, SITES, SPACING = (0, 1, 2), 6, 1.5


def pair_scores(model: str, seed: int) -> list[dict]:
    cfg = synth.SynthConfig(train_sites=SITES, test_sites=1, seed=seed, render_spacing=SPACING, site_model=model)
    subject = synth.render_subject(cfg, 0)
    brain = subject["brain_mask"]
    deep = (subject["gm"] > 0.5) & (subject["deep_gm"] > 0.9)
    sites = list(synth.all_site_params(cfg).items())[:SITES]
    images = {name: median_normalize(synth.render_site_mni(subject, p, SPACING) * brain, brain) for name, p in sites}
    rows = []
    for source, a in images.items():
        for target, b in images.items():
            if source == target:
                continue
            mapped = best_monotone_map(a, b, brain)
            for method, image in (("unharmonized", a), ("best monotone curve", mapped)):
                error = np.abs(image - b)
                rows.append({"site_model": model, "seed": seed, "source": source, "target": target, "method": method,
                             "mae": float(error[brain].mean()), "mae_deep_gm": float(error[deep].mean()),
                             "ssim": ssim_psnr(image, b, brain, brain)[0]})
    return rows


def main() -> None:
    table = pd.DataFrame([r for model in ("contrast", "tissue") for seed in SEEDS for r in pair_scores(model, seed)])
    summary = table.groupby(["site_model", "method"]).agg(
        pairs=("mae", "size"), mae_median=("mae", "median"), mae_max=("mae", "max"),
        deep_gm_mae_median=("mae_deep_gm", "median"), deep_gm_mae_max=("mae_deep_gm", "max"),
        ssim_median=("ssim", "median"), ssim_min=("ssim", "min")).reset_index()
    print(__doc__.split("\n")[0].strip('"'))
    print(f"\nCommand: `python benchmarks/site_models.py > benchmarks/site_models.md` (seeds {list(SEEDS)}, "
          f"{SITES} sites each, every ordered pair; {SPACING} mm).\n")
    print("| site model | method | pairs | MAE median | MAE max | deep-GM MAE median | deep-GM MAE max | SSIM median "
          "| SSIM min |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in summary.itertuples():
        print(f"| {r.site_model} | {r.method} | {r.pairs} | {r.mae_median:.1f} | {r.mae_max:.1f} | "
              f"{r.deep_gm_mae_median:.1f} | {r.deep_gm_mae_max:.1f} | {r.ssim_median:.3f} | {r.ssim_min:.3f} |")
    worst = table[(table.site_model == "tissue") & (table.method == "best monotone curve")].nlargest(1, "mae").iloc[0]
    print(f"\nThe worst tissue-model pair: seed {worst.seed}, {worst.source} -> {worst.target}: the best monotone curve "
          f"leaves MAE {worst.mae:.1f} (deep GM {worst.mae_deep_gm:.1f}), SSIM {worst.ssim:.3f}.")


if __name__ == "__main__":
    main()
