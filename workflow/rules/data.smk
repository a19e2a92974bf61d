SYNTH = synthetic_config(config)


rule synth:
    output:
        sheet="results/synthetic/scans.tsv",
        scans=[f"results/synthetic/{p}" for p in SYNTH["paths"]] if SYNTH else [],
        truth="results/synthetic/truth/subjects.tsv",
        truth_images=[f"results/synthetic/{p}" for p in SYNTH["truth"]] if SYNTH else [],
    params:
        args=SYNTH["args"] if SYNTH else "",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        "results/logs/synth.log",
    benchmark:
        "results/benchmarks/synth.tsv"
    conda:
        "../../envs/preprocess.yaml"
    shell:
        "python -m harmodiff.synth results/synthetic {params.args} --quiet > {log} 2>&1"
