import numpy as np
import pandas as pd

from harmodiff import leakage


def test_histogram_features_are_normalized_counts():
    v = np.array([0.0, 100.0, 100.0, 1499.0, 5000.0])
    f = leakage.histogram_features(v, (0.0, 1500.0), bins=3)
    np.testing.assert_allclose(f, [3 / 5, 0, 2 / 5])  # 5000 is clipped into the last bin


def test_site_accuracy_separable_vs_random():
    rng = np.random.default_rng(0)
    sites = np.repeat(["A", "B", "C"], 10)
    separable = rng.normal(size=(30, 8)) * 0.1 + np.repeat(np.eye(3, 8) * 3, 10, axis=0)
    acc, k = leakage.site_accuracy(separable, sites, folds=5)
    assert acc == 1.0 and k == 5
    noise = rng.normal(size=(30, 8))
    acc_noise, _ = leakage.site_accuracy(noise, sites, folds=5)
    assert acc_noise < 0.7


def _traveling(shift_per_site: dict, subjects: int = 4, seed: int = 0) -> tuple:
    """Images of each subject at each site (a subject's own intensity spread, the site's shift), as a
    site-classifier manifest and a loader of their brain voxels."""
    rng = np.random.default_rng(seed)
    voxels, rows = {}, []
    for s in range(subjects):
        spread = rng.uniform(80, 120)
        for site, shift in shift_per_site.items():
            name = f"sub{s}_{site}"
            voxels[name] = rng.normal(500 + shift, spread, 4000)
            rows.append({"image": name, "mask": "-", "method": "m", "target": "T", "subject": f"sub{s}", "site": site})
    return pd.DataFrame(rows), lambda image, mask: voxels[image]


def test_the_site_classifier_is_at_chance_without_a_site_effect_and_right_with_one():
    """Four traveling subjects at three sites: with no site effect the held-out subject's sites are
    guessed at about chance (1/3); with distinct sites every scan is placed."""
    none, load_none = _traveling({"A": 0.0, "B": 0.0, "C": 0.0})
    distinct, load_distinct = _traveling({"A": -150.0, "B": 0.0, "C": 150.0})
    at_chance = leakage.site_classifier_table(none, load_none).iloc[0]
    assert at_chance.chance == 1 / 3 and at_chance.site_accuracy < 0.6 and at_chance.n_subjects == 4
    assert leakage.site_classifier_table(distinct, load_distinct).iloc[0].site_accuracy == 1.0
    # a group seen with one subject only (the guidance sweep) is not scored
    single = distinct[distinct.subject == "sub0"].assign(method="cfg_1")
    table = leakage.site_classifier_table(pd.concat([distinct, single], ignore_index=True), load_distinct)
    assert list(table.method) == ["m"]
