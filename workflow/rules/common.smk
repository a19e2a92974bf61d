import os
import sys

from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from harmodiff.workflow_support import scan_table, synthetic_config  # noqa: E402


validate(config, "../schemas/config.schema.yaml")

SCANS = scan_table(config, results="results")
# Jobs run `python -m harmodiff.<stage>`; exporting src/ lets them import the package in a
# per-rule conda env too, where the project itself is not installed.
os.environ.update(PYTHONPATH=os.path.join(workflow.basedir, "src"))


wildcard_constraints:
    cohort="train|test",
    target="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    method="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    site="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    scan="[A-Za-z0-9][A-Za-z0-9_.+-]*",


def scan_row(wildcards):
    return SCANS.loc[wildcards.scan]


def raw_scan(wildcards):
    return scan_row(wildcards)["path"]


def stage_files(stage, suffix, scans=None):
    scans = SCANS if scans is None else scans
    return [
        f"results/{stage}/{r.cohort}/{r.site}/{r.Index}{suffix}" for r in scans.itertuples()
    ]


def harmonized_files(method="diffusion"):
    test = SCANS[SCANS["cohort"] == "test"]
    return [
        f"results/harmonized/{method}/{target}/{r.site}/{r.Index}.nii.gz"
        for target in config["target_sites"]
        for r in test.itertuples()
    ]


def evaluation_entries():
    """One entry per (method, target, test scan) to segment: preprocessed (target 'none') and
    the diffusion harmonization to each target site."""
    test = SCANS[SCANS["cohort"] == "test"]
    entries = []
    for method, targets in (("preprocessed", ["none"]), ("diffusion", list(config["target_sites"]))):
        for target in targets:
            for r in test.itertuples():
                base = f"results/segmentation/{method}/{target}/{r.site}/{r.Index}"
                entries.append({"method": method, "target": target, "scan": r.Index, "subject": r.subject,
                                "site": r.site, "volumes": f"{base}_volumes.json"})
    return entries


def segment_input_image(wildcards):
    if wildcards.method == "preprocessed":
        return f"results/preprocessed/test/{wildcards.site}/{wildcards.scan}.nii.gz"
    return f"results/harmonized/{wildcards.method}/{wildcards.target}/{wildcards.site}/{wildcards.scan}.nii.gz"


def train_settings_json():
    """What harmodiff.train needs from the config, as one JSON argument (no quotes inside)."""
    import json

    train = {k: v for k, v in config["train"].items() if k not in ("run", "threads")}
    settings = {"model": config["model"], "train": train, "anatomy": config["anatomy"],
                "grid": {"patch_shape": config["grid"]["patch_shape"]}}
    return json.dumps(settings, separators=(",", ":"))


def all_outputs():
    return (
        stage_files("preprocessed", ".nii.gz")
        + stage_files("qc", "_qc.png")
        + stage_files("anatomy", "_A.nii.gz")
        + ["results/tables/leakage.csv", f"results/model/{config['train']['run']}/checkpoint.pt"]
        + harmonized_files()
        + ["results/tables/ttests.csv", "results/tables/table2.csv"]
    )
