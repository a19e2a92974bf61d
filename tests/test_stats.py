import shutil
import subprocess
import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from statsmodels.stats.multitest import multipletests

from harmodiff import stats, tables


def _traveling(n_subjects, sites, site_effect, sd_subject, sd_resid, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(0, sd_subject, n_subjects)
    rows = []
    for i in range(n_subjects):
        for s, site in enumerate(sites):
            rows.append({"scan_id": f"s{i}_{site}", "subject": f"s{i}", "site": site,
                         "ratio": 0.45 + site_effect[s] + u[i] + rng.normal(0, sd_resid)})
    return pd.DataFrame(rows)


def test_paired_tests_equal_scipy_and_fdr_equals_statsmodels():
    sites = ["KPM", "A", "B", "C"]
    df = _traveling(12, sites, [0, 0.002, 0.01, -0.004], 0.02, 0.005, seed=1)
    df = df[~((df.site == "B") & (df.subject == "s3"))]  # a missing scan: B is tested over 11 subjects
    out = stats.paired_site_tests(df, "KPM").set_index("site")
    ref = df[df.site == "KPM"].set_index("subject").ratio
    for site in ["A", "B", "C"]:
        other = df[df.site == site].set_index("subject").ratio
        common = ref.index.intersection(other.index)
        expected = st.ttest_rel(other[common], ref[common])
        assert out.loc[site, "n"] == len(common)
        assert out.loc[site, "t"] == pytest.approx(expected.statistic, rel=1e-9)
        assert out.loc[site, "p"] == pytest.approx(expected.pvalue, rel=1e-9)
    np.testing.assert_allclose(out.p_fdr, multipletests(out.p, method="fdr_bh")[1], rtol=1e-12)
    assert out.loc["B", "n"] == 11
    with pytest.raises(ValueError, match="reference site 'XYZ'"):
        stats.paired_site_tests(df, "XYZ")


def test_mixed_model_r2_recovers_known_variance_components():
    sites = [f"S{i}" for i in range(8)]
    effects = np.linspace(-0.03, 0.03, 8)
    sd_u, sd_e = 0.025, 0.01
    df = _traveling(150, sites, effects, sd_u, sd_e, seed=2)
    var_f = np.var(effects)  # balanced design: the fixed part's variance over observations
    total = var_f + sd_u ** 2 + sd_e ** 2
    r = stats.mixed_model_r2(df)
    assert r["converged"]
    assert r["marginal"] == pytest.approx(var_f / total, abs=0.03)
    assert r["conditional"] == pytest.approx((var_f + sd_u ** 2) / total, abs=0.03)


def test_mixed_model_without_site_effect_has_small_marginal_r2():
    df = _traveling(60, ["A", "B", "C"], [0, 0, 0], 0.02, 0.005, seed=3)
    r = stats.mixed_model_r2(df)
    assert r["marginal"] < 0.02 and r["conditional"] > 0.85


def test_evaluate_tables_per_method_and_tissue(tmp_path):
    from harmodiff import evaluate

    sites = ["R", "A", "B"]
    rows = []
    for method, effect in (("preprocessed", [0, 0.02, -0.02]), ("harmonized", [0, 0, 0])):
        df = _traveling(40, sites, effect, 0.02, 0.004, seed=5)
        for r in df.itertuples():
            rows.append({"method": method, "target": "R", "scan_id": r.scan_id, "subject": r.subject, "site": r.site,
                         "gm_ratio": r.ratio, "wm_ratio": 1 - r.ratio - 0.15})
    ratios = pd.DataFrame(rows)
    t = evaluate.ttests(ratios, "R")
    assert len(t) == 2 * 2 * 2  # methods x tissues x non-reference sites
    pre = t[(t.method == "preprocessed") & (t.tissue == "GM")]
    assert (pre.p_fdr < 1e-6).all()
    m = tables.table2(ratios).set_index(["method", "tissue"])
    assert m.loc[("preprocessed", "GM"), "r2_marginal"] > 0.3 > m.loc[("harmonized", "GM"), "r2_marginal"]
    assert m.loc[("harmonized", "GM"), "r2_conditional"] > 0.8


def test_mixed_model_failure_is_reported_not_raised():
    df = pd.DataFrame({"subject": ["a", "b"], "site": ["X", "Y"], "ratio": [0.4, 0.5]})
    r = stats.mixed_model_r2(df)
    assert not r["converged"]


R_NAKAGAWA = """
suppressMessages({library(lme4); library(performance)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
fit <- lmer(ratio ~ factor(site) + (1 | subject), data = d, REML = TRUE)
r2 <- r2_nakagawa(fit)
cat(sprintf("%.10f %.10f\\n", r2$R2_marginal, r2$R2_conditional))
"""


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R is not installed (.ci/run installs it)")
@pytest.mark.parametrize("seed, n_subjects, sites, effects", [
    (4, 9, ["KPM", "A", "B", "C"], [0, 0.004, 0.012, -0.006]),     # SRPBS-like: few subjects, strong site
    (5, 30, ["A", "B", "C", "D", "E"], [0, 0.001, -0.002, 0.0005, 0.0]),  # weak site effect
])
def test_mixed_model_r2_equals_r_performance(tmp_path, seed, n_subjects, sites, effects):
    """Both R2 agree with R's performance::r2_nakagawa on lme4's REML fit to 3 decimals, with an
    unbalanced design (two scans missing) so the fixed part's variance depends on its denominator."""
    df = _traveling(n_subjects, sites, effects, 0.02, 0.006, seed=seed)
    df = df.drop(index=[3, 7]).reset_index(drop=True)
    csv = tmp_path / "ratios.csv"
    df.to_csv(csv, index=False)
    script = tmp_path / "r2.R"
    script.write_text(R_NAKAGAWA)
    out = subprocess.run(["Rscript", str(script), str(csv)], capture_output=True, text=True, check=True)
    r_marginal, r_conditional = map(float, out.stdout.split())
    ours = stats.mixed_model_r2(df)
    assert ours["marginal"] == pytest.approx(r_marginal, abs=5e-4)
    assert ours["conditional"] == pytest.approx(r_conditional, abs=5e-4)


def test_traveling_icc_is_the_two_way_random_absolute_agreement_formula():
    """A hand-computed case: 4 subjects at 3 sites; ICC(2,1) from the two-way ANOVA mean squares
    (Shrout & Fleiss 1979), against pingouin through stats.traveling_icc; a site offset lowers it
    (absolute agreement), subjects with a missing site are left out."""
    y = np.array([[9.0, 2.0, 5.0], [6.0, 1.0, 3.0], [8.0, 4.0, 6.0], [7.0, 1.0, 2.0]])  # subjects x sites
    n, k = y.shape
    grand = y.mean()
    ms_r = k * ((y.mean(1) - grand) ** 2).sum() / (n - 1)
    ms_c = n * ((y.mean(0) - grand) ** 2).sum() / (k - 1)
    sse = ((y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + grand) ** 2).sum()
    ms_e = sse / ((n - 1) * (k - 1))
    expected = (ms_r - ms_e) / (ms_r + (k - 1) * ms_e + k * (ms_c - ms_e) / n)
    import pingouin as pg

    long = pd.DataFrame([{"s": i, "r": j, "y": y[i, j]} for i in range(n) for j in range(k)])
    by_pingouin = pg.intraclass_corr(long, targets="s", raters="r", ratings="y").set_index("Type")
    assert by_pingouin.loc["ICC(A,1)", "ICC"] == pytest.approx(expected)  # the independent library agrees
    df = pd.DataFrame([{"subject": f"s{i}", "site": f"S{j}", "ratio": y[i, j]} for i in range(n) for j in range(k)])
    df = pd.concat([df, pd.DataFrame([{"subject": "s9", "site": "S0", "ratio": 100.0}])])  # one site only
    out = stats.traveling_icc(df)
    assert out["icc"] == pytest.approx(expected) and (out["subjects"], out["sites"]) == (4, 3)
    assert out["ci_low"] < out["icc"] < out["ci_high"]
    # every site measuring each subject alike: 1; the same with one site offset: lower (absolute agreement)
    alike = pd.DataFrame([{"subject": f"s{i}", "site": f"S{j}", "ratio": y[i, 0]} for i in range(n) for j in range(k)])
    assert stats.traveling_icc(alike)["icc"] == pytest.approx(1.0)
    offset = alike.assign(ratio=alike.ratio + (alike.site == "S1") * 2.0)
    assert stats.traveling_icc(offset)["icc"] < 0.8
    # two subjects at two sites (the tiny e2e run): the ICC still, no interval (pingouin needs 5 values)
    two = stats.traveling_icc(df[df.subject.isin(["s0", "s1"]) & df.site.isin(["S0", "S1"])])
    assert np.isfinite(two["icc"]) and np.isnan(two["ci_low"]) and (two["subjects"], two["sites"]) == (2, 2)
