HARMONIZE = config["harmonize"]
# the settings come from results/config/harmonize.yaml; a job adds only what is its own (params.runs:
# the runs manifest of the further settings it harmonizes the scan with)
HARMONIZE_SHELL = (
    "python -m harmodiff.harmonize --config {input.settings:q} --checkpoint {input.checkpoint:q} "
    "--input {input.image:q} --mask {input.mask:q} --anatomy {input.anatomy:q} --coarse {input.coarse:q} "
    "--target-site {wildcards.target:q} {params.learned_site:q} --output {output.image:q} {params.runs:q} "
    "--seed-key {wildcards.scan:q} "
    "--threads {threads} > {log:q} 2>&1"
)

# a test scan's preprocessing and anatomy maps
TEST_SCAN = {
    "image": result_path("stage", ".nii.gz", stage="preprocessed", cohort="test"),
    "mask": result_path("stage", "_mask.nii.gz", stage="preprocessed", cohort="test"),
    "transform": result_path("stage", "_to_mni.mat", stage="preprocessed", cohort="test"),
    "anatomy": result_path("stage", "_A.nii.gz", stage="anatomy", cohort="test"),
    "coarse": result_path("stage", "_Acoarse.nii.gz", stage="anatomy", cohort="test"),
    "anatomy_settings": result_path("stage", "_A.json", stage="anatomy", cohort="test"),
}

# every harmonization reads the model, the scan, its mask and its anatomy maps (with the settings
# they were made with, checked against the model's), and a target the model was not trained on its
# learned token
HARMONIZE_INPUT = {
    "checkpoint": rules.train.output.checkpoint,
    "learned_site": lambda wildcards: PLAN.learned_site_file(wildcards.target) or [],
    **{k: TEST_SCAN[k] for k in ("image", "mask", "anatomy", "coarse", "anatomy_settings")},
    "settings": "results/config/harmonize.yaml",
}


HARMONIZE_OUTPUT = {
    "image": result_path("harmonized", ".nii.gz", method="diffusion"),
    "provenance": result_path("harmonized", ".json", method="diffusion"),
}


# the scans of subjects outside the guidance sweep: the main setting only
rule harmonize:
    input:
        **HARMONIZE_INPUT,
    output:
        **HARMONIZE_OUTPUT,
    log:
        "results/logs/harmonize/diffusion/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/harmonize/diffusion/{target}/{site}/{scan}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: HARMONIZE["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    params:
        runs=[],
        learned_site=learned_site_args,
    shell:
        HARMONIZE_SHELL


# a sweep subject's scan: the main setting, Table 1's other guidance settings and the main setting
# under other run seeds (config evaluation.guidance_sweep), in one job with one model load (a
# job per image spent ~9 of its ~13 s starting torch and MONAI)
EXTRA_RUNS = [run["output"] for run in PLAN.extra_runs()]
SWEEP_SCANS = list(PLAN.sweep_scans().index)


ruleorder: harmonize_all_settings > harmonize


rule harmonize_all_settings:
    input:
        **HARMONIZE_INPUT,
        runs=PATHS.manifest("sweep_runs"),
    output:
        **HARMONIZE_OUTPUT,
        **{f"run{i}": path for i, path in enumerate(EXTRA_RUNS)},
        **{f"run{i}_provenance": str(json_sidecar(path)) for i, path in enumerate(EXTRA_RUNS)},
    log:
        "results/logs/harmonize/all_settings/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/harmonize/all_settings/{target}/{site}/{scan}.tsv"
    wildcard_constraints:
        scan="|".join(re.escape(scan) for scan in SWEEP_SCANS) if EXTRA_RUNS and SWEEP_SCANS else "(?!)",
    conda:
        "../../envs/torch.yaml"
    threads: HARMONIZE["threads"]
    resources:
        mem_mb=8000,
        runtime=120 * (1 + len(EXTRA_RUNS)),
        gpu=1,
    params:
        runs=lambda wildcards, input: ["--runs", input.runs],
        learned_site=learned_site_args,
    shell:
        HARMONIZE_SHELL


# the target site's pooled training intensities, built once and read by every histmatch job
rule histmatch_reference:
    input:
        unpack(lambda wildcards: manifest_inputs(f"histmatch-{wildcards.target}")),
    output:
        "results/harmonized/histmatch/{target}/reference.npy",
    log:
        "results/logs/harmonize/histmatch/{target}/reference.log",
    benchmark:
        "results/benchmarks/harmonize/histmatch/{target}/reference.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m harmodiff.histmatch reference --manifest {input.manifest:q} --output {output:q} > {log:q} 2>&1"


rule histmatch:
    input:
        image=TEST_SCAN["image"],
        mask=TEST_SCAN["mask"],
        reference=rules.histmatch_reference.output[0],
    output:
        result_path("harmonized", ".nii.gz", method="histmatch"),
    log:
        "results/logs/harmonize/histmatch/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/harmonize/histmatch/{target}/{site}/{scan}.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m harmodiff.histmatch match --input {input.image:q} --mask {input.mask:q} "
        "--reference {input.reference:q} --output {output:q} > {log:q} 2>&1"


rule import_external:
    input:
        image=lambda wildcards: EXTERNAL[wildcards.method]["pattern"].format(
            scan_id=wildcards.scan, site=wildcards.site, subject=SCANS.loc[wildcards.scan, "subject"]
        ),
        mask=TEST_SCAN["mask"],
        transform=TEST_SCAN["transform"],
    output:
        result_path("harmonized", ".nii.gz"),
    log:
        "results/logs/harmonize/{method}/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/harmonize/{method}/{target}/{site}/{scan}.tsv"
    wildcard_constraints:
        method="|".join(re.escape(name) for name in EXTERNAL) or "(?!)",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        space=lambda wildcards: EXTERNAL[wildcards.method]["space"],
    shell:
        "python -m harmodiff.external --input {input.image:q} --mask {input.mask:q} --space {params.space:q} "
        "--transform {input.transform:q} --output {output:q} > {log:q} 2>&1"


# the harmonized scans as a BIDS-Derivatives dataset (results/derivatives/harmodiff)
rule bids_description:
    output:
        f"{PATHS.derivatives_root()}/dataset_description.json",
    log:
        "results/logs/derivatives/dataset_description.log",
    benchmark:
        "results/benchmarks/derivatives/dataset_description.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "python -m harmodiff.derivatives description --output {output:q} > {log:q} 2>&1"


rule bids_image:
    input:
        unpack(bids_source),
    output:
        mni=result_path("derivative", derivative_suffixes()[0]),
        native=result_path("derivative", derivative_suffixes()[1]),
    log:
        "results/logs/derivatives/sub-{sub}_ses-site{ses}_to{tgt}.log",
    benchmark:
        "results/benchmarks/derivatives/sub-{sub}_ses-site{ses}_to{tgt}.tsv"
    wildcard_constraints:
        sub="[A-Za-z0-9]+",
        ses="[A-Za-z0-9]+",
        tgt="[A-Za-z0-9]+",
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m harmodiff.derivatives image --harmonized {input.harmonized:q} --raw {input.raw:q} "
        "--transform {input.transform:q} --mni-output {output.mni:q} --native-output {output.native:q} > {log:q} 2>&1"
