import os
import re
import sys

from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from harmodiff.workflow_support import scan_table, sweep_method, synthetic_config  # noqa: E402


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


EVALUATION = config.get("evaluation", {})
METHODS = EVALUATION.get("methods", ["preprocessed", "diffusion", "histmatch", "combat"])
EXTERNAL = EVALUATION.get("external") or {}
SWEEP = EVALUATION.get("guidance_sweep") or {}
TEST = SCANS[SCANS["cohort"] == "test"]
TEST_SUBJECTS = list(dict.fromkeys(TEST["subject"]))
SWEEP_SUBJECTS = TEST_SUBJECTS[: SWEEP.get("subjects") or len(TEST_SUBJECTS)]
MAIN_SETTING = (config["harmonize"]["guidance"], float(config["harmonize"]["scale"]))


def method_targets(method):
    """The target sites a method harmonizes to ('none' for the unharmonized scans)."""
    if method == "preprocessed":
        return ["none"]
    if method in EXTERNAL:
        return [EXTERNAL[method]["target"]]
    return list(config["target_sites"])


def image_methods():
    """Methods that produce images (ComBat adjusts tissue ratios only); diffusion always runs."""
    builtin = [m for m in ("preprocessed", "diffusion", "histmatch") if m in METHODS or m == "diffusion"]
    return builtin + list(EXTERNAL)


def method_image(method, target, site, scan):
    if method == "preprocessed":
        return f"results/preprocessed/test/{site}/{scan}.nii.gz"
    return f"results/harmonized/{method}/{target}/{site}/{scan}.nii.gz"


def test_mask(site, scan):
    return f"results/preprocessed/test/{site}/{scan}_mask.nii.gz"


def sweep_settings():
    """(guidance, scale, method name) of the Table 1 guidance sweep."""
    return [(g, float(s), sweep_method(g, float(s))) for g in ("cfg", "cfgpp") for s in SWEEP.get(g, [])]


def seed_replicates():
    """(run seed, method name) of the main setting's extra seeds on the sweep subjects."""
    return [(int(seed), f"diffusion_seed{int(seed)}") for seed in SWEEP.get("seeds") or []]


def seed_image(seed, target, site, scan):
    return f"results/seeds/{seed}/{target}/{site}/{scan}.nii.gz"


def sweep_image(guidance, scale, target, site, scan):
    """The main harmonization's file when the setting is the main one (nothing is run twice)."""
    if (guidance, float(scale)) == MAIN_SETTING:
        return method_image("diffusion", target, site, scan)
    return f"results/sweep/{sweep_method(guidance, scale)}/{target}/{site}/{scan}.nii.gz"


def harmonized_files(method="diffusion"):
    return [method_image(method, t, r.site, r.Index) for t in method_targets(method) for r in TEST.itertuples()]


def evaluation_entries():
    """One entry per (image method, target, test scan) to segment."""
    entries = []
    for method in image_methods():
        for target in method_targets(method):
            for r in TEST.itertuples():
                base = f"results/segmentation/{method}/{target}/{r.site}/{r.Index}"
                entries.append({"method": method, "target": target, "scan": r.Index, "subject": r.subject,
                                "site": r.site, "volumes": f"{base}_volumes.json"})
    return entries


def similarity_entries():
    """Images compared across sites: every image method on all test subjects, and the guidance
    sweep on the sweep subjects (Table 1)."""
    entries = []
    for method in image_methods():
        for target in method_targets(method):
            for r in TEST.itertuples():
                entries.append((method, target, r.subject, r.site, method_image(method, target, r.site, r.Index),
                                test_mask(r.site, r.Index)))
    for target in config["target_sites"]:
        for r in TEST[TEST["subject"].isin(SWEEP_SUBJECTS)].itertuples():
            for guidance, scale, name in sweep_settings():
                entries.append((name, target, r.subject, r.site, sweep_image(guidance, scale, target, r.site, r.Index),
                                test_mask(r.site, r.Index)))
            for seed, name in seed_replicates():  # cross-site similarity under other seeds
                entries.append((name, target, r.subject, r.site, seed_image(seed, target, r.site, r.Index),
                                test_mask(r.site, r.Index)))
    return entries


