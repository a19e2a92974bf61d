# harmodiff: multi-site T1 harmonization with a patch-level 3D diffusion model.
# Data flow and decisions: docs/ and ../DESIGN. Each rule is one call of a harmodiff module.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/anatomy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/harmonize.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
