"""The tiny workflow on a real (one-node, localhost) SLURM through the executor plugin.

`slurm_up.sh` installs Debian's slurm-wlm and munge when missing (root only) and starts the
daemons; the test then runs the README's cluster command (`snakemake --profile
workflow/profiles/slurm`, plus `--slurm-status-command squeue` because this cluster has no
accounting database and `--slurm-init-seconds-before-status-checks 2` because its jobs take
seconds, not hours) on config/test.yaml and checks that every job was a SLURM job, that the GPU
rules and only they asked for a GPU in the GPU partition, and that the results equal the local
run's. The daemons are stopped by pid afterwards.
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
GPU_RULES = {"train", "harmonize", "harmonize_all_settings"}

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if sys.platform != "linux" or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None):
        pytest.skip("needs Linux with SLURM installed or apt-get to install it")
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(HERE / "slurm_up.sh"), str(state)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    try:
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        (state / "timing.json").write_text(json.dumps({"bring_up_s": time.perf_counter() - t0}))
        yield state
    finally:
        subprocess.run(["bash", str(HERE / "slurm_down.sh"), str(state)], capture_output=True, timeout=120)


def _env():
    import os

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def cluster_run(slurm, tmp_path_factory):
    wd = tmp_path_factory.mktemp("cluster")
    # the README's command, with the profile addressed from the repository root
    cmd = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--profile", str(ROOT / "workflow/profiles/slurm"), "--configfile", str(ROOT / "config/test.yaml"),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--verbose"]
    t0 = time.perf_counter()
    proc = subprocess.run(["timeout", "-k", "30", "2400", *cmd], capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (wd / "snakemake_cluster.log").write_text(log)
    timing = json.loads((slurm / "timing.json").read_text())
    timing["cluster_run_s"] = seconds
    (slurm / "timing.json").write_text(json.dumps(timing))
    print(f"cluster timing: {timing}")
    assert proc.returncode == 0, f"rc {proc.returncode}\n{log[-6000:]}\n" + \
        (slurm / "log/slurmctld.log").read_text()[-3000:]
    return wd, log, (slurm / "log/slurmctld.log").read_text()


def _sbatch_calls(log):
    """rule -> list of sbatch command lines (from the plugin's debug log)."""
    calls = {}
    for line in log.splitlines():
        if "sbatch call:" in line:
            rule = re.search(r"--comment '?rule_([A-Za-z0-9_]+?)(?:_wildcards_[^' ]*)?'?(?:\s|$)", line)
            assert rule, line
            calls.setdefault(rule.group(1), []).append(line)
    return calls


def test_every_job_ran_as_a_slurm_job(cluster_run):
    wd, log, ctld = cluster_run
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    stats = log.split("Job stats:")[1].split("\n\n")[0]
    counts = {p[0]: int(p[1]) for p in (line.split() for line in stats.splitlines()[3:]) if len(p) == 2 and p[1].isdigit()}
    # local rules: all runs nothing; manifest and training_settings write a small file inside Snakemake
    n_jobs = counts["total"] - sum(counts.get(rule, 0) for rule in ("all", "manifest", "training_settings", "stage_settings"))
    assert counts.get("manifest", 0) >= 5
    assert len(submitted) == n_jobs > 40
    for _, slurm_id in submitted:  # slurmctld saw each job finish with exit status 0
        assert re.search(rf"JobId={slurm_id} WEXITSTATUS 0", ctld), slurm_id
    assert sum(len(v) for v in _sbatch_calls(log).values()) == n_jobs


def test_gpu_rules_and_only_they_request_a_gpu(cluster_run):
    wd, log, ctld = cluster_run
    calls = _sbatch_calls(log)
    assert GPU_RULES <= set(calls) and len(calls) > len(GPU_RULES)
    for rule, lines in calls.items():
        for line in lines:
            wants_gpu = "--gpus=1" in line or "--gres=gpu" in line
            assert wants_gpu == (rule in GPU_RULES), (rule, line)
            assert ("-p gpu" in line or "--partition gpu" in line or "--partition=gpu" in line) == (rule in GPU_RULES), line
    # and SLURM ran them there: the partition each job started in, from slurmctld's log
    started = dict(re.findall(r"Allocate JobId=(\d+) NodeList=\S+ #CPUs=\d+ Partition=(\w+)", ctld))
    started.update(re.findall(r"Started JobId=(\d+) in (\w+) on", ctld))  # the backfill scheduler's wording
    jobs = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/rule_([A-Za-z0-9_]+)/", log)
    assert jobs and {rule for _, rule in jobs} == set(calls)
    for slurm_id, rule in jobs:
        assert started[slurm_id] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, slurm_id)


def _images(root, stage):
    return sorted(p.relative_to(root) for p in (root / "results" / stage).rglob("*.nii.gz"))


def _load(path):
    return np.asarray(nib.load(path).dataobj, np.float64)


def test_cluster_results_equal_the_local_run(cluster_run, e2e):
    """Same files. Images byte-equal up to the model (preprocessing is single-threaded and
    seeded, so ANTs is reproducible; anatomy maps are plain numpy); training loss and
    harmonized images equal within float tolerance; tissue ratios (multi-threaded Atropos)
    within 0.005."""
    wd, _, _ = cluster_run
    for stage in ("synthetic", "preprocessed", "anatomy", "harmonized", "sweep", "segmentation"):
        assert _images(wd, stage) == _images(e2e, stage), stage
    for stage in ("synthetic", "preprocessed", "anatomy"):
        for rel in _images(wd, stage):
            np.testing.assert_array_equal(_load(wd / rel), _load(e2e / rel), err_msg=str(rel))
    loss = [pd.read_csv(r / "results/model/diffusion/loss.csv").drop(columns="seconds") for r in (wd, e2e)]
    pd.testing.assert_frame_equal(*loss, rtol=1e-5)
    for stage in ("harmonized", "sweep"):
        for rel in _images(wd, stage):
            np.testing.assert_allclose(_load(wd / rel), _load(e2e / rel), rtol=1e-4, atol=0.05, err_msg=str(rel))
    tables = sorted(p.name for p in (e2e / "results/tables").glob("*.csv"))
    assert tables == sorted(p.name for p in (wd / "results/tables").glob("*.csv"))
    ratios = [pd.read_csv(r / "results/tables/tissue_ratios.csv") for r in (wd, e2e)]
    assert (ratios[0][["method", "scan_id"]] == ratios[1][["method", "scan_id"]]).all().all()
    for tissue in ("gm_ratio", "wm_ratio", "csf_ratio"):
        np.testing.assert_allclose(ratios[0][tissue], ratios[1][tissue], atol=0.005)
