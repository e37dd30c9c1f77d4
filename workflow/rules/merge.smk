"""Merge the fine-tuned models of each base model (one per task), choosing hyper-parameters on the
validation split; the merged tensors are stored once and evaluated on every constituent task."""


rule merge:
    input:
        base=base_checkpoint,
        # one entry per task, in the order of params.tasks
        finetuned=lambda wc: [FT_DIR.format(model=wc.model, task=task, ft=wc.ft, seed=wc.seed) + "/checkpoint"
                              for task in config["models"][wc.model]["tasks"]],
        validation=lambda wc: [task_data(task, config["merge"]["selection_split"])
                               for task in config["models"][wc.model]["tasks"]],
    output:
        directory(MERGE_DIR + "/checkpoint"),
    params:
        tasks=lambda wc: config["models"][wc.model]["tasks"],
        base=lambda wc: base_location(wc.model),
        variant=lambda wc: merge_variants()[wc.merge],
        storage=config["variant_storage"],
        arch=lambda wc: config["models"][wc.model]["arch"],
        selection_split=config["merge"]["selection_split"],
        batch_size=config["evaluate"]["batch_size"],
        max_length=lambda wc: config["models"][wc.model]["max_length"],
    threads: 1
    resources:
        **job_resources("merge"),
    log:
        MERGE_DIR + "/merge.log",
    benchmark:
        MERGE_DIR + "/merge.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/merge.py"
