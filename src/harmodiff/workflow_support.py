"""Helpers the Snakefile calls at parse time: the scan table and the synthetic cohort's plan.

The scan table must be known before any job runs (Snakemake builds the DAG from it), so a bad
scan sheet fails here, naming the row, before anything starts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harmodiff import scans as scan_sheets
from harmodiff.config import BidsCohort
from harmodiff.synth import SynthConfig, cohort_plan, target_site_names


def _synth(config: dict) -> SynthConfig | None:
    cohort = config["cohort"]
    if cohort["source"] != "synthetic":
        return None
    return SynthConfig.from_dict(cohort.get("synthetic"))


def synthetic_config(config: dict) -> dict | None:
    """Paths (relative to results/synthetic) of the scans and of the truth files the evaluation reads
    (synth reads its settings from results/config/synth.yaml)."""
    cfg = _synth(config)
    if cfg is None:
        return None
    plan = cohort_plan(cfg)
    subjects = list(dict.fromkeys(plan.loc[plan["cohort"] == "test", "subject"]))
    truth = [f"truth/at_site/{site}/{subj}.nii.gz" for site in target_site_names(cfg) for subj in subjects]
    truth += [f"truth/subjects/{subj}_mask.nii.gz" for subj in dict.fromkeys(plan["subject"])]
    truth += [f"truth/rendered/{scan}.nii.gz" for scan in plan["scan_id"]]
    return {"paths": list(plan["path"]), "truth": truth}


def _keep(df: pd.DataFrame, column: str, wanted, key: str, source) -> pd.DataFrame:
    """The rows whose column is in wanted (None: all); a wanted value with no rows is an error."""
    if not wanted:
        return df
    absent = [w for w in wanted if w not in set(df[column])]
    if absent:
        raise scan_sheets.InputError(f"config {key}: {', '.join(absent)} not found in {source} "
                                     f"(has: {', '.join(sorted(set(df[column])))})")
    return df[df[column].isin(wanted)]


def scan_table(config: dict, results: str = "results") -> pd.DataFrame:
    """All scans of the run, indexed by scan_id (columns subject, site, cohort, path)."""
    cohort = config["cohort"]
    source = cohort["source"]
    targets = list(config.get("target_sites") or [])
    if source == "synthetic":
        plan = cohort_plan(_synth(config))
        plan["path"] = [str(Path(results) / "synthetic" / p) for p in plan["path"]]
        df = scan_sheets.validate_scan_sheet(plan, source="synthetic cohort", check_files=False)
    elif source == "sheet":
        if not cohort.get("sheet"):
            raise scan_sheets.InputError("config cohort.sheet: set it to a scan sheet TSV when cohort.source is 'sheet'")
        df = scan_sheets.read_scan_sheet(cohort["sheet"])
    elif source == "bids":
        b = BidsCohort.of(cohort.get("bids"))
        if not b.root:
            raise scan_sheets.InputError("config cohort.bids.root: set it when cohort.source is 'bids'")
        df = scan_sheets.from_bids(b.root, site_column=b.site_column, cohort=b.cohort, cohort_column=b.cohort_column)
        if b.training_sheet:
            train = scan_sheets.read_scan_sheet(b.training_sheet)
            if (train["cohort"] != "train").any():
                raise scan_sheets.InputError(f"config cohort.bids.training_sheet: {b.training_sheet} has test rows "
                                             "(its scans are added as training scans)")
            df = scan_sheets.combine(train, df)
    elif source == "srpbs":
        r = cohort.get("srpbs") or {}
        if not r.get("root") or not r.get("training_sheet"):
            raise scan_sheets.InputError("config cohort.srpbs: set root and training_sheet when cohort.source is 'srpbs'")
        test = scan_sheets.from_srpbs(r["root"])
        test = _keep(test, "site", r.get("sites"), "cohort.srpbs.sites", r["root"])
        test = _keep(test, "subject", r.get("subjects"), "cohort.srpbs.subjects", r["root"])
        train = scan_sheets.read_scan_sheet(r["training_sheet"])
        df = scan_sheets.combine(train, test)
    else:  # the config schema already rejects this
        raise scan_sheets.InputError(f"config cohort.source: unknown source {source!r}")
    pretrained = (config.get("train") or {}).get("pretrained")
    if cohort.get("participants"):  # as a BIDS app's --participant-label: the test subjects to run
        is_test = df["cohort"] == "test"
        kept = _keep(df[is_test], "subject", cohort["participants"], "cohort.participants", f"{source} test scans")
        df = pd.concat([df[~is_test], kept])
    if not (df["cohort"] == "test").any():
        raise scan_sheets.InputError(f"{source} scans: no 'test' rows, so nothing to harmonize and evaluate")
    if not (df["cohort"] == "train").any():
        if not pretrained:
            raise scan_sheets.InputError(f"{source} scans: no 'train' rows, so nothing to train the model on (add "
                                         "training scans, or set train.pretrained to a trained model)")
        scan_sheets.check_target_sites(df, targets, f"config target_sites ({source} scans, the pretrained model)",
                                       trained_sites=_pretrained_sites(pretrained))
    else:
        scan_sheets.check_target_sites(df, targets, {"sheet": cohort.get("sheet"), "bids": "BIDS dataset and "
                                                     "training sheet"}.get(source) or f"{source} cohort")
    return df.set_index("scan_id", drop=False)


def _pretrained_sites(pretrained) -> list[str]:
    """Without training scans a target site is the pretrained model's or learned: its model.json (written
    beside checkpoint.pt by `harmodiff.train export`) names the sites it was trained on."""
    import json

    record = Path(pretrained).parent / "model.json"
    try:
        return list(json.loads(record.read_text())["site_labels"]["sites"])
    except (OSError, ValueError, KeyError, TypeError):
        raise scan_sheets.InputError(f"config train.pretrained: {record} (the sites the model was trained on, "
                                     "written beside checkpoint.pt by 'harmodiff.train export') is missing or "
                                     "unreadable; without training scans the target sites are checked against it") from None

