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


rule segment:
    input:
        image=segment_input_image,
        mask="results/preprocessed/test/{site}/{scan}_mask.nii.gz",
    output:
        gm="results/segmentation/{method}/{target}/{site}/{scan}_gm.nii.gz",
        wm="results/segmentation/{method}/{target}/{site}/{scan}_wm.nii.gz",
        csf="results/segmentation/{method}/{target}/{site}/{scan}_csf.nii.gz",
        volumes="results/segmentation/{method}/{target}/{site}/{scan}_volumes.json",
    params:
        prefix=lambda wildcards, output: output.volumes.removesuffix("_volumes.json"),
        backend=config["evaluation"]["segmentation"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "results/logs/segment/{method}/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/segment/{method}/{target}/{site}/{scan}.tsv"
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "python -m harmodiff.segment --input {input.image} --mask {input.mask} "
        "--output-prefix {params.prefix} --backend {params.backend} --threads {threads} > {log} 2>&1"


rule tissue_ratios:
    input:
        volumes=[e["volumes"] for e in evaluation_entries()],
    output:
        "results/tables/tissue_ratios.csv",
    params:
        methods=" ".join(e["method"] for e in evaluation_entries()),
        targets=" ".join(e["target"] for e in evaluation_entries()),
        scans=" ".join(e["scan"] for e in evaluation_entries()),
        subjects=" ".join(e["subject"] for e in evaluation_entries()),
        sites=" ".join(e["site"] for e in evaluation_entries()),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    log:
        "results/logs/tissue_ratios.log",
    benchmark:
        "results/benchmarks/tissue_ratios.tsv"
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m harmodiff.evaluate ratios --volumes {input.volumes} --methods {params.methods} "
        "--targets {params.targets} --scan-ids {params.scans} --subjects {params.subjects} "
        "--sites {params.sites} --output {output} > {log} 2>&1"


rule ttests:
    input:
        "results/tables/tissue_ratios.csv",
    output:
        "results/tables/ttests.csv",
    params:
        reference=config["evaluation"]["reference_site"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    log:
        "results/logs/ttests.log",
    benchmark:
        "results/benchmarks/ttests.tsv"
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m harmodiff.evaluate ttests --ratios {input} --reference {params.reference} "
        "--output {output} > {log} 2>&1"


rule mixed_models:
    input:
        "results/tables/tissue_ratios.csv",
    output:
        "results/tables/table2.csv",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    log:
        "results/logs/mixed_models.log",
    benchmark:
        "results/benchmarks/mixed_models.tsv"
    conda:
        "../../envs/stats.yaml"
    shell:
        "python -m harmodiff.evaluate mixed --ratios {input} --output {output} > {log} 2>&1"
