rule anatomy:
    input:
        image="results/preprocessed/{cohort}/{site}/{scan}.nii.gz",
        mask="results/preprocessed/{cohort}/{site}/{scan}_mask.nii.gz",
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
    params:
        alpha=config["anatomy"]["alpha"],
        sigma=config["anatomy"]["sigma"],
        erosion=config["anatomy"]["normalize_erosion"],
        factor=config["anatomy"]["coarse_factor"],
        mode=config["anatomy"]["coarse_mode"],
        patch=" ".join(str(s) for s in config["grid"]["patch_shape"]),
    shell:
        "python -m harmodiff.anatomy --input {input.image} --mask {input.mask} "
        "--output {output.anatomy} --coarse-output {output.coarse} --alpha {params.alpha} "
        "--sigma {params.sigma} --normalize-erosion {params.erosion} --coarse-factor {params.factor} --coarse-mode {params.mode} "
        "--patch-shape {params.patch} > {log} 2>&1"
