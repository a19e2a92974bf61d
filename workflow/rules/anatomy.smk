rule anatomy:
    input:
        image="results/preprocessed/{cohort}/{site}/{scan}.nii.gz",
        mask="results/preprocessed/{cohort}/{site}/{scan}_mask.nii.gz",
        settings="results/config/anatomy.yaml",
    output:
        anatomy="results/anatomy/{cohort}/{site}/{scan}_A.nii.gz",
        coarse="results/anatomy/{cohort}/{site}/{scan}_Acoarse.nii.gz",
        settings="results/anatomy/{cohort}/{site}/{scan}_A.json",
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
