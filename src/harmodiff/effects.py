"""Does harmonization keep the biology a pooled study looks for? Scored on the synthetic cohort, whose
subjects' ages drive a cortical atrophy of known size (`synth.subject_params`).

    python -m harmodiff.effects --ratios tissue_ratios.csv --truth subjects.tsv \\
        [--target-manifest TRUTH_TARGETS.tsv] --output-effects biological_effect.csv --output-pull target_pull.csv

* **The age effect** (`effect_table`). The study is one scan per traveling subject, the one at its
  `study_site`, where older subjects were scanned more often at later sites: site and age are partly
  confounded, as in pooled studies. Per method, the slope of each tissue ratio on age (per decade,
  ordinary least squares, 95 % CI) over the study's scans, next to the true effect: the same slope of
  the subjects' true ratios. ComBat is also fit on the study itself, as a pooled study would, without
  a covariate (`combat_study`, which takes the part of the age effect that looks like a site effect)
  and with age protected (`combat_study_age`). The `ideal` rows are the effect on each subject's truth
  rendered at the target and segmented alike: what the segmentation lets a perfect harmonizer keep.
* **The pull toward the target** (`pull_table`). A site token learned from few training subjects can
  learn their anatomy. Per method and target, the slope of (a subject's ratio after harmonization
  minus the ratio of its ideal harmonization, its truth rendered at the target and segmented alike)
  on (the target's training subjects' mean true ratio minus the subject's true ratio), over the
  traveling subjects (mean over their scans). 0: no pull; 1: the target's anatomy replaces the
  subject's. The unharmonized rows are the reference a harmonizer is read against.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from harmodiff.combat import combat_ratios
from harmodiff.evaluate import TISSUES
from harmodiff.io import InputError, check_outputs, one_line_errors, write_table
from harmodiff.manifests import add_manifest_option
from harmodiff.scans import REFERENCE_COHORTS
from harmodiff.tables import target_truth_ratios

DECADE = 10.0
MIN_SUBJECTS = 2  # for a slope; its CI needs one more (a degree of freedom)


def ols_slope(y, x, scale: float = 1.0) -> dict:
    """Slope of y on x (times `scale`) with its 95 % CI and p value, from statsmodels' OLS (two points: the
    slope alone)."""
    import statsmodels.api as sm

    y, x = np.asarray(y, float), np.asarray(x, float)
    empty = {"estimate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan, "n": len(y)}
    if len(y) < MIN_SUBJECTS or np.ptp(x) == 0:
        return empty
    if len(y) == MIN_SUBJECTS:
        return empty | {"estimate": (y[1] - y[0]) / (x[1] - x[0]) * scale}
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    low, high = fit.conf_int(0.05)[1]
    return {"estimate": fit.params[1] * scale, "ci_low": low * scale, "ci_high": high * scale,
            "p": float(fit.pvalues[1]), "n": len(y)}


def _subjects(truth: pd.DataFrame) -> pd.DataFrame:
    missing = {"subject", "cohort", "age", "study_site", "gm_ratio", "wm_ratio"} - set(truth.columns)
    if missing:
        raise InputError(f"the truth's subjects table lacks {sorted(missing)} (a cohort rendered before ages "
                         "existed: render it again)")
    return truth


def study_ratios(ratios: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The rows of `ratios` a pooled study has: each traveling subject's scan at its study site, with
    its age."""
    subjects = _subjects(truth)[["subject", "age", "study_site"]]
    m = ratios.merge(subjects, on="subject")
    return m[m["site"] == m["study_site"]].reset_index(drop=True)


def _effect_rows(method: str, target: str, study: pd.DataFrame, true: dict, note: str = "") -> list[dict]:
    rows = []
    for tissue in TISSUES:
        est = ols_slope(study[f"{tissue}_ratio"], study["age"], DECADE) if len(study) else ols_slope([], [])
        rows.append({"method": method, "target": target, "tissue": tissue.upper(),
                     **{k: est[k] for k in ("estimate", "ci_low", "ci_high", "p")}, "n_subjects": est["n"],
                     "true_effect": true[tissue], "error": est["estimate"] - true[tissue],
                     "ci_covers_truth": bool(est["ci_low"] <= true[tissue] <= est["ci_high"]), "note": note})
    return rows


