import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A tiny synthetic cohort (2 train sites x 1 subject, 2 test sites x 1 traveling subject)."""
    from harmodiff.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("cohort")
    cfg = SynthConfig(train_sites=2, train_subjects_per_site=1, test_sites=2, test_subjects=1,
                      seed=7, render_spacing=2.0, native_spacing=(1.8, 2.2))
    generate(out, cfg, progress=False)
    return out, cfg


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(workdir, *args, check=True, timeout=1500):
    cmd = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


CLUSTER = ROOT / "tests/cluster"


@dataclass
class Slurm:
    """The one-node SLURM the end-to-end run goes through (`state`: its folder), or why there is none
    (`skipped`: it cannot run here; `failed`: it should have and did not)."""

    state: Path | None = None
    skipped: str = ""
    failed: str = ""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM on localhost (tests/cluster/slurm_up.sh installs Debian's slurm-wlm and munge
    as root when missing and starts the daemons; slurm_down.sh stops them by pid afterwards).
    HARMODIFF_E2E_EXECUTOR=local skips it."""
    if os.environ.get("HARMODIFF_E2E_EXECUTOR", "auto") == "local":
        yield Slurm(skipped="HARMODIFF_E2E_EXECUTOR=local")
        return
    if sys.platform != "linux" or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None):
        yield Slurm(skipped="needs Linux with SLURM installed or apt-get to install it")
        return
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(CLUSTER / "slurm_up.sh"), str(state)], capture_output=True, text=True,
                          timeout=900)
    try:
        if proc.returncode == 3:
            yield Slurm(skipped=proc.stderr.strip())
        elif proc.returncode != 0:
            yield Slurm(failed=f"slurm_up.sh exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        else:
            (state / "timing.json").write_text(json.dumps({"bring_up_s": time.perf_counter() - t0}))
            yield Slurm(state=state)
    finally:
        subprocess.run(["bash", str(CLUSTER / "slurm_down.sh"), str(state)], capture_output=True, timeout=120)


def cluster_command(workdir) -> list[str]:
    """The README's cluster command on config/test.yaml, with the profile addressed from the repository
    root, plus `--slurm-status-command squeue` (this cluster has no accounting database) and
    `--slurm-init-seconds-before-status-checks 2` (its jobs take seconds, not hours)."""
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--profile", str(ROOT / "workflow/profiles/slurm"), "--configfile", str(ROOT / "config/test.yaml"),
            "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--verbose"]


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, slurm):
    """The tiny config (config/test.yaml) run end to end once, plus its report, shared by every
    end-to-end and cluster test: through SLURM where one can run here (each job an sbatch job;
    tests/cluster/test_slurm.py reruns a job of each kind locally and compares), else locally."""
    wd = tmp_path_factory.mktemp("e2e")
    if slurm.state is None:
        snakemake(wd, "--cores", "2", "--configfile", str(ROOT / "config/test.yaml"))
    else:
        t0 = time.perf_counter()
        proc = subprocess.run(["timeout", "-k", "30", "2400", *cluster_command(wd)], capture_output=True, text=True,
                              env=_env())
        log = proc.stdout + proc.stderr
        (wd / "snakemake_cluster.log").write_text(log)
        timing = {**json.loads((slurm.state / "timing.json").read_text()), "cluster_run_s": time.perf_counter() - t0}
        (slurm.state / "timing.json").write_text(json.dumps(timing))
        print(f"cluster timing: {timing}")
        assert proc.returncode == 0, f"rc {proc.returncode}\n{log[-6000:]}\n" + \
            (slurm.state / "log/slurmctld.log").read_text()[-3000:]
    snakemake(wd, "--configfile", str(ROOT / "config/test.yaml"), "--report", "results/report.html")
    return wd