def truth_entries():
    """Synthetic cohort: every image at a target site vs the subject rendered at that site;
    the unharmonized scans are scored against every target, and every guidance-sweep setting
    on the sweep subjects."""
    if config["cohort"]["source"] != "synthetic":
        return []

    def entry(method, target, r, image):
        return (method, target, r.Index, image, test_mask(r.site, r.Index),
                f"results/synthetic/truth/at_site/{target}/{r.subject}.nii.gz",
                f"results/synthetic/truth/subjects/{r.subject}_mask.nii.gz")

    entries = []
    for target in config["target_sites"]:
        for method in image_methods():
            if method != "preprocessed" and target not in method_targets(method):
                continue
            for r in TEST.itertuples():
                image_target = "none" if method == "preprocessed" else target
                entries.append(entry(method, target, r, method_image(method, image_target, r.site, r.Index)))
        for r in TEST[TEST["subject"].isin(SWEEP_SUBJECTS)].itertuples():
            for guidance, scale, name in sweep_settings():
                entries.append(entry(name, target, r, sweep_image(guidance, scale, target, r.site, r.Index)))
            for seed, name in seed_replicates():
                entries.append(entry(name, target, r, seed_image(seed, target, r.site, r.Index)))
    return entries


def target_truth_entries():
    """Synthetic cohort: (target, subject) of every traveling subject rendered noise-free at every
    target site, segmented like the harmonized scans (what a perfect harmonization would give)."""
    if config["cohort"]["source"] != "synthetic":
        return []
    return [(target, subject) for target in config["target_sites"] for subject in TEST_SUBJECTS]


def target_truth_volumes(target, subject):
    return f"results/segmentation/truth/{target}/{subject}_volumes.json"


def subject_grid_reference(wildcards):
    """A preprocessed scan of the subject: the working grid the truth is resampled onto."""
    r = next(TEST[TEST["subject"] == wildcards.subject].itertuples())
    return f"results/preprocessed/test/{r.site}/{r.Index}.nii.gz"


def segment_input_image(wildcards):
    return method_image(wildcards.method, wildcards.target, wildcards.site, wildcards.scan)


def target_training_scans(wildcards, suffix):
    train = SCANS[(SCANS["cohort"] == "train") & (SCANS["site"] == wildcards.target)]
    return stage_files("preprocessed", suffix, train)


def figure_subject():
    subject = EVALUATION.get("figure_subject") or TEST_SUBJECTS[0]
    if subject not in TEST_SUBJECTS:
        raise ValueError(f"config evaluation.figure_subject: {subject!r} is not a test subject ({TEST_SUBJECTS})")
    return subject


def entry_args(entries, *names):
    """Parallel CLI lists (one per field) from a list of tuples."""
    return {name: " ".join(str(e[k]) for e in entries) for k, name in enumerate(names)}


def figure2_entries():
    subject = figure_subject()
    rows = TEST[TEST["subject"] == subject].sort_values("site")
    entries = []
    for method in image_methods():
        target = method_targets(method)[0]
        for r in rows.itertuples():
            label = method if target == "none" else f"{method}:{target}"  # shell-safe; drawn as an arrow
            entries.append((method_image(method, target, r.site, r.Index), label, r.site))
    return entries


def train_settings_json():
    """What harmodiff.train needs from the config, as one JSON argument (no quotes inside)."""
    import json

    train = {k: v for k, v in config["train"].items() if k not in ("run", "threads", "pretrained", "pretrained_sha256")}
    settings = {"model": config["model"], "train": train, "anatomy": config["anatomy"],
                "grid": {"patch_shape": config["grid"]["patch_shape"]}}
    return json.dumps(settings, separators=(",", ":"))


def pretrained_model():
    """The shipped model standing in for training (train.pretrained), as an input; else none."""
    path = config["train"].get("pretrained")
    return [path] if path else []


def pretrained_args():
    path = config["train"].get("pretrained")
    if not path:
        return ""
    sha = config["train"].get("pretrained_sha256")
    return f"--pretrained {path}" + (f" --pretrained-sha256 {sha}" if sha else "")


def all_outputs():
    outputs = (
        stage_files("preprocessed", ".nii.gz")
        + stage_files("qc", "_qc.png")
        + stage_files("anatomy", "_A.nii.gz")
        + ["results/tables/leakage.csv", f"results/model/{config['train']['run']}/checkpoint.pt"]
        + [f for m in image_methods() if m != "preprocessed" for f in harmonized_files(m)]
        + [f"results/tables/{t}" for t in ("tissue_ratios.csv", "ttests.csv", "table1.csv", "table1.md",
                                           "table2.csv", "table2.md", "similarity_pairs.csv")]
        + [f"results/figures/{f}.{ext}" for f in ("figure2", "figure3", "loss_curve") for ext in ("png", "pdf")]
    )
    if config["cohort"]["source"] == "synthetic":
        outputs += [f"results/tables/truth_{t}.csv" for t in ("ratios", "similarity", "preprocessing")]
    return outputs
