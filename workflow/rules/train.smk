RUN = config["train"]["run"]


# the settings the model is trained with, as the file train --config reads; rewritten (and the
# model retrained) only when one of these sections changes
rule training_settings:
    output:
        f"results/config/train-{RUN}.yaml",
    log:
        f"results/logs/training_settings/{RUN}.log",
    benchmark:
        f"results/benchmarks/training_settings/{RUN}.tsv"
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        text=settings_text(config, "train"),
    run:
        write_text(params.text, output[0])


# no training scans (a BIDS study with train.pretrained): the model is checked and exported alone
TRAINING_SCANS = ["--manifest", PATHS.manifest("train")] if len(PLAN.train) else []


rule train:
    input:
        **(manifest_inputs("train") if TRAINING_SCANS else {}),
        settings=rules.training_settings.output[0],
        pretrained=pretrained_model(),
    output:
        checkpoint=f"results/model/{RUN}/checkpoint.pt",
        loss=f"results/model/{RUN}/loss.csv",
        plot=f"results/model/{RUN}/loss.png",
    log:
        f"results/logs/train/{RUN}.log",
    benchmark:
        f"results/benchmarks/train/{RUN}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        runtime=10 if config["train"]["pretrained"] else 24 * 60,
        gpu=0 if config["train"]["pretrained"] else 1,
    params:
        state=f"results/model/{RUN}/state",
        export=lambda wildcards, output: os.path.dirname(output.checkpoint),
        pretrained=pretrained_args(),
        training_scans=TRAINING_SCANS,
    shell:
        "python -m harmodiff.train --config {input.settings:q} {params.training_scans:q} "
        "--output-dir {params.state:q} --resume "
        "--export-dir {params.export:q} {params.pretrained:q} --threads {threads} > {log:q} 2>&1"


# a target site the model was not trained on (config target_sites naming a site whose scans in the scan
# sheet are target-only, cohort target): its token learned from those scans with the network frozen
rule learn_site:
    input:
        unpack(lambda wildcards: manifest_inputs(f"learn_site-{wildcards.target}")),
        checkpoint=rules.train.output.checkpoint,
        settings="results/config/learn_site.yaml",
    output:
        site=PATHS.learned_site(RUN, "{target}"),
        loss=PATHS.learned_site(RUN, "{target}", ".site_loss.png"),
    log:
        f"results/logs/learn_site/{RUN}/{{target}}.log",
    benchmark:
        f"results/benchmarks/learn_site/{RUN}/{{target}}.tsv"
    wildcard_constraints:
        target="|".join(re.escape(site) for site in PLAN.learned_sites) or "(?!)",
    conda:
        "../../envs/torch.yaml"
    threads: config["learn_site"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1,
    shell:
        "python -m harmodiff.sites learn --config {input.settings:q} --checkpoint {input.checkpoint:q} "
        "--manifest {input.manifest:q} --site {wildcards.target:q} --output {output.site:q} "
        "--threads {threads} > {log:q} 2>&1"
