import numpy as np

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
