import numpy as np
import pandas as pd
import pytest

from harmodiff.combat import FEATURES, combat_ratios
from harmodiff.io import InputError


def _traveling(n_subjects=20, shifts=(0.0, 0.03, -0.02, 0.05), seed=0):
    rng = np.random.default_rng(seed)
    subject_effect = rng.normal(0, 0.02, (n_subjects, len(FEATURES)))
    rows, truth = [], []
    for k, shift in enumerate(shifts):
        for s in range(n_subjects):
            value = np.array([0.45, 0.35, 0.20]) + subject_effect[s] + shift + rng.normal(0, 0.002, 3)
            rows.append({"scan_id": f"s{s}_site{k}", "subject": f"s{s}", "site": f"site{k}",
                         **dict(zip(FEATURES, value))})
            truth.append(subject_effect[s])
    return pd.DataFrame(rows), np.array(truth)


def test_combat_removes_known_site_shifts_and_keeps_subjects():
    df, subject_effect = _traveling()
    out = combat_ratios(df, reference_site="site0")
    ref = df[df.site == "site0"]
    for feature in FEATURES:
        before = df.groupby("site")[feature].mean() - ref[feature].mean()
        after = out.groupby("site")[feature].mean() - ref[feature].mean()
        assert before.abs().max() > 0.04
        assert after.abs().max() < 0.005, after  # every site lands on the reference's mean
        # the subjects' own differences survive
        assert np.corrcoef(out[feature], subject_effect[:, FEATURES.index(feature)])[0, 1] > 0.95
    # the reference site is the anchor: its values are left as they were
    np.testing.assert_allclose(out[out.site == "site0"][list(FEATURES)], ref[list(FEATURES)], atol=1e-9)


def test_combat_errors_name_the_site():
    df, _ = _traveling(n_subjects=3)
    with pytest.raises(InputError, match="site9"):
        combat_ratios(pd.concat([df, df.iloc[:1].assign(site="site9")]), reference_site="site0")
    with pytest.raises(InputError, match="reference site 'KPM'"):
        combat_ratios(df, reference_site="KPM")
