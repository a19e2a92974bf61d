rule preprocess:
    input:
        raw=raw_scan,
        settings="results/config/preprocess.yaml",
        readable="results/qc/raw_scans.tsv",
        hdbet_weights=hdbet_weight_files(),
    output:
        image=result_path("stage", ".nii.gz", stage="preprocessed"),
        checks=result_path("stage", ".json", stage="preprocessed"),
        mask=result_path("stage", "_mask.nii.gz", stage="preprocessed"),
        transform=result_path("stage", "_to_mni.mat", stage="preprocessed"),
        qc=result_path("stage", "_qc.png", stage="qc"),
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
    shell:
        "python -m harmodiff.preprocess --config {input.settings:q} --input {input.raw:q} --output {output.image:q} "
        "--mask-output {output.mask:q} --transform-output {output.transform:q} --qc-output {output.qc:q} "
        "--threads {threads} > {log:q} 2>&1"


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
        "python -m harmodiff.scans readable --manifest {input.manifest:q} --output {output:q} > {log:q} 2>&1"
