"""Delta-parameter pruning of every fine-tuned model, per method, drop rate and mask seed."""


rule prune:
    input:
        base=base_checkpoint,
        finetuned=FT_DIR + "/checkpoint",
    output:
        directory(PRUNE_DIR + "/checkpoint"),
    params:
        base=lambda wc: base_location(wc.model),
        variant=lambda wc: prune_variants()[wc.prune],
        arch=lambda wc: config["models"][wc.model]["arch"],
    threads: 1
    resources:
        mem_mb=2000,
    log:
        PRUNE_DIR + "/prune.log",
    benchmark:
        PRUNE_DIR + "/prune.benchmark.tsv"
    conda:
        "../../envs/prune.yaml"
    script:
        "../scripts/prune.py"
