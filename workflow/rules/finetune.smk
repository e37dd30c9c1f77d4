"""Fine-tune each model on each of its tasks, per optimizer variant and seed."""


rule finetune:
    input:
        base=base_checkpoint,
        train=lambda wc: task_data(wc.task, "train"),
    output:
        directory(FT_DIR + "/checkpoint"),
    params:
        base=lambda wc: base_location(wc.model),
        model=lambda wc: config["models"][wc.model],
        variant=lambda wc: finetune_variants()[wc.ft],
        budget=lambda wc: {**config["finetune"][config["models"][wc.model]["arch"]],
                           **config["finetune"].get("tasks", {}).get(wc.task, {})},
    threads: 2
    resources:
        **job_resources("train"),
    log:
        FT_DIR + "/finetune.log",
    benchmark:
        FT_DIR + "/finetune.benchmark.tsv"
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/finetune.py"
