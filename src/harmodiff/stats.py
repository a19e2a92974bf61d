"""Residual site effects on tissue ratios (paper section 4).

* `paired_site_tests`: each site against the reference site over the subjects scanned at both,
  paired t-test (pingouin), Benjamini-Hochberg FDR across sites (statsmodels).
* `mixed_model_r2`: ratio ~ C(site) + (1 | subject), REML (statsmodels MixedLM), with the
  marginal and conditional R2 of Nakagawa & Schielzeth (2013):
      R2m = var_f / (var_f + var_u + var_e),  R2c = (var_f + var_u) / (var_f + var_u + var_e)
  var_f: variance of the fixed-effect predictions (n - 1 in the denominator, as R's
  `insight::get_variance` behind `performance::r2_nakagawa` computes it), var_u: random-intercept
  variance, var_e: residual variance. Convergence problems are reported, not hidden.
  tests/test_stats.py checks both R2 against R's `performance::r2_nakagawa` on lme4's fit.
* `traveling_icc`: how reproducible a value is across sites for the same subject, ICC(2,1) (two-way
  random effects, absolute agreement, one measurement; pingouin's ICC(A,1)) with its 95 % CI, over the
  subjects scanned at every site:
      ICC(2,1) = (MS_subject - MS_error) / (MS_subject + (k - 1) MS_error + k (MS_site - MS_error) / n)
  for n subjects at k sites.

Input frames have columns scan_id, subject, site and the value column.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


def _value_column(df: pd.DataFrame, value: str) -> None:
    missing = [c for c in ("subject", "site", value) if c not in df.columns]
    if missing:
        raise ValueError(f"statistics: missing column(s) {missing}")


def paired_site_tests(df: pd.DataFrame, reference: str, value: str = "ratio") -> pd.DataFrame:
    """Rows (site, n, t, p, p_fdr): paired t-test of site vs reference over shared subjects."""
    import pingouin as pg
    from statsmodels.stats.multitest import multipletests

    _value_column(df, value)
    if reference not in set(df["site"]):
        raise ValueError(f"reference site {reference!r} is not in the data (sites: {sorted(set(df['site']))})")
    ref = df[df["site"] == reference].groupby("subject")[value].mean()
    rows = []
    for site in sorted(set(df["site"]) - {reference}):
        other = df[df["site"] == site].groupby("subject")[value].mean()
        common = ref.index.intersection(other.index)
        t = p = np.nan
        if len(common) >= 2:
            res = pg.ttest(other[common].to_numpy(), ref[common].to_numpy(), paired=True)
            t = float(res["T"].iloc[0])
            p = float(res.filter(regex="^p[-_]?val|^p_unc").iloc[0, 0])
        rows.append({"site": site, "n": int(len(common)), "t": t, "p": p})
    out = pd.DataFrame(rows, columns=["site", "n", "t", "p"])
    ok = out["p"].notna()
    out["p_fdr"] = np.nan
    if ok.any():
        out.loc[ok, "p_fdr"] = multipletests(out.loc[ok, "p"], method="fdr_bh")[1]
    return out


def mixed_model_r2(df: pd.DataFrame, value: str = "ratio") -> dict:
    """{'marginal', 'conditional', 'converged', 'var_fixed', 'var_subject', 'var_residual', 'warnings'}."""
    import statsmodels.formula.api as smf

    _value_column(df, value)
    data = df[["subject", "site", value]].rename(columns={value: "y"}).reset_index(drop=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = smf.mixedlm("y ~ C(site)", data, groups=data["subject"])
        try:
            result = model.fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as exc:  # e.g. too few subjects per site
            return {"marginal": np.nan, "conditional": np.nan, "converged": False, "var_fixed": np.nan,
                    "var_subject": np.nan, "var_residual": np.nan, "warnings": f"fit failed: {exc}"}
    messages = sorted({str(w.message).split("\n")[0] for w in caught})
    fixed = model.exog @ result.fe_params.to_numpy()
    var_f = float(np.var(fixed, ddof=1))
    var_u = float(result.cov_re.iloc[0, 0])
    var_e = float(result.scale)
    total = var_f + var_u + var_e
    converged = bool(result.converged) and not any("converge" in m.lower() for m in messages)
    return {"marginal": var_f / total, "conditional": (var_f + var_u) / total, "converged": converged,
            "var_fixed": var_f, "var_subject": var_u, "var_residual": var_e, "warnings": "; ".join(messages)}


def traveling_icc(df: pd.DataFrame, value: str = "ratio") -> dict:
    """{'icc', 'ci_low', 'ci_high', 'subjects', 'sites'}: ICC(2,1) of `value` with subjects as targets and
    sites as raters, over the subjects scanned at every site (NaN with fewer than two of either). The ICC
    is the formula's (the module docstring); its 95 % CI is pingouin's (`ICC(A,1)`), which needs at least
    five values (NaN below)."""
    import pingouin as pg

    _value_column(df, value)
    table = df.groupby(["subject", "site"])[value].mean().unstack("site").dropna()
    n, k = table.shape
    out = {"icc": np.nan, "ci_low": np.nan, "ci_high": np.nan, "subjects": n, "sites": k}
    if n < 2 or k < 2:
        return out
    y = table.to_numpy(float)
    grand = y.mean()
    ms_subject = k * ((y.mean(1) - grand) ** 2).sum() / (n - 1)
    ms_site = n * ((y.mean(0) - grand) ** 2).sum() / (k - 1)
    ms_error = ((y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + grand) ** 2).sum() / ((n - 1) * (k - 1))
    denominator = ms_subject + (k - 1) * ms_error + k * (ms_site - ms_error) / n
    out["icc"] = float((ms_subject - ms_error) / denominator) if denominator > 0 else np.nan
    if n * k >= 5:
        long = table.stack().rename("y").reset_index()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pingouin's note on few raters
            res = pg.intraclass_corr(long, targets="subject", raters="site", ratings="y").set_index("Type")
        out["ci_low"], out["ci_high"] = (float(v) for v in res.loc["ICC(A,1)", "CI95"])
    return out
