rule leakage:
    input:
        **manifest_inputs("leakage"),
    output:
        table="results/tables/leakage.csv",
    log:
        "results/logs/leakage.log",
    benchmark:
        "results/benchmarks/leakage.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        folds=config["evaluation"]["leakage_folds"],
    shell:
        "python -m harmodiff.leakage anatomy --manifest {input.manifest:q} --folds {params.folds:q} "
        "--output {output.table:q} > {log:q} 2>&1"


# a segmentation job (of a harmodiff image, or of the truth at a target): one shell for both
SEGMENT_SHELL = (
    "python -m harmodiff.segment --input {input.image:q} --mask {input.mask:q} "
    "--output-prefix {params.prefix:q} --backend {params.backend:q} --fractions {params.fractions:q} "
    "--threads {threads} > {log:q} 2>&1"
)


rule segment:
    input:
        image=segment_input_image,
        mask=lambda wildcards: PATHS.test_mask(wildcards.site, wildcards.scan),
    output:
        gm=result_path("segmentation", "_gm.nii.gz"),
        wm=result_path("segmentation", "_wm.nii.gz"),
        csf=result_path("segmentation", "_csf.nii.gz"),
        volumes=result_path("segmentation", "_volumes.json"),
    log:
        "results/logs/segment/{method}/{target}/{site}/{scan}.log",
    benchmark:
        "results/benchmarks/segment/{method}/{target}/{site}/{scan}.tsv"
    conda:
        "../../envs/spm.yaml" if config["evaluation"]["segmentation"] == "spm" else "../../envs/preprocess.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        prefix=lambda wildcards, output: output.volumes.removesuffix("_volumes.json"),
        backend=config["evaluation"]["segmentation"],
        fractions=config["evaluation"]["tissue_fractions"],
    shell:
        SEGMENT_SHELL


rule tissue_ratios:
    input:
        **manifest_inputs("segmentations"),
    output:
        report("results/tables/tissue_ratios.csv", caption="../report/tissue_ratios.rst", category="Tables"),
    log:
        "results/logs/tissue_ratios.log",
    benchmark:
        "results/benchmarks/tissue_ratios.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        combat=["--combat-reference", PLAN.reference_site] if "combat" in METHODS else [],
    shell:
        "python -m harmodiff.evaluate ratios --manifest {input.manifest:q} {params.combat:q} "
        "--output {output:q} > {log:q} 2>&1"


rule ttests:
    input:
        "results/tables/tissue_ratios.csv",
    output:
        report("results/tables/ttests.csv", caption="../report/ttests.rst", category="Tables"),
    log:
        "results/logs/ttests.log",
    benchmark:
        "results/benchmarks/ttests.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        reference=PLAN.reference_site,
    shell:
        "python -m harmodiff.evaluate ttests --ratios {input:q} --reference {params.reference:q} "
        "--output {output:q} > {log:q} 2>&1"


# the traveling subjects' ICC(2,1) of each ratio across sites: are the volumes reproducible?
rule icc:
    input:
        "results/tables/tissue_ratios.csv",
    output:
        report("results/tables/icc.csv", caption="../report/icc.rst", category="Tables"),
    log:
        "results/logs/icc.log",
    benchmark:
        "results/benchmarks/icc.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m harmodiff.evaluate icc --ratios {input:q} --output {output:q} > {log:q} 2>&1"


rule mixed_models:
    input:
        "results/tables/tissue_ratios.csv",
    output:
        csv=report("results/tables/table2.csv", caption="../report/table2.rst", category="Tables"),
        markdown="results/tables/table2.md",
    log:
        "results/logs/mixed_models.log",
    benchmark:
        "results/benchmarks/mixed_models.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m harmodiff.tables table2 --ratios {input:q} --output-csv {output.csv:q} "
        "--output-md {output.markdown:q} > {log:q} 2>&1"


rule similarity:
    input:
        **manifest_inputs("similarity"),
    output:
        "results/tables/similarity_pairs.csv",
    log:
        "results/logs/similarity.log",
    benchmark:
        "results/benchmarks/similarity.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m harmodiff.metrics pairs --manifest {input.manifest:q} --output {output:q} > {log:q} 2>&1"


