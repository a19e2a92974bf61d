"""How the workflow's DAG build (a dry run) scales with the number of scans, and how long its
longest shell command gets.

    python benchmarks/dag_scale.py [--rows 97 1000 10000] > benchmarks/dag_scale.md

Each cohort is tiny fake files (4^3 voxels: the dry run reads headers only) laid out as the
SRPBS release: `--rows 97` is the traveling-subject set (10 subjects x 10 sites, 3 missing) with
20 training scans; larger row counts add traveling subjects over 10 sites and 20% as many
training scans (so N rows = N test scans + N/5 training scans), with config/srpbs.yaml's full
guidance sweep on the first subject only (`--sweep-subjects`; at 97 rows on all of them,
as config/srpbs.yaml). Wall time and peak memory (of the snakemake process, from getrusage) of
`snakemake -n -p`, and the longest shell command it prints.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from harmodiff.config import HDBET_FILES

ROOT = Path(__file__).resolve().parents[1]
SITES = ["ATV", "COI", "HKH", "HUH", "KPM", "KUS", "KUT", "SWA", "UTO", "YC2"]
MISSING = {("sub-03", "UTO"), ("sub-07", "HKH"), ("sub-09", "SWA")}  # 3 scans missing, as in SRPBS


def fake_srpbs(root: Path, test_scans: int = 97, train_scans: int = 20, sweep_subjects: int | None = None) -> Path:
    """An SRPBS-shaped layout of tiny images under root; returns the config file that runs it."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    tiny = root / "tiny.nii.gz"
    nib.save(img, str(tiny))
    release, made, subject = root / "srpbs", 0, 0
    while made < test_scans:
        subject += 1
        for site in SITES:
            sub = f"sub-{subject:02d}"
            if (sub, site) in MISSING or made == test_scans:
                continue
            d = release / f"{sub}/ses-site{site}/anat"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{sub}_ses-site{site}_T1w.nii.gz").symlink_to(tiny)
            made += 1
    rows = [{"scan_id": f"t{k}", "subject": f"t{k}", "site": f"TRAIN{k % 10}", "cohort": "train", "path": str(tiny)}
            for k in range(train_scans)]
    pd.DataFrame(rows).to_csv(root / "train.tsv", sep="\t", index=False)
    cfg = yaml.safe_load((ROOT / "config/srpbs.yaml").read_text())
    cfg["cohort"]["srpbs"] = {"root": str(release), "training_sheet": str(root / "train.tsv")}
    cfg["target_sites"] = ["TRAIN0"]
    cfg["evaluation"]["guidance_sweep"]["subjects"] = sweep_subjects
    for name in HDBET_FILES:  # skullstrip: hdbet makes the weights the skull strip's inputs
        (root / "hd-bet" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "hd-bet" / name).touch()
    cfg["preprocess"]["hdbet_weights"] = str(root / "hd-bet")
    (root / "srpbs.yaml").write_text(yaml.safe_dump(cfg))
    return root / "srpbs.yaml"


def dry_run(workdir: Path, configfile: Path) -> dict:
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n", "-p",
           "--configfile", str(configfile)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    longest = max((line for line in lines if line.startswith("Shell command:")), key=len)
    jobs = next(int(line.split()[1]) for line in lines if line.startswith("total"))
    return {"seconds": seconds, "peak_mb": max(peak_kb, before) / 1024, "jobs": jobs,
            "longest_line_chars": len(longest), "longest_command": " ".join(longest.removeprefix("Shell command:").split()[:4])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[97, 1000, 10000], help="test scans per cohort")
    p.add_argument("--sweep-subjects", type=int, nargs="+",
                   help="evaluation.guidance_sweep.subjects per cohort (default: all at 97 rows, else 1)")
    a = p.parse_args(argv)
    rows = []
    for k, n in enumerate(a.rows):
        sweep = a.sweep_subjects[k] if a.sweep_subjects else (None if n == 97 else 1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            configfile = fake_srpbs(tmp, n, 20 if n == 97 else n // 5, sweep)
            r = dry_run(tmp / "work", configfile)
            rows.append({"test scans": n, "training scans": 20 if n == 97 else n // 5,
                         "sweep subjects": "all" if sweep is None else sweep, **r})
            print(rows[-1], file=sys.stderr)
    from harmodiff.tables import markdown_table

    print(markdown_table(pd.DataFrame(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
