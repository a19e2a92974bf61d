"""Seconds per preprocessing step for one synthetic scan at 1 mm and at 2 mm (working grid and
native voxel size alike), on this machine.

    python benchmarks/preprocess_steps.py --threads 2 > benchmarks/preprocess_steps.md

(The committed table was made before `to_ants` set NIfTI units; ITK's unit warnings, printed
to stdout from C++, were filtered out of it with `grep -v "^Warning: NIftI"`.)
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib

from harmodiff import antsio
from harmodiff import preprocess as pp
from harmodiff.synth import SynthConfig, generate


def run(spacing: float, threads: int, workdir: Path) -> dict:
    cfg = SynthConfig(train_sites=1, train_subjects_per_site=1, test_sites=1, test_subjects=1, seed=0,
                      render_spacing=min(spacing, 1.5), native_spacing=(spacing, spacing))
    sheet = generate(workdir / f"{spacing}", cfg, progress=False)
    raw = nib.load(str(workdir / f"{spacing}" / sheet.path.iloc[0]))
    shape = (160, 192, 160) if spacing == 1.0 else tuple(int(round(s / spacing)) for s in (160, 192, 160))
    t = {}
    t0 = time.perf_counter()
    image = antsio.to_ants(raw)
    mask, initial, _ = pp.skullstrip_ants(image)
    t["skull strip (ants)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    corrected = pp.n4(image, mask)
    t["N4"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    transform = pp.register_to_mni(corrected * mask, spacing=spacing, initial_transform=initial)
    t["affine to MNI"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref, _ = pp.working_reference(spacing, shape)
    moved = pp.resample_to_grid(corrected * mask, transform, ref).numpy()
    moved_mask = pp.resample_to_grid(mask, transform, ref).numpy() > 0.5
    pp.median_normalize(moved, moved_mask)
    t["resample + normalize"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return {"shape": raw.shape, **t}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    antsio.set_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {s: run(s, a.threads, Path(tmp)) for s in (2.0, 1.0)}
    steps = [k for k in rows[2.0] if k != "shape"]
    print(f"# Preprocessing: seconds per step per scan ({platform.processor() or platform.machine()}, "
          f"{a.threads} threads, CPU)\n")
    print(f"Command: `python benchmarks/preprocess_steps.py --threads {a.threads}`\n")
    native = {spacing: "x".join(map(str, rows[spacing]["shape"])) for spacing in (2.0, 1.0)}
    print(f"| step | 2 mm (native {native[2.0]}) | 1 mm (native {native[1.0]}) |")
    print("|---|---:|---:|")
    for k in steps:
        print(f"| {k} | {rows[2.0][k]:.1f} | {rows[1.0][k]:.1f} |")
    print("\nShared 2-core machine: absolute times are indicative; the 1 mm / 2 mm ratio is the stable number.")


if __name__ == "__main__":
    main()
