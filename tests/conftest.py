import os
import subprocess
import sys
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


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    """The tiny config (config/test.yaml) run locally end to end, plus its report (shared by the
    end-to-end and cluster tests)."""
    wd = tmp_path_factory.mktemp("e2e")
    snakemake(wd, "--cores", "2", "--configfile", str(ROOT / "config/test.yaml"))
    snakemake(wd, "--configfile", str(ROOT / "config/test.yaml"), "--report", "results/report.html")
    return wd
