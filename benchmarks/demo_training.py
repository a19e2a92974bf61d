"""Demo-model training options, scored against the synthetic truth at the target site.

Trains the demo's U-Net on the demo cohort's preprocessed training scans (run the workflow up to
preprocessing first: `snakemake --until anatomy truth_target_image`) with one set of overrides of
`config/config.yaml`'s model/train sections, harmonizes a few test scans to the target, and scores
each against the subject rendered noise-free at the target (`metrics.truth_scores`: SSIM, PSNR,
MAE inside the true brain). One row per (option, harmonization setting) is appended to
`benchmarks/demo_training.csv`; `--table` rewrites `benchmarks/demo_training.md` from it.

    python benchmarks/demo_training.py --name x0-full --steps 800
    python benchmarks/demo_training.py --name x0-crop24-b8 --steps 800 \
        --train '{"crop_shape": [24, 24, 24], "batch_size": 8}' --model '{"self_attention": false}'
    python benchmarks/demo_training.py --table

CPU minutes are the training's own wall time (from loss.csv), on whatever cores it had.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "demo_training.csv"
FIELDS = ["name", "steps", "minutes", "final_loss", "setting", "scans", "ssim", "psnr", "mae"]
# label: (start_from, strength, DDIM schedule length); "source-0.5x20" enters a 20-step schedule half way
SETTINGS = {"source-0.5": ("source", 0.5, 10), "source-0.3": ("source", 0.3, 10),
            "source-0.7": ("source", 0.7, 10), "source-0.5x20": ("source", 0.5, 20),
            "noise-10": ("noise", 1.0, 10), "noise-20": ("noise", 1.0, 20),
            "source-0.5+match": ("source", 0.5, 10)}  # + the authors' per-patch mean/sd matching


def load_scan(path):
    from harmodiff.io import load_image, load_mask

    img = load_image(path)
    mask = load_mask(str(path).replace(".nii.gz", "_mask.nii.gz"), like=img)
    return img, np.asarray(img.dataobj, np.float32), mask


def score(image, mask, img, subject, target, results):
    from harmodiff.metrics import truth_on_grid, truth_scores

    truth_dir = results / "synthetic" / "truth"
    tm = truth_on_grid(truth_dir / "subjects" / f"{subject}_mask.nii.gz", img) > 0.5
    t = truth_on_grid(truth_dir / "at_site" / target / f"{subject}.nii.gz", img, tm)
    return truth_scores(image, mask, t, tm)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name")
    p.add_argument("--checkpoint", help="score this checkpoint (no training); --name labels the row")
    p.add_argument("--loss", help="with --checkpoint: its loss.csv (default: beside it)")
    p.add_argument("--steps", type=int)
    p.add_argument("--train", default="{}", help="JSON overrides of the train section")
    p.add_argument("--model", default="{}", help="JSON overrides of the model section")
    p.add_argument("--scans", nargs="+", default=["sub-ts01_ses-TSB", "sub-ts02_ses-TSC"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--target", default="TRA")
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--workdir", default="/tmp/demo_training")
    p.add_argument("--reuse", action="store_true", help="score an already trained checkpoint again")
    p.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    p.add_argument("--source-row", action="store_true", help="add the scores of the unharmonized scans")
    a = p.parse_args(argv)
    if a.table:
        return write_table()
    if a.source_row:
        return source_row(a)
    from harmodiff import harmonize as hz
    from harmodiff.config import HarmonizeConfig
    from harmodiff import model as md
    from harmodiff import train as tr
    from harmodiff.model import ModelConfig
    from harmodiff.scans import read_scan_sheet

    torch.set_num_threads(2)
    results = Path(a.results)
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    model_cfg = {**config["model"], **json.loads(a.model)}
    train_cfg = {k: v for k, v in config["train"].items() if k not in ("run", "threads")}
    train_cfg.update(json.loads(a.train))
    if a.steps:
        train_cfg["steps"] = a.steps
    out = Path(a.workdir) / a.name
    sheet = read_scan_sheet(results / "synthetic" / "scans.tsv", check_files=False)
    pre = results / "preprocessed"
    checkpoint = Path(a.checkpoint) if a.checkpoint else out / tr.CHECKPOINT
    loss_csv = Path(a.loss) if a.loss else checkpoint.parent / "loss.csv"
    if a.checkpoint:
        out.mkdir(parents=True, exist_ok=True)
    elif not a.reuse:
        train_rows = sheet[sheet["cohort"] == "train"]
        volumes = [tr.Volume(*load_scan(pre / "train" / r.site / f"{r.scan_id}.nii.gz")[1:], r.site, r.scan_id)
                   for r in train_rows.itertuples()]
        tr.train(volumes, out, model_cfg=ModelConfig.from_dict(model_cfg), cfg=tr.TrainConfig.from_dict(train_cfg),
                 patch_shape=config["grid"]["patch_shape"], anatomy_cfg=config["anatomy"], progress=False)
    with open(loss_csv) as f:
        rows = list(csv.DictReader(f))
    minutes = float(rows[-1]["seconds"]) / 60
    final_loss = float(np.mean([float(r["loss"]) for r in rows[-50:]]))
    model, record = md.load_model_for_inference(checkpoint)
    record = replace(record, config={**record.config, "patch_shape": config["grid"]["patch_shape"]})
    for label in a.settings:
        start_from, strength, steps = SETTINGS[label]
        scores = []
        t0 = time.perf_counter()
        for scan in a.scans:
            r = sheet[sheet["scan_id"] == scan].iloc[0]
            img, image, mask = load_scan(pre / "test" / r.site / f"{scan}.nii.gz")
            settings = HarmonizeConfig(guidance="cfgpp", scale=0.6, steps=steps, batch_size=2, start_from=start_from,
                                       strength=strength, match_source_stats=label.endswith("+match"))
            harmonized, _ = hz.harmonize_array(model, record, image, mask, a.target, settings,
                                               seed=hz.scan_seed(0, scan))
            np.save(out / f"{scan}_{label}.npy", harmonized)
            scores.append(score(harmonized, mask, img, r.subject, a.target, results))
        row = {"name": a.name, "steps": rows[-1]["step"], "minutes": f"{minutes:.1f}",
               "final_loss": f"{final_loss:.4f}", "setting": label, "scans": len(a.scans),
               **{k: f"{np.mean([s[k] for s in scores]):.3f}" for k in ("ssim", "psnr", "mae")}}
        print(row, f"({time.perf_counter() - t0:.0f} s)", flush=True)
        append_row(row)
    return write_table()


def append_row(row: dict) -> None:
    new = not CSV.is_file()
    with open(CSV, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def source_row(a) -> int:
    from harmodiff.scans import read_scan_sheet

    results = Path(a.results)
    sheet = read_scan_sheet(results / "synthetic" / "scans.tsv", check_files=False)
    scores = []
    for scan in a.scans:
        r = sheet[sheet["scan_id"] == scan].iloc[0]
        img, image, mask = load_scan(results / "preprocessed" / "test" / r.site / f"{scan}.nii.gz")
        scores.append(score(image, mask, img, r.subject, a.target, results))
    append_row({"name": "no harmonization (preprocessed)", "steps": 0, "minutes": "0", "final_loss": "",
                "setting": "-", "scans": len(a.scans),
                **{k: f"{np.mean([s[k] for s in scores]):.3f}" for k in ("ssim", "psnr", "mae")}})
    return write_table()


def write_table() -> int:
    if not CSV.is_file():
        print(f"{CSV}: no rows yet", file=sys.stderr)
        return 1
    with open(CSV) as f:
        rows = list(csv.DictReader(f))
    lines = ["| option | steps | train min | loss (last 50) | harmonization | scans | SSIM | PSNR | MAE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['steps']} | {r['minutes']} | {r['final_loss']} | {r['setting']} | "
                     f"{r['scans']} | {r['ssim']} | {r['psnr']} | {r['mae']} |")
    md = ROOT / "benchmarks" / "demo_training.md"
    head = md.read_text().split("<!-- table -->")[0] if md.is_file() else "# Demo-model training options\n\n"
    md.write_text(head + "<!-- table -->\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
