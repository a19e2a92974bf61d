import os
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
