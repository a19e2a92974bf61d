SYNTH = synthetic_config(config)


rule synth:
    input:
        settings="results/config/synth.yaml",
    output:
        sheet="results/synthetic/scans.tsv",
        scans=[f"results/synthetic/{p}" for p in SYNTH["paths"]] if SYNTH else [],
        truth="results/synthetic/truth/subjects.tsv",
        truth_images=[f"results/synthetic/{p}" for p in SYNTH["truth"]] if SYNTH else [],
    log:
        "results/logs/synth.log",
    benchmark:
        "results/benchmarks/synth.tsv"
    conda:
        "../../envs/preprocess.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m harmodiff.synth results/synthetic --config {input.settings:q} --quiet > {log:q} 2>&1"


# the per-scan lists jobs read, one TSV each (harmodiff.layout); rewritten when their rows change
rule manifest:
    output:
        result_path("manifest", ".tsv"),
    log:
        "results/logs/manifest/{name}.log",
    benchmark:
        "results/benchmarks/manifest/{name}.tsv"
    wildcard_constraints:
        name="|".join(re.escape(name) for name in MANIFESTS.names()),
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        table=lambda wildcards: manifest_text(MANIFESTS.table(wildcards.name)),
    run:
        write_text(params.table, output[0])


# the settings a stage's jobs read (harmodiff.config.STAGE_SECTIONS), as the file their --config
# takes; rewritten, and the stage's jobs rerun, only when one of those sections changes
rule stage_settings:
    output:
        "results/config/{stage}.yaml",
    log:
        "results/logs/stage_settings/{stage}.log",
    benchmark:
        "results/benchmarks/stage_settings/{stage}.tsv"
    wildcard_constraints:
        stage="preprocess|anatomy|harmonize|synth|learn_site",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        text=lambda wildcards: settings_text(config, wildcards.stage),
    run:
        write_text(params.text, output[0])
