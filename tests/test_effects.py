import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harmodiff import effects, synth
from harmodiff.io import InputError

SITES = ["TSA", "TSB", "TSC"]
TRUE_PER_YEAR = -0.002        # planted: GM ratio falls by 0.02 a decade
SITE_OFFSET = 0.015           # each later site reads GM this much higher


def _cohort(n=30, seed=0):
    """Traveling subjects with ages, study sites partly confounded with age (synth's rule), true ratios
    that fall with age, and two training subjects at the target TRA."""
    cfg = synth.SynthConfig()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = float(rng.uniform(20, 80))
        rows.append({"subject": f"sub-ts{i:02d}", "cohort": "test", "age": age,
                     "study_site": synth.study_site(cfg, i, age, SITES),
                     "gm_ratio": 0.5 + TRUE_PER_YEAR * (age - 50) + rng.normal(0, 0.004),
                     "wm_ratio": 0.35 + rng.normal(0, 0.004)})
    rows += [{"subject": f"sub-tr{i}", "cohort": "train", "age": 30.0, "study_site": "TRA",
              "gm_ratio": 0.56, "wm_ratio": 0.33} for i in range(2)]
    return pd.DataFrame(rows)


def _ratios(truth, method, target, site_offset):
    rows = []
    for r in truth[truth.cohort == "test"].itertuples():
        for k, site in enumerate(SITES):
            rows.append({"method": method, "target": target, "scan_id": f"{r.subject}_{site}", "subject": r.subject,
                         "site": site, "fractions": "posterior", "gm_ratio": r.gm_ratio + site_offset * k,
                         "wm_ratio": r.wm_ratio, "csf_ratio": 1 - r.gm_ratio - r.wm_ratio - site_offset * k})
    return pd.DataFrame(rows)


def test_ols_slope_matches_scipy_linregress_and_its_t_interval():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 10, 12)
    y = 2 - 0.3 * x + rng.normal(0, 0.5, 12)
    ref = sps.linregress(x, y)
    half = sps.t.ppf(0.975, 10) * ref.stderr
    got = effects.ols_slope(y, x, scale=10)
    assert got["estimate"] == pytest.approx(10 * ref.slope)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((10 * (ref.slope - half), 10 * (ref.slope + half)))
    assert got["p"] == pytest.approx(ref.pvalue)
    two = effects.ols_slope(y[:2], x[:2])  # no degree of freedom left for a CI
    assert two["estimate"] == pytest.approx((y[1] - y[0]) / (x[1] - x[0])) and np.isnan(two["ci_low"])
    assert np.isnan(effects.ols_slope(y[:1], x[:1])["estimate"])


def test_site_and_age_are_partly_confounded_in_the_study():
    cfg = synth.SynthConfig()
    ages = np.linspace(20, 80, 300)
    place = np.array([SITES.index(synth.study_site(cfg, i, a, SITES)) for i, a in enumerate(ages)])
    rho = sps.spearmanr(ages, place).statistic
    assert 0.6 < rho < 0.99                     # older subjects mostly at later sites, not all
    assert set(place) == {0, 1, 2}
    # the age is the atrophy's: linear across the two ranges, the planted effect
    for i in range(20):
        s = synth.subject_params(cfg, i)
        assert s["atrophy_mm"] == pytest.approx(2.5 * (s["age"] - 20) / 60)


