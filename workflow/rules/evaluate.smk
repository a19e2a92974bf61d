rule leakage:
    input:
        images=stage_files("preprocessed", ".nii.gz"),
        masks=stage_files("preprocessed", "_mask.nii.gz"),
        anatomy=stage_files("anatomy", "_A.nii.gz"),
    output:
        table="results/tables/leakage.csv",
    params:
        sites=" ".join(SCANS["site"]),
        folds=config.get("evaluation", {}).get("leakage_folds", 3),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    log:
        "results/logs/leakage.log",
    benchmark:
        "results/benchmarks/leakage.tsv"
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m harmodiff.leakage --images {input.images} --masks {input.masks} "
        "--anatomy {input.anatomy} --sites {params.sites} --folds {params.folds} "
        "--output {output.table} > {log} 2>&1"
