rule preprocess:
    input:
        raw=raw_scan,
        readable="results/qc/raw_scans.tsv",
        hdbet_weights=hdbet_weight_files(),
    output:
        image="results/preprocessed/{cohort}/{site}/{scan}.nii.gz",
        checks="results/preprocessed/{cohort}/{site}/{scan}.json",
        mask="results/preprocessed/{cohort}/{site}/{scan}_mask.nii.gz",
        transform="results/preprocessed/{cohort}/{site}/{scan}_to_mni.mat",
        qc="results/qc/{cohort}/{site}/{scan}_qc.png",
    log:
        "results/logs/preprocess/{cohort}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/preprocess/{cohort}/{site}/{scan}.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: config["preprocess"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spacing=config["grid"]["spacing"],
        shape=" ".join(str(s) for s in config["grid"]["shape"]),
        skullstrip=config["preprocess"]["skullstrip"],
        weights=config["preprocess"]["hdbet_weights"],
        registration=config["preprocess"]["registration"],
        seed=config["preprocess"]["seed"],
        volume=" ".join(str(v) for v in config["preprocess"]["brain_volume_ml"]),
        correlation=config["preprocess"]["min_template_correlation"],
        border=config["preprocess"]["max_brain_at_border"],
    shell:
        "python -m harmodiff.preprocess --input {input.raw} --output {output.image} "
        "--mask-output {output.mask} --transform-output {output.transform} --qc-output {output.qc} "
        "--spacing {params.spacing} --shape {params.shape} --skullstrip {params.skullstrip} "
        "--hdbet-weights {params.weights} --registration {params.registration} "
        "--seed {params.seed} --brain-volume-ml {params.volume} --min-template-correlation {params.correlation} "
        "--max-brain-at-border {params.border} --threads {threads} > {log} 2>&1"


# every raw scan read in full (voxel data, gzip checksum, NaNs) before any preprocessing starts
rule scans_readable:
    input:
        **manifest_inputs("raw_scans"),
    output:
        "results/qc/raw_scans.tsv",
    log:
        "results/logs/scans_readable.log",
    benchmark:
        "results/benchmarks/scans_readable.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m harmodiff.scans readable --manifest {input.manifest} --output {output} > {log} 2>&1"
