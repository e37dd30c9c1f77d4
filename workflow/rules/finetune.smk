"""Fine-tune each model on each of its tasks, per optimizer variant and seed; or, for a task with a
published checkpoint (models.<name>.finetuned), import that checkpoint instead of training."""


rule finetune:
    input:
        base=base_checkpoint,
        train=lambda wc: task_data(wc.task, "train"),
    output:
        directory(FT_DIR + "/checkpoint"),
    wildcard_constraints:
        model=TRAINED_MODEL,  # not the (model, task) pairs with a published checkpoint
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


rule import_finetuned:
    """The published checkpoint of models.<model>.finetuned.<task> as the task's fine-tuned model:
    linked (safetensors) or converted (PyTorch pickles), checked against the base's vocabulary. The
    optimizer label and seed in the path only name it: every (optimizer, seed) gets the same weights.
    No training data is read (the task's data still serves evaluation and merge selection)."""
    input:
        base=source_base_checkpoint,  # for the vocabulary check
    output:
        directory(FT_DIR + "/checkpoint"),
    wildcard_constraints:
        model=PUBLISHED_MODEL,  # only the (model, task) pairs with a published checkpoint
    params:
        entry=lambda wc: config["models"][wc.model]["finetuned"][wc.task],
        base=lambda wc: source_base_location(wc.model),
        vocab_rule=lambda wc: config["models"][wc.model].get("vocab_rule", "strict"),
    threads: 1
    resources:
        **job_resources("import"),
    log:
        FT_DIR + "/import.log",
    benchmark:
        FT_DIR + "/import.benchmark.tsv"
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/import_finetuned.py"


rule resize_base_vocabulary:
    """vocab_rule resize-base (MergeLM): the model's base with the published checkpoints' vocabulary,
    each new embedding row the mean of the base's rows; every stage then takes deltas against it."""
    input:
        base=source_base_checkpoint,
        finetuned=lambda wc: list(published_references(wc.model).values()),
    output:
        directory(RESULTS + "/{model}/base-resized"),
    params:
        base=lambda wc: source_base_location(wc.model),
        tasks=lambda wc: list(published_references(wc.model)),
    threads: 1
    resources:
        **job_resources("import"),
    log:
        RESULTS + "/logs/resize_base_vocabulary/{model}.log",
    conda:
        "../../envs/train.yaml"
    script:
        "../scripts/resize_base.py"
