"""An SRPBS-shaped cohort through every rule, for real (not a dry run): wall time, job count and
each rule's cost from Snakemake's benchmark files.

    python benchmarks/scale_run.py --workdir scale-run [--subjects 10 --sites 10] > scale-run/scale.md
    (make scale)
    python benchmarks/scale_run.py --workdir scale-run --resume        # continue a stopped run


The cohort is synthetic and shaped like SRPBS's traveling subjects: `--subjects` subjects at
`--sites` test sites with 3 scans missing (sub-ts03 at the 9th site, sub-ts07 at the 3rd,
sub-ts09 at the 8th, as SRPBS misses 3 of 100), plus 10 training sites x 2 subjects. It runs as
a scan sheet (cohort.source: sheet) with config/srpbs.yaml's evaluation (the full Table 1 sweep:
5 CFG + 5 CFG++ settings, seeds 1 and 2) on a coarse 4 mm grid with a tiny model and 2 sampling
steps, so the cost is the workflow's (jobs, manifests, process starts), not the method's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
MISSING = [(3, 9), (7, 3), (9, 8)]  # (subject number, site number), 1-based


def scale_config(sheet: Path, test_sites: list[str]) -> dict:
    cfg = yaml.safe_load((ROOT / "config/srpbs.yaml").read_text())
    cfg["cohort"] = {"source": "sheet", "sheet": str(sheet)}
    cfg["target_sites"] = ["TRA"]
    cfg["grid"] = {"spacing": 4.0, "shape": [40, 48, 40], "patch_shape": [20, 24, 20]}
    # 4 mm scans: the template-based skull strip grows the mask by a voxel or so (up to ~2,500 ml here)
    cfg["preprocess"].update(skullstrip="ants", threads=1, brain_volume_ml=[500.0, 3500.0])
    cfg["model"] = {"channels": [8, 16, 16], "attention_levels": [False, False, True], "num_res_blocks": 1,
                    "num_head_channels": 8, "context_dim": 16, "norm_num_groups": 8, "use_flash_attention": True}
    cfg["train"].update(steps=4, batch_size=1, checkpoint_every=2, threads=1, workers=0, bf16=False, warmup_steps=1,
                        spatial_augmentation=False, contrast_levels=[-0.2, 0.0, 0.2])
    cfg["harmonize"].update(steps=2, start_from="noise", batch_size=16, threads=1, bf16=False)
    cfg["evaluation"].update(segmentation="atropos", reference_site=test_sites[0], figure_subject=None,
                             figure_sites=None)
    return cfg


def build(workdir: Path, subjects: int, sites: int) -> Path:
    from harmodiff.synth import SynthConfig, generate

    cohort = workdir / "cohort"
    synth = SynthConfig(train_sites=10, train_subjects_per_site=2, test_sites=sites, test_subjects=subjects, seed=0,
                        render_spacing=4.0, native_spacing=(3.6, 4.4))
    sheet = generate(cohort, synth, progress=False)
    test_sites = sorted(set(sheet.loc[sheet["cohort"] == "test", "site"]))
    drop = {(f"sub-ts{s:02d}", test_sites[k - 1]) for s, k in MISSING if s <= subjects and k <= sites}
    keep = [(r.subject, r.site) not in drop for r in sheet.itertuples()]
    sheet = sheet[keep].copy()
    sheet["path"] = [str(cohort / p) for p in sheet["path"]]
    sheet[["scan_id", "subject", "site", "cohort", "path"]].to_csv(workdir / "scans.tsv", sep="\t", index=False)
    (workdir / "scale.yaml").write_text(yaml.safe_dump(scale_config(workdir / "scans.tsv", test_sites)))
    return workdir / "scale.yaml"


def rule_costs(workdir: Path) -> pd.DataFrame:
    rows = []
    for tsv in (workdir / "results/benchmarks").rglob("*.tsv"):
        rel = tsv.relative_to(workdir / "results/benchmarks").parts
        b = pd.read_csv(tsv, sep="\t")
        rule = rel[0].removesuffix(".tsv")
        if rule == "harmonize":  # harmonize/{diffusion,all_settings,histmatch}/...
            rule = {"diffusion": "harmonize", "all_settings": "harmonize_all_settings"}.get(
                rel[1], "histmatch_reference" if rel[-1] == "reference.tsv" else rel[1])
        rows.append({"rule": rule, "s": float(b["s"].iloc[0]),
                     "max_rss_mb": pd.to_numeric(b["max_rss"], errors="coerce").iloc[0]})
    df = pd.DataFrame(rows)
    out = df.groupby("rule").agg(jobs=("s", "size"), total_s=("s", "sum"), mean_s=("s", "mean"),
                                 max_s=("s", "max"), peak_rss_mb=("max_rss_mb", "max"))
    return out.sort_values("total_s", ascending=False).reset_index()


def earlier_parts(path: Path, resume: bool) -> list[float]:
    """The numbers a stopped run kept in `path`, one line per part (none for a fresh run)."""
    return [float(x) for x in path.read_text().split()] if resume and path.is_file() else []


def snakemake_cpu_seconds(run: subprocess.Popen, every_s: float = 2.0) -> float:
    """Wait for `run`; the CPU seconds of its own process (user + system, without the jobs it
    starts), as last sampled before it exited."""
    import psutil

    proc, cpu = psutil.Process(run.pid), 0.0
    while run.poll() is None:
        try:
            times = proc.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(every_s)
    return cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--subjects", type=int, default=10)
    p.add_argument("--sites", type=int, default=10)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its finished jobs "
                   "(the cohort is not rendered again: new files would rerun everything)")
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    configfile = a.workdir.resolve() / "scale.yaml"
    if not (a.resume and configfile.is_file() and (a.workdir / "scans.tsv").is_file()):
        configfile = build(a.workdir.resolve(), a.subjects, a.sites)
    built = time.perf_counter() - t0
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    base = [snakemake, "-s", str(ROOT / "Snakefile"), "--directory", str(a.workdir.resolve()),
            "--configfile", str(configfile)]
    if a.resume:  # a stopped run leaves its lock and its half-written outputs
        subprocess.run([*base, "--unlock"], capture_output=True, check=True)
        base.append("--rerun-incomplete")
    dry = subprocess.run([*base, "-n", "-p", "--forceall"], capture_output=True, text=True, check=True)  # every job
    longest = max(len(line) for line in dry.stdout.splitlines() if line.startswith("Shell command:"))
    t1 = time.perf_counter()
    # a stopped run's wall time so far is kept in wall_s.txt, one line per part
    parts, cpu_parts = a.workdir / "wall_s.txt", a.workdir / "snakemake_cpu_s.txt"  # cpu: Snakemake's own
    earlier, earlier_cpu = (earlier_parts(f, a.resume) for f in (parts, cpu_parts))
    with open(a.workdir / "snakemake.log", "a" if a.resume else "w") as log:
        run = subprocess.Popen([*base, "--cores", str(a.cores), "--keep-going"], stdout=log, stderr=subprocess.STDOUT)
        own_cpu = snakemake_cpu_seconds(run)
    for f, values in ((parts, [*earlier, time.perf_counter() - t1]), (cpu_parts, [*earlier_cpu, own_cpu])):
        f.write_text("".join(f"{x:.1f}\n" for x in values))
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, run.args)
    subprocess.run([*base, "--report", "results/report.html"], check=True, capture_output=True)
    wall = sum(earlier) + time.perf_counter() - t1
    own_cpu = sum(earlier_cpu) + own_cpu
    from harmodiff.tables import markdown_table

    costs = rule_costs(a.workdir)
    sheet = pd.read_csv(a.workdir / "scans.tsv", sep="\t")
    n_test = int((sheet["cohort"] == "test").sum())
    print(f"# SRPBS-shaped run: {n_test} traveling-subject scans ({a.subjects} subjects x {a.sites} sites, "
          f"{a.subjects * a.sites - n_test} missing) + {(sheet['cohort'] == 'train').sum()} training scans, "
          f"every rule\n")
    print(f"`python benchmarks/scale_run.py --workdir {a.workdir} --subjects {a.subjects} --sites {a.sites} "
          f"--cores {a.cores}` on {a.cores} CPU cores: cohort rendered in {built:.0f} s; the workflow (through the "
          f"report) in **{wall / 60:.1f} min**, **{int(costs['jobs'].sum())} jobs**; longest shell command "
          f"{longest:,} characters. Snakemake's own process: {own_cpu / 60:.1f} CPU-min "
          f"({own_cpu / max(int(costs['jobs'].sum()), 1):.2f} CPU-s a job).\n")
    print("Per rule, from Snakemake's benchmark files (s: wall seconds of one job; peak RSS of its process):\n")
    print(markdown_table(costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