# can a classifier still tell the site of each method's images (a subject held out at a time)?
rule site_classifier:
    input:
        **manifest_inputs("similarity"),
    output:
        report("results/tables/site_classifier.csv", caption="../report/site_classifier.rst", category="Tables"),
    log:
        "results/logs/site_classifier.log",
    benchmark:
        "results/benchmarks/site_classifier.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m harmodiff.leakage harmonized --manifest {input.manifest:q} --output {output:q} > {log:q} 2>&1"


rule table1:
    input:
        pairs="results/tables/similarity_pairs.csv",
        subjects=PATHS.manifest("sweep_subjects"),
    output:
        csv=report("results/tables/table1.csv", caption="../report/table1.rst", category="Tables"),
        markdown="results/tables/table1.md",
    log:
        "results/logs/table1.log",
    benchmark:
        "results/benchmarks/table1.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        sweep=[name for _, _, name in PLAN.sweep_settings()],
    shell:
        "python -m harmodiff.tables table1 --pairs {input.pairs:q} --sweep-methods {params.sweep:q} "
        "--sweep-manifest {input.subjects:q} --output-csv {output.csv:q} --output-md {output.markdown:q} > {log:q} 2>&1"


# each traveling subject rendered noise-free at a target site, on the working grid, segmented like
# the harmonized scans: the tissue ratios a perfect harmonization would give
rule truth_target_image:
    input:
        truth=result_path("truth_at_site", ".nii.gz"),
        truth_mask=result_path("truth_subject", "_mask.nii.gz"),
        like=subject_grid_reference,
    output:
        image="results/truth/{target}/{subject}.nii.gz",
        mask="results/truth/{target}/{subject}_mask.nii.gz",
    log:
        "results/logs/truth_target_image/{target}/{subject}.log",
    benchmark:
        "results/benchmarks/truth_target_image/{target}/{subject}.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "python -m harmodiff.metrics truth-image --truth {input.truth:q} --truth-mask {input.truth_mask:q} "
        "--like {input.like:q} --output {output.image:q} --mask-output {output.mask:q} > {log:q} 2>&1"


rule segment_truth:
    input:
        image=rules.truth_target_image.output.image,
        mask=rules.truth_target_image.output.mask,
    output:
        volumes=result_path("truth_target", "_volumes.json"),
    log:
        "results/logs/segment/truth/{target}/{subject}.log",
    benchmark:
        "results/benchmarks/segment/truth/{target}/{subject}.tsv"
    conda:
        "../../envs/spm.yaml" if config["evaluation"]["segmentation"] == "spm" else "../../envs/preprocess.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        prefix=lambda wildcards, output: output.volumes.removesuffix("_volumes.json"),
        backend=config["evaluation"]["segmentation"],
        fractions=config["evaluation"]["tissue_fractions"],
    shell:
        SEGMENT_SHELL


rule truth_scores:
    input:
        ratios="results/tables/tissue_ratios.csv",
        truth="results/synthetic/truth/subjects.tsv",
        # lambdas: only a synthetic cohort has these manifests
        similarity=lambda wildcards: manifest_and_files("truth_similarity"),
        targets=lambda wildcards: manifest_and_files("truth_targets"),
        preprocessing=lambda wildcards: manifest_and_files("truth_preprocessing"),
    output:
        preprocessing=report("results/tables/truth_preprocessing.csv", caption="../report/truth.rst", category="Truth"),
        ratios=report("results/tables/truth_ratios.csv", caption="../report/truth.rst", category="Truth"),
        similarity=report("results/tables/truth_similarity.csv", caption="../report/truth.rst", category="Truth"),
        summary=report("results/tables/truth_summary.csv", caption="../report/truth.rst", category="Truth"),
        summary_md="results/tables/truth_summary.md",
    log:
        "results/logs/truth_scores.log",
    benchmark:
        "results/benchmarks/truth_scores.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        similarity=PATHS.manifest("truth_similarity"),
        targets=PATHS.manifest("truth_targets"),
        preprocessing=PATHS.manifest("truth_preprocessing"),
    shell:
        "python -m harmodiff.tables truth --ratios {input.ratios:q} --truth {input.truth:q} "
        "--similarity-manifest {params.similarity:q} --preprocessing-manifest {params.preprocessing:q} "
        "--target-manifest {params.targets:q} --output-ratios {output.ratios:q} "
        "--output-similarity {output.similarity:q} --output-summary {output.summary:q} "
        "--output-summary-md {output.summary_md:q} --output-preprocessing {output.preprocessing:q} > {log:q} 2>&1"


