"""The tiny workflow on a real (one-node, localhost) SLURM through the executor plugin.

The suite's one end-to-end run (conftest `e2e`) goes through SLURM wherever one can run here:
conftest's `slurm` fixture brings it up (`slurm_up.sh` installs Debian's slurm-wlm and munge when
missing, as root, and starts the daemons; they are stopped by pid afterwards) and the run is the
README's cluster command (`snakemake --profile workflow/profiles/slurm`) on config/test.yaml. These
tests check that every job was a SLURM job, that the GPU rules and only they asked for a GPU in the GPU
partition, and that a job of each kind rerun locally (a copy of the run with those outputs deleted)
gives what it gave on the cluster.
"""

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, snakemake

GPU_RULES = {"train", "harmonize", "harmonize_all_settings"}

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_run(slurm, e2e):
    if slurm.failed:
        pytest.fail(slurm.failed)
    if slurm.state is None:
        pytest.skip(slurm.skipped)
    return e2e, (e2e / "snakemake_cluster.log").read_text(), (slurm.state / "log/slurmctld.log").read_text()


def _sbatch_calls(log):
    """rule -> list of sbatch command lines (from the plugin's debug log)."""
    calls = {}
    for line in log.splitlines():
        if "sbatch call:" in line:
            rule = re.search(r"--comment '?rule_([A-Za-z0-9_]+?)(?:_wildcards_[^' ]*)?'?(?:\s|$)", line)
            assert rule, line
            calls.setdefault(rule.group(1), []).append(line)
    return calls


def _job_counts(log: str) -> dict[str, int]:
    """rule -> jobs, from the "Job stats:" table Snakemake prints."""
    stats = log.split("Job stats:")[1].split("\n\n")[0]
    return {p[0]: int(p[1]) for p in (line.split() for line in stats.splitlines()[3:]) if len(p) == 2 and p[1].isdigit()}


def test_every_job_ran_as_a_slurm_job(cluster_run):
    wd, log, ctld = cluster_run
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    counts = _job_counts(log)
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


def _load(path):
    return np.asarray(nib.load(path).dataobj, np.float64)


X, Y = "sub-ts01_ses-TSA", "sub-ts02_ses-TSB"  # the sweep subject's scan (harmonize_all_settings), another's
RERUN = {  # a job of each kind: the file that names it -> how its output compares with the cluster's
    f"results/anatomy/test/TSB/{Y}_A.nii.gz": "equal",
    f"results/anatomy/test/TSB/{Y}_Acoarse.nii.gz": "equal",
    "results/model/diffusion/checkpoint.pt": "loss",
    f"results/harmonized/diffusion/TRA/TSB/{Y}.nii.gz": "close",
    f"results/harmonized/diffusion/TRA/TSA/{X}.nii.gz": "close",
    f"results/sweep/cfg_1/TRA/TSA/{X}.nii.gz": "close",
    f"results/seeds/1/TRA/TSA/{X}.nii.gz": "close",
    f"results/segmentation/diffusion/TRA/TSA/{X}_volumes.json": "ratios",
    "results/tables/leakage.csv": "table",
}


def test_jobs_rerun_locally_give_the_cluster_results(cluster_run, tmp_path):
    """Anatomy maps byte-equal (plain numpy; preprocessing's byte-identity across runs is
    tests/test_preprocess.py's, at a third of the cost), the training loss and harmonized images
    equal within float tolerance, tissue ratios (multi-threaded Atropos) within 0.005, a table (the
    leakage check, over the rerun anatomy map) equal; and only those jobs ran."""
    wd, _, _ = cluster_run
    local = tmp_path / "local"
    shutil.copytree(wd, local, symlinks=True)
    for rel in RERUN:
        (local / rel).unlink()
    proc = snakemake(local, *RERUN, "--cores", "2", "--configfile", str(ROOT / "config/test.yaml"))
    ran = _job_counts(proc.stdout + proc.stderr)
    assert ran == {"anatomy": 1, "train": 1, "harmonize": 1, "harmonize_all_settings": 1, "segment": 1,
                   "leakage": 1, "total": 6}, ran
    for rel, how in RERUN.items():
        ours, theirs = local / rel, wd / rel
        if how == "equal":
            np.testing.assert_array_equal(_load(ours), _load(theirs), err_msg=rel)
        elif how == "close":
            np.testing.assert_allclose(_load(ours), _load(theirs), rtol=1e-4, atol=0.05, err_msg=rel)
        elif how == "loss":
            loss = [pd.read_csv(d / "results/model/diffusion/loss.csv").drop(columns="seconds") for d in (local, wd)]
            pd.testing.assert_frame_equal(*loss, rtol=1e-5)
        elif how == "ratios":
            a, b = (json.loads(f.read_text()) for f in (ours, theirs))
            for tissue in ("gm_ratio", "wm_ratio", "csf_ratio"):
                assert a[tissue] == pytest.approx(b[tissue], abs=0.005), (rel, tissue)
        else:
            pd.testing.assert_frame_equal(pd.read_csv(ours), pd.read_csv(theirs))
