"""What `--start-from source` does to harmonization speed and to the evaluation metrics.

    python benchmarks/start_from.py [RESULTS] > benchmarks/start_from.md

Needs a finished `make demo` (RESULTS defaults to results/): its trained model, and the first
traveling subject's preprocessed scans at the first two test sites. Each setting harmonizes both
scans to the first target site (CFG++ lambda 0.6, the demo's 10-step DDIM schedule) and reports
seconds per volume, U-Net passes, SSIM/PSNR between the two sites (Table 1's measure) and SSIM
against the subject rendered noise-free at the target site (the synthetic truth). Runs on CPU;
the paper's setting (50 steps from noise) costs 5x the noise row.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from harmodiff.config import HarmonizeConfig
from harmodiff.tables import markdown_table
from harmodiff.harmonize import harmonize_array
from harmodiff.io import load_image, load_mask
from harmodiff.metrics import ssim_psnr, truth_on_grid
from harmodiff.model import load_model_for_inference

SETTINGS = [("noise", 1.0), ("source", 0.5), ("source", 0.2)]


def main(results="results") -> None:
    results = Path(results)
    torch.set_num_threads(2)
    cfg = yaml.safe_load(Path("config/config.yaml").read_text())
    h = cfg["harmonize"]
    target = cfg["target_sites"][0]
    scans = pd.read_csv(results / "synthetic/scans.tsv", sep="\t")
    test = scans[scans.cohort == "test"]
    subject = sorted(set(test.subject))[0]
    rows = test[test.subject == subject].sort_values("site").iloc[:2]
    model, record = load_model_for_inference(results / f"model/{cfg['train']['run']}/checkpoint.pt")
    images = []
    for r in rows.itertuples():
        img = load_image(results / f"preprocessed/test/{r.site}/{r.scan_id}.nii.gz")
        images.append((img, load_mask(results / f"preprocessed/test/{r.site}/{r.scan_id}_mask.nii.gz", like=img)))
    truth_mask = truth_on_grid(results / f"synthetic/truth/subjects/{subject}_mask.nii.gz", images[0][0]) > 0.5
    truth = truth_on_grid(results / f"synthetic/truth/at_site/{target}/{subject}.nii.gz", images[0][0], truth_mask)
    out_rows = []
    pre = [np.asarray(img.dataobj, np.float32) for img, _ in images]
    s, p = ssim_psnr(pre[0], pre[1], images[0][1], images[1][1])
    vs_truth = np.mean([ssim_psnr(x, truth, m, truth_mask)[0] for x, (_, m) in zip(pre, images)])
    out_rows.append({"start": "preprocessed (no harmonization)", "strength": "", "DDIM steps run": 0,
                     "U-Net passes / volume": 0, "s / volume": 0.0, "SSIM across sites": s,
                     "PSNR across sites": p, "SSIM vs truth at target": vs_truth})
    for start, strength in SETTINGS:
        outs, secs, passes = [], [], 0
        for img, mask in images:
            t0 = time.perf_counter()
            settings = HarmonizeConfig(guidance="cfgpp", scale=0.6, steps=h["steps"], batch_size=h["batch_size"],
                                       seed=h["seed"], start_from=start, strength=strength)
            out, stats = harmonize_array(model, record, np.asarray(img.dataobj, np.float32), mask, target,
                                         settings)
            secs.append(time.perf_counter() - t0)
            passes = stats["unet_passes"]
            outs.append(out)
        s, p = ssim_psnr(outs[0], outs[1], images[0][1], images[1][1])
        vs_truth = np.mean([ssim_psnr(x, truth, m, truth_mask)[0] for x, (_, m) in zip(outs, images)])
        out_rows.append({"start": start, "strength": strength if start == "source" else "",
                         "DDIM steps run": stats["steps"], "U-Net passes / volume": passes,
                         "s / volume": float(np.mean(secs)), "SSIM across sites": s, "PSNR across sites": p,
                         "SSIM vs truth at target": vs_truth})
        print(out_rows[-1], file=sys.stderr, flush=True)
    df = pd.DataFrame(out_rows)
    base = df.loc[df.start == "noise", "s / volume"].iloc[0]
    df["speed-up vs noise"] = [base / v if v else float("nan") for v in df["s / volume"]]
    print(f"# --start-from source: speed and metrics (CPU, 2 threads, {subject} at {', '.join(rows.site)} -> {target})\n")
    print(f"Command: `python benchmarks/start_from.py` after `make demo`. CFG++ lambda 0.6, {h['steps']}-step DDIM "
          f"schedule, batch {h['batch_size']}. Speed-ups are ratios within this run.\n")
    print(markdown_table(df))


if __name__ == "__main__":
    main(*sys.argv[1:])
