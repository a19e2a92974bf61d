"""Snakemake's own CPU on a wide DAG, with and without harmodiff.snakemake_patches.

    python benchmarks/snakemake_scheduler.py [--jobs 400 --sleep 0.5 --cores 4] > benchmarks/snakemake_scheduler.md

A toy workflow shaped like the harmonization fan-out: `--jobs` independent jobs, each reading
three inputs (one shared, like the checkpoint), with a log and a benchmark file, all ready at
once, each sleeping `--sleep` seconds (so the jobs themselves cost almost no CPU and what is
measured is Snakemake's process). It runs twice, from scratch each time: Snakemake as installed,
then with the patch the workflow's Snakefile applies. Reported: wall time, CPU seconds of
Snakemake's own process, and the number of job-selection rounds (from `--verbose`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale_run import snakemake_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]

SNAKEFILE = """
import sys
sys.path.insert(0, {src!r})
from harmodiff.snakemake_patches import coalesce_reevaluation_timers

if config["patched"]:
    coalesce_reevaluation_timers()

rule all:
    input: expand("out/{{i}}.txt", i=range({jobs}))

rule work:
    input: a="in/{{i}}.txt", b="in/{{i}}_b.txt", shared="in/shared.txt"
    output: "out/{{i}}.txt"
    log: "log/{{i}}.log"
    benchmark: "bench/{{i}}.tsv"
    resources: mem_mb=100, runtime=5
    shell: "sleep {sleep}; cat {{input.a}} > {{output}} 2> {{log}}"
"""


def run_once(workdir: Path, patched: bool, cores: int) -> dict:
    for d in ("out", "log", "bench", ".snakemake"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    cmd = [snakemake, "-s", str(workdir / "Snakefile"), "--directory", str(workdir), "--cores", str(cores),
           "--verbose", "--config", f"patched={int(patched)}"]
    t0 = time.perf_counter()
    with open(workdir / "snakemake.log", "w") as log:
        run = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        cpu = snakemake_cpu_seconds(run, every_s=0.5)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(f"snakemake failed, see {workdir / 'snakemake.log'}")
    text = (workdir / "snakemake.log").read_text()
    return {"patched": patched, "wall_s": wall, "snakemake_cpu_s": cpu,
            "selection_rounds": text.count("Resources before job selection"),
            "jobs": text.count("Finished jobid")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--sleep", type=float, default=0.5)
    p.add_argument("--cores", type=int, default=4)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        (wd / "in").mkdir()
        for i in range(a.jobs):
            (wd / f"in/{i}.txt").write_text(f"{i}\n")
            (wd / f"in/{i}_b.txt").write_text(f"{i}\n")
        (wd / "in/shared.txt").write_text("x\n")
        (wd / "Snakefile").write_text(SNAKEFILE.format(src=str(ROOT / "src"), jobs=a.jobs, sleep=a.sleep))
        rows = [run_once(wd, patched, a.cores) for patched in (False, True)]
    print(f"`python benchmarks/snakemake_scheduler.py --jobs {a.jobs} --sleep {a.sleep} --cores {a.cores}`\n")
    print("| Snakemake | jobs | wall s | Snakemake's own CPU s | CPU s a job | selection rounds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'patched' if r['patched'] else 'as installed'} | {r['jobs']} | {r['wall_s']:.1f} | "
              f"{r['snakemake_cpu_s']:.1f} | {r['snakemake_cpu_s'] / max(r['jobs'], 1):.3f} | "
              f"{r['selection_rounds']:,} |")
    base, fixed = rows
    print(f"\nRatio in this run: {base['snakemake_cpu_s'] / max(fixed['snakemake_cpu_s'], 1e-9):.1f}x less CPU, "
          f"{base['selection_rounds'] / max(fixed['selection_rounds'], 1):.1f}x fewer rounds with the patch.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
