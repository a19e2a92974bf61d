rule harmonize:
    input:
        checkpoint=rules.train.output.checkpoint,
        image="results/preprocessed/test/{site}/{scan}.nii.gz",
        mask="results/preprocessed/test/{site}/{scan}_mask.nii.gz",
    output:
        "results/harmonized/diffusion/{target}/{site}/{scan}.nii.gz",
    params:
        guidance=config["harmonize"]["guidance"],
        scale=config["harmonize"]["scale"],
        steps=config["harmonize"]["steps"],
        start=config["harmonize"]["start_from"],
        strength=config["harmonize"]["strength"],
        batch=config["harmonize"]["batch_size"],
        seed=config["harmonize"]["seed"],
    threads: config["harmonize"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    log:
        "results/logs/harmonize/diffusion/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/harmonize/diffusion/{target}/{site}/{scan}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m harmodiff.harmonize --checkpoint {input.checkpoint} --input {input.image} "
        "--mask {input.mask} --target-site {wildcards.target} --output {output} "
        "--guidance {params.guidance} --scale {params.scale} --steps {params.steps} "
        "--start-from {params.start} --strength {params.strength} --batch-size {params.batch} "
        "--seed {params.seed} --threads {threads} > {log} 2>&1"
