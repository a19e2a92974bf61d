"""ComBat on the tissue ratios: the feature-level baseline of Table 2 (neuroCombat).

ComBat (Johnson et al., 2007; Fortin et al., 2018) removes per-site location and scale effects
from features with empirical-Bayes shrinkage. It harmonizes numbers, not images, so it enters
the evaluation after segmentation: the GM/WM/CSF ratios of the preprocessed scans, with site as
the batch. With a reference site the other sites are mapped onto it (neuroCombat's
`ref_batch`); otherwise onto the pooled mean.

neuroCombat 0.2.12's reference-batch branch still uses `np.int`, which numpy 2 removed (and
neuroHarmonize, which fixes it, pins numpy < 2, which antspyx and pingouin cannot use), so the
alias is provided for the duration of the call only.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd

from harmodiff.io import InputError

FEATURES = ("gm_ratio", "wm_ratio", "csf_ratio")


def combat_ratios(ratios: pd.DataFrame, reference_site: str | None = None,
                  features=FEATURES, covariates: tuple[str, ...] = ()) -> pd.DataFrame:
    """ComBat-adjusted copy of `ratios` (one row per scan, columns site and `features`). `covariates`
    (numeric columns, e.g. age) are protected: ComBat fits their effect beside the site's and keeps it."""
    from neuroCombat import neuroCombat

    counts = ratios["site"].value_counts()
    if len(counts) < 2:
        raise InputError(f"ComBat: needs at least two sites, got {list(counts.index)}")
    single = sorted(counts[counts < 2].index)
    if single:
        raise InputError(f"ComBat: sites {single} have a single scan; ComBat needs >= 2 per site")
    if reference_site is not None and reference_site not in counts.index:
        raise InputError(f"ComBat: reference site {reference_site!r} is not among the sites {sorted(counts.index)}")
    data = ratios[list(features)].to_numpy(dtype=float).T  # features x scans
    missing = [c for c in covariates if c not in ratios or ratios[c].isna().any()]
    if missing:
        raise InputError(f"ComBat: covariates {missing} are missing or have empty values")
    covars = pd.DataFrame({"site": ratios["site"].astype(str).to_numpy(),
                           **{c: ratios[c].to_numpy(dtype=float) for c in covariates}})
    added_alias = not hasattr(np, "int")
    if added_alias:
        np.int = int
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints its progress
            res = neuroCombat(dat=data, covars=covars, batch_col="site", ref_batch=reference_site,
                              continuous_cols=list(covariates) or None)
    finally:
        if added_alias:
            del np.int
    out = ratios.copy()
    out[list(features)] = np.asarray(res["data"]).T
    return out