def test_the_estimator_recovers_the_planted_effect_and_a_site_offset_biases_it():
    truth = _cohort()
    ratios = pd.concat([_ratios(truth, "preprocessed", "none", SITE_OFFSET),
                        _ratios(truth, "harmonized", "TRA", 0.0)], ignore_index=True)
    t = effects.effect_table(ratios, truth).set_index(["method", "tissue"])
    true = t.loc[("truth", "GM"), "true_effect"]
    assert true == pytest.approx(10 * TRUE_PER_YEAR, abs=0.003)
    study = effects.study_ratios(ratios[ratios.method == "preprocessed"], truth)
    assert len(study) == 30 and (study.site == study.study_site).all()
    # site effects confounded with age push the unharmonized estimate away from the truth
    pre, harm = t.loc[("preprocessed", "GM")], t.loc[("harmonized", "GM")]
    assert not pre["ci_covers_truth"] and pre["estimate"] > true + 0.003
    assert harm["ci_covers_truth"] and harm["error"] == pytest.approx(0, abs=1e-9)  # the truth's own ratios
    # ComBat fit on the study: without the covariate it takes part of the effect with the site's, with age kept
    # it removes the site offset and keeps the effect
    plain, kept = t.loc[("combat_study", "GM")], t.loc[("combat_study_age", "GM")]
    assert abs(plain["error"]) > abs(kept["error"])
    assert kept["ci_covers_truth"] and abs(kept["error"]) < 0.002


def test_the_ideal_rows_carry_the_segmentations_own_attenuation_of_the_effect():
    """The truth rendered at the target and segmented by a segmentation that sees 40 % of each subject's
    departure from the mean GM ratio: the ideal row's slope is 40 % of the true one, exactly."""
    truth = _cohort()
    traveling = truth[truth.cohort == "test"]
    mean = traveling["gm_ratio"].mean()
    ideal = traveling[["subject"]].assign(target="TRA", posterior_gm_ratio=mean + 0.4 * (traveling["gm_ratio"] - mean),
                                          posterior_wm_ratio=traveling["wm_ratio"])
    t = effects.effect_table(_ratios(truth, "preprocessed", "none", 0.0), truth, ideal).set_index(["method", "tissue"])
    row = t.loc[("ideal", "GM")]
    assert row["target"] == "TRA" and row["n_subjects"] == len(traveling)
    assert row["estimate"] == pytest.approx(0.4 * row["true_effect"])
    assert t.loc[("ideal", "WM"), "estimate"] == pytest.approx(t.loc[("truth", "WM"), "estimate"])
    assert "ideal" not in set(effects.effect_table(_ratios(truth, "preprocessed", "none", 0.0), truth)["method"])


def test_combat_on_a_study_too_small_says_why_in_the_table():
    truth = _cohort(n=4)
    t = effects.effect_table(_ratios(truth, "preprocessed", "none", SITE_OFFSET), truth)
    small = t[t.method == "combat_study"]
    assert small["estimate"].isna().all() and small["note"].str.contains("ComBat").all()


def test_pull_is_the_planted_share_of_the_target_training_subjects_anatomy():
    truth = _cohort()
    ideal = truth[truth.cohort == "test"][["subject"]].assign(target="TRA", posterior_gm_ratio=truth["gm_ratio"] + 0.01,
                                                              posterior_wm_ratio=truth["wm_ratio"])
    train_mean = {"gm": 0.56, "wm": 0.33}
    rows = []
    for share, method in ((0.4, "pulled"), (0.0, "faithful")):
        r = _ratios(truth, method, "TRA", 0.0)
        true = r["subject"].map(truth.set_index("subject")["gm_ratio"])
        r["gm_ratio"] = r["gm_ratio"] + 0.01 + share * (train_mean["gm"] - true)
        rows.append(r)
    t = effects.pull_table(pd.concat(rows), truth, ideal).set_index(["method", "tissue"])
    assert t.loc[("pulled", "GM"), "pull"] == pytest.approx(0.4)
    assert t.loc[("faithful", "GM"), "pull"] == pytest.approx(0.0, abs=1e-9)
    assert t.loc[("pulled", "GM"), "target_training_subjects"] == 2


def test_a_truth_table_without_ages_is_refused_with_a_line():
    truth = _cohort().drop(columns=["age"])
    with pytest.raises(InputError, match="lacks \\['age'\\]"):
        effects.effect_table(_ratios(truth.assign(age=0), "preprocessed", "none", 0.0), truth)
