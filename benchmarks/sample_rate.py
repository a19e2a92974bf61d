"""Training samples per second at 1 mm (the paper's grid) for several DataLoader worker counts,
against the rate a GPU training step needs.

    python benchmarks/sample_rate.py [--workers 0 1 2 8] [--batches N] > benchmarks/sample_rate.md

Needs the demo's preprocessed training scans (`snakemake --until anatomy`); they are resampled to
the paper's 1 mm grid (160x192x160, trilinear) so each sample costs what it costs on real data:
one or two spatial transforms of the whole volume (TorchIO), a contrast level, the anatomy map
and its coarse version, an 80x96x80 patch. Settings from config/srpbs.yaml (9 contrast levels,
spatial augmentation on), batch 5.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy import ndimage

from harmodiff import train as tr
from harmodiff.tables import markdown_table

PAPER_STEP_TFLOP = 3 * 5 * 20.17  # forward + backward ~ 3 forward passes, batch 5 (benchmarks/model_cost.md)
PEAK_TFLOPS = 790.0               # H200 bf16 dense


def one_mm(volume: tr.Volume, shape=(160, 192, 160)) -> tr.Volume:
    zoom = [n / s for n, s in zip(shape, volume.image.shape)]
    image = ndimage.zoom(volume.image, zoom, order=1).astype(np.float32)
    mask = ndimage.zoom(volume.mask.astype(np.float32), zoom, order=1) > 0.5
    return tr.Volume(np.where(mask, image, 0), mask, volume.site)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default="results")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=6)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    sheet = pd.read_csv(Path(a.results) / "synthetic/scans.tsv", sep="\t")
    train_rows = sheet[sheet.cohort == "train"]
    pre = Path(a.results) / "preprocessed/train"
    volumes = [one_mm(v) for v in tr.load_volumes([pre / f"{r.site}/{r.scan_id}.nii.gz" for r in train_rows.itertuples()],
                                                   [pre / f"{r.site}/{r.scan_id}_mask.nii.gz" for r in train_rows.itertuples()],
                                                   list(train_rows.site))]
    srpbs = yaml.safe_load(Path("config/srpbs.yaml").read_text())
    settings = {k: v for k, v in srpbs["train"].items() if k not in ("run", "threads")}
    rows = []
    for workers in a.workers:
        cfg = tr.TrainConfig.from_dict({**settings, "workers": workers, "batch_size": 5})
        stream = tr.batches(tr.SampleSpec.of(volumes, cfg, (80, 96, 80), srpbs["anatomy"]), 0, a.batches + 1, range(5))
        next(stream)  # worker start-up and the first batch are not the steady rate
        t0 = time.perf_counter()
        for _ in range(a.batches):
            next(stream)
        rate = 5 * a.batches / (time.perf_counter() - t0)
        rows.append({"workers": workers, "samples / s": rate})
    need = 5 / (PAPER_STEP_TFLOP / PEAK_TFLOPS)
    print("# Training samples per second at 1 mm (160x192x160, 80x96x80 patches, config/srpbs.yaml augmentation)\n")
    print(f"Command: `python benchmarks/sample_rate.py --workers {' '.join(map(str, a.workers))} --batches {a.batches}` "
          f"after `snakemake --until anatomy`. This machine: {os.cpu_count()} cores; 1 torch thread per process.\n")
    print(markdown_table(pd.DataFrame(rows)))
    print(f"\nA paper-size training step (batch 5, {PAPER_STEP_TFLOP:.0f} TFLOP) takes at least "
          f"{PAPER_STEP_TFLOP / PEAK_TFLOPS:.2f} s at the H200's {PEAK_TFLOPS:.0f} TFLOP/s bf16 peak, so the GPU "
          f"needs at most **{need:.1f} samples/s** (at a realistic 40 % of peak: {0.4 * need:.1f}).")


if __name__ == "__main__":
    main()
