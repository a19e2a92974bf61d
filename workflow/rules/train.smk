RUN = config["train"]["run"]


rule train:
    input:
        **manifest_inputs("train"),
        pretrained=pretrained_model(),
    output:
        checkpoint=f"results/model/{RUN}/checkpoint.pt",
        loss=f"results/model/{RUN}/loss.csv",
        plot=f"results/model/{RUN}/loss.png",
    params:
        settings=train_settings_json(),
        state=f"results/model/{RUN}/state",
        export=lambda wildcards, output: os.path.dirname(output.checkpoint),
        pretrained=pretrained_args(),
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        runtime=10 if config["train"].get("pretrained") else 24 * 60,
        gpu=0 if config["train"].get("pretrained") else 1,
    log:
        f"results/logs/train/{RUN}.log",
    benchmark:
        f"results/benchmarks/train/{RUN}.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m harmodiff.train --config '{params.settings}' --manifest {input.manifest} "
        "--output-dir {params.state} --resume "
        "--export-dir {params.export} {params.pretrained} --threads {threads} > {log} 2>&1"
