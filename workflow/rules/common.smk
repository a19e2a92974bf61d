import os
import re
import sys

from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from harmodiff.config import HDBET_FILES, ConfigError, WorkflowConfig, settings_text  # noqa: E402
from harmodiff.io import json_sidecar, write_text  # noqa: E402
from harmodiff.layout import derivative_suffixes, result_path  # noqa: E402
from harmodiff.manifests import ManifestTables, manifest_text  # noqa: E402
from harmodiff.plan import RunPlan  # noqa: E402
from harmodiff.workflow_support import scan_table, synthetic_config  # noqa: E402
from harmodiff.snakemake_patches import coalesce_reevaluation_timers  # noqa: E402

# Snakemake's scheduler otherwise wakes itself once more per second for every finished job
# (harmodiff.snakemake_patches): on the SRPBS-sized DAG that took a whole core
coalesce_reevaluation_timers()

validate(config, "../schemas/config.schema.yaml")  # generated from harmodiff.config
try:
    config.update(WorkflowConfig.from_dict(config).to_dict())  # every default filled in, checked once
except ConfigError as exc:
    raise ValueError(f"config: {exc}") from None

SCANS = scan_table(config, results="results")
# Jobs run `python -m harmodiff.<stage>`; exporting src/ lets them import the package in a
# per-rule conda env too, where the project itself is not installed.
os.environ.update(PYTHONPATH=os.path.join(workflow.basedir, "src"))


wildcard_constraints:
    cohort="train|test|target",
    target="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    method="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    site="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    scan="[A-Za-z0-9][A-Za-z0-9_.+-]*",


PLAN = RunPlan(config, SCANS)  # what runs (harmodiff.plan)
PATHS = PLAN.paths  # where its results go (harmodiff.layout)
MANIFESTS = ManifestTables(PLAN)  # the lists of scans its jobs read (harmodiff.manifests)
EXTERNAL = PLAN.external
METHODS = PLAN.methods


def raw_scan(wildcards):
    return SCANS.loc[wildcards.scan, "path"]


def hdbet_weight_files():
    """With skullstrip: hdbet, the model folder's files are the skull strip's inputs: missing
    weights stop the run before any job, and changed weights rerun it."""
    if config["preprocess"]["skullstrip"] != "hdbet":
        return []
    return [os.path.join(config["preprocess"]["hdbet_weights"], name) for name in HDBET_FILES]


def manifest_inputs(name):
    """A job's inputs when it reads manifest `name`: the manifest, and the files it lists (so
    Snakemake knows what the job depends on; the command reads only the manifest)."""
    return {"manifest": PATHS.manifest(name), "listed": MANIFESTS.files(name)}


def manifest_and_files(name):
    return [PATHS.manifest(name), *MANIFESTS.files(name)]


def subject_grid_reference(wildcards):
    """A preprocessed scan of the subject: the working grid the truth is resampled onto."""
    r = PLAN.subject_reference[wildcards.subject]
    return PATHS.stage_file("preprocessed", "test", r.site, r.Index, ".nii.gz")


def segment_input_image(wildcards):
    return PATHS.method_image(wildcards.method, wildcards.target, wildcards.site, wildcards.scan)


def pretrained_model():
    """The shipped model standing in for training (train.pretrained), as an input; else none."""
    path = config["train"]["pretrained"]
    return [path] if path else []


def pretrained_args():
    """train's arguments naming the shipped model (a list: the shell quotes each, `:q`)."""
    path = config["train"]["pretrained"]
    if not path:
        return []
    sha = config["train"]["pretrained_sha256"]
    return ["--pretrained", path] + (["--pretrained-sha256", sha] if sha else [])


def learned_site_args(wildcards, input):
    """harmonize's arguments naming a learned target site's token (a list: the shell quotes each, `:q`)."""
    return ["--learned-site", input.learned_site] if input.get("learned_site") else []


def bids_source(wildcards):
    """The harmonized scan, raw scan and transform behind one derivative image name."""
    target, site, scan = PLAN.bids_index[(wildcards.sub, wildcards.ses, wildcards.tgt)]
    image = PATHS.method_image("diffusion", target, site, scan)
    return {
        "harmonized": image,
        "provenance": str(json_sidecar(image)),
        "raw": SCANS.loc[scan, "path"],
        "transform": PATHS.stage_file("preprocessed", "test", site, scan, "_to_mni.mat"),
    }


def all_outputs():
    outputs = (
        PATHS.stage_files("preprocessed", ".nii.gz", SCANS)
        + PATHS.stage_files("qc", "_qc.png", SCANS)
        + PATHS.stage_files("anatomy", "_A.nii.gz", SCANS)
        + ["results/tables/leakage.csv", f"results/model/{config['train']['run']}/checkpoint.pt"]
        + [f for m in PLAN.image_methods() if m != "preprocessed" for f in PLAN.harmonized_files(m)]
        + [
            f"results/tables/{t}"
            for t in (
                "tissue_ratios.csv",
                "ttests.csv",
                "table1.csv",
                "table1.md",
                "table2.csv",
                "table2.md",
                "similarity_pairs.csv",
                "icc.csv",
                "site_classifier.csv",
            )
        ]
        + [f"results/figures/{f}.{ext}" for f in ("figure2", "figure3", "loss_curve") for ext in ("png", "pdf")]
        + PLAN.derivative_files()
    )
    if config["cohort"]["source"] == "synthetic":
        outputs += [f"results/tables/truth_{t}.csv" for t in ("ratios", "similarity", "preprocessing")]
        outputs += ["results/tables/biological_effect.csv", "results/tables/target_pull.csv"]
        outputs += [f"results/figures/questions.{ext}" for ext in ("png", "pdf")]
    return outputs