def effect_table(ratios: pd.DataFrame, truth: pd.DataFrame, target_truth: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method, target and tissue: the study's age effect on the ratio (per decade) with its 95 % CI,
    the true effect and the error. Methods with fewer than `MIN_SUBJECTS` study scans (the sweep's
    extra runs) are left out; with that many, the slope has no CI. With `target_truth` (each traveling
    subject's truth rendered at a target and segmented, `tables.target_truth_ratios`), method `ideal`
    per target: the effect a perfect harmonizer's images give after the same segmentation, the one every
    method is read against when the segmentation itself sees only part of the true effect."""
    subjects = _subjects(truth)
    traveling = subjects[subjects["cohort"] == "test"]
    true = {t: ols_slope(traveling[f"{t}_ratio"], traveling["age"], DECADE)["estimate"] for t in TISSUES}
    study = study_ratios(ratios, subjects)
    rows = _effect_rows("truth", "none", traveling, true)
    for target, ideal in ([] if target_truth is None else target_truth.groupby("target", sort=False)):
        ideal = ideal.merge(traveling[["subject", "age"]], on="subject")
        ideal = ideal.rename(columns={f"posterior_{t}_ratio": f"{t}_ratio" for t in TISSUES})
        rows += _effect_rows("ideal", target, ideal, true)
    for (method, target), group in study.groupby(["method", "target"], sort=True):
        if len(group) >= MIN_SUBJECTS:
            rows += _effect_rows(method, target, group, true)
    pre = study[study["method"] == "preprocessed"]
    for method, covariates in (("combat_study", ()), ("combat_study_age", ("age",))):
        try:
            fitted = combat_ratios(pre, None, covariates=covariates) if len(pre) else pre
            rows += _effect_rows(method, "pooled", fitted, true)
        except InputError as e:  # a study too small for ComBat (a site with one scan): say so in the table
            rows += _effect_rows(method, "pooled", pre.iloc[:0], true, note=str(e))
    return pd.DataFrame(rows)


def pull_table(ratios: pd.DataFrame, truth: pd.DataFrame, target_truth: pd.DataFrame) -> pd.DataFrame:
    """Per method, target and tissue: the slope of the harmonized ratio's error (vs the subject's ideal
    harmonization) on the distance from the subject's true ratio to the target's training (or, for a
    learned site, target-only) subjects' mean, with its 95 % CI. Rows not harmonized to a rendered
    target (the unharmonized scans, ComBat) are read against the first rendered target."""
    subjects = _subjects(truth).set_index("subject")
    rendered = list(dict.fromkeys(target_truth["target"]))
    rows = []
    for (method, target), group in ratios[ratios["subject"].isin(target_truth["subject"])].groupby(
            ["method", "target"], sort=True):
        at = target if target in rendered else rendered[0]
        ideal = target_truth[target_truth["target"] == at].set_index("subject")
        # the subjects the target was learned from: its training subjects, or a new site's target-only ones
        training = subjects[subjects["cohort"].isin(REFERENCE_COHORTS) & (subjects["study_site"] == at)]
        fractions = group["fractions"].iloc[0] if "fractions" in group else "posterior"
        for tissue in TISSUES:
            error = group.groupby("subject")[f"{tissue}_ratio"].mean() - ideal[f"{fractions}_{tissue}_ratio"]
            error = error.dropna()
            distance = training[f"{tissue}_ratio"].mean() - subjects.loc[error.index, f"{tissue}_ratio"]
            est = ols_slope(error, distance)
            rows.append({"method": method, "target": target, "read_at": at, "tissue": tissue.upper(),
                         "pull": est["estimate"], "ci_low": est["ci_low"], "ci_high": est["ci_high"],
                         "n_subjects": est["n"], "target_training_subjects": len(training)})
    return pd.DataFrame(rows)


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmodiff.effects", description=__doc__.split("\n")[0])
    p.add_argument("--ratios", required=True, help="tissue_ratios.csv (every method's ratios)")
    p.add_argument("--truth", required=True, help="the cohort's truth/subjects.tsv")
    add_manifest_option(p, ("volumes", "target", "subject"), option="--target-manifest",
                        help="the truth rendered at each target and segmented")
    p.add_argument("--output-effects", required=True)
    p.add_argument("--output-pull", required=True)
    a = p.parse_args(argv)
    check_outputs([a.output_effects, a.output_pull], inputs=[a.ratios, a.truth, a.target_manifest.attrs["path"]])
    ratios, truth = pd.read_csv(a.ratios), pd.read_csv(a.truth, sep="\t")
    target_truth = target_truth_ratios(a.target_manifest)
    effects = effect_table(ratios, truth, target_truth)
    pull = pull_table(ratios, truth, target_truth)
    write_table(effects, a.output_effects)
    write_table(pull, a.output_pull)
    print(f"age effect (per decade):\n{effects.to_string(index=False)}\n\npull toward the target:\n"
          f"{pull.to_string(index=False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
