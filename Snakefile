# harmodiff: multi-site T1 harmonization with a patch-level 3D diffusion model.
# Where each kind of change goes: docs/architecture.md; what the paper leaves open: docs/decisions.md.

import os

from snakemake.utils import min_version

min_version("9.0")


# the demo's config unless the run names its own: a section a user's file leaves out takes
# harmodiff.config's defaults, not the demo's values
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config/config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/anatomy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/harmonize.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
