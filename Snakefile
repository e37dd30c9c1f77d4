"""Delta-compression benchmark suite: fine-tune -> prune deltas, quantize, merge -> evaluate -> report.

Run the embedded default with `make run`, another experiment with
`snakemake --cores N --configfile config/<name>.yaml`.
"""


include: "workflow/rules/common.smk"
include: "workflow/rules/zoo.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        report_targets(),
    default_target: True