# does each method keep the cohort's planted age effect in a study whose sites are confounded with
# age, and does harmonization pull a subject toward the target's training subjects?
rule biological_effect:
    input:
        ratios="results/tables/tissue_ratios.csv",
        truth="results/synthetic/truth/subjects.tsv",
        targets=lambda wildcards: manifest_and_files("truth_targets"),
    output:
        effects=report(
            "results/tables/biological_effect.csv", caption="../report/biological_effect.rst", category="Truth"
        ),
        pull=report("results/tables/target_pull.csv", caption="../report/target_pull.rst", category="Truth"),
    log:
        "results/logs/biological_effect.log",
    benchmark:
        "results/benchmarks/biological_effect.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        targets=PATHS.manifest("truth_targets"),
    shell:
        "python -m harmodiff.effects --ratios {input.ratios:q} --truth {input.truth:q} "
        "--target-manifest {params.targets:q} --output-effects {output.effects:q} --output-pull {output.pull:q} "
        "> {log:q} 2>&1"


rule figure2:
    input:
        **manifest_inputs("figure2"),
    output:
        png=report("results/figures/figure2.png", caption="../report/figure2.rst", category="Figures"),
        pdf="results/figures/figure2.pdf",
    log:
        "results/logs/figure2.log",
    benchmark:
        "results/benchmarks/figure2.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    params:
        subject=PLAN.figure_subject(),
    shell:
        "python -m harmodiff.figures figure2 --manifest {input.manifest:q} --subject {params.subject:q} "
        "--output {output.png:q} {output.pdf:q} > {log:q} 2>&1"


rule figure3:
    input:
        ratios="results/tables/tissue_ratios.csv",
        ttests="results/tables/ttests.csv",
    output:
        png=report("results/figures/figure3.png", caption="../report/figure3.rst", category="Figures"),
        pdf="results/figures/figure3.pdf",
    log:
        "results/logs/figure3.log",
    benchmark:
        "results/benchmarks/figure3.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    params:
        reference=PLAN.reference_site,
    shell:
        "python -m harmodiff.figures figure3 --ratios {input.ratios:q} --ttests {input.ttests:q} "
        "--reference {params.reference:q} --output {output.png:q} {output.pdf:q} > {log:q} 2>&1"


# the users' questions in one picture: biology kept, site still predictable, volumes reproducible
rule figure_questions:
    input:
        effects=rules.biological_effect.output.effects,
        classifier=rules.site_classifier.output[0],
        icc=rules.icc.output[0],
    output:
        png=report("results/figures/questions.png", caption="../report/questions.rst", category="Figures"),
        pdf="results/figures/questions.pdf",
    log:
        "results/logs/figure_questions.log",
    benchmark:
        "results/benchmarks/figure_questions.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=5,
    shell:
        "python -m harmodiff.figures questions --effects {input.effects:q} --site-classifier {input.classifier:q} "
        "--icc {input.icc:q} --output {output.png:q} {output.pdf:q} > {log:q} 2>&1"


rule loss_curve:
    input:
        rules.train.output.loss,
    output:
        png=report("results/figures/loss_curve.png", caption="../report/loss_curve.rst", category="Figures"),
        pdf="results/figures/loss_curve.pdf",
    log:
        "results/logs/loss_curve.log",
    benchmark:
        "results/benchmarks/loss_curve.tsv"
    conda:
        "../../envs/stats.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m harmodiff.figures loss --loss {input:q} --output {output.png:q} {output.pdf:q} > {log:q} 2>&1"
