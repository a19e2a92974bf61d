rule anatomy:
    input:
        image=rules.preprocess.output.image,
        mask=rules.preprocess.output.mask,
        settings="results/config/anatomy.yaml",
    output:
        anatomy=result_path("stage", "_A.nii.gz", stage="anatomy"),
        coarse=result_path("stage", "_Acoarse.nii.gz", stage="anatomy"),
        settings=result_path("stage", "_A.json", stage="anatomy"),
    log:
        "results/logs/anatomy/{cohort}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/anatomy/{cohort}/{site}/{scan}.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m harmodiff.anatomy --config {input.settings:q} --input {input.image:q} --mask {input.mask:q} "
        "--output {output.anatomy:q} --coarse-output {output.coarse:q} > {log:q} 2>&1"
