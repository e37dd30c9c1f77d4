"""Delta-parameter pruning of every fine-tuned model, per method, drop rate and mask seed."""


rule prune:
    input:
        base=base_checkpoint,
        finetuned=FT_DIR + "/checkpoint",
        # data-driven rules (importance norms, DAREx-q's q): labelled validation, unlabelled train inputs
        validation=lambda wc: task_data(wc.task, "validation"),
        calibration=lambda wc: task_data(wc.task, "train"),
    output:
        directory(PRUNE_DIR + "/checkpoint"),
    params:
        base=lambda wc: base_location(wc.model),
        variant=lambda wc: prune_variants()[wc.prune],
        storage=config["variant_storage"],
        arch=lambda wc: config["models"][wc.model]["arch"],
        batch_size=config["evaluate"]["batch_size"],
        max_length=lambda wc: config["models"][wc.model]["max_length"],
        calibration_examples=lambda wc: prune_variants()[wc.prune].get("calibration_examples", 128),
    threads: 1
    resources:
        **job_resources("prune"),
    log:
        PRUNE_DIR + "/prune.log",
    benchmark:
        PRUNE_DIR + "/prune.benchmark.tsv"
    conda:
        "../../envs/prune.yaml"
    script:
        "../scripts/prune.py"


rule delta_diagnostics:
    """Per fine-tuned model: delta statistics per tensor and per layer, and what the DAREx decision
    procedure recommends at each configured drop rate."""
    input:
        base=base_checkpoint,
        finetuned=FT_DIR + "/checkpoint",
        calibration=lambda wc: task_data(wc.task, "train"),
    output:
        tensors=FT_DIR + "/diagnostics/tensors.csv",
        layers=FT_DIR + "/diagnostics/layers.csv",
        recommendation=FT_DIR + "/diagnostics/recommendation.json",
    params:
        base=lambda wc: base_location(wc.model),
        arch=lambda wc: config["models"][wc.model]["arch"],
        drop_rates=sorted({float(r) for v in config["prune"] for r in v["drop_rates"] if 0 < float(r) < 1}),
        batch_size=config["evaluate"]["batch_size"],
        max_length=lambda wc: config["models"][wc.model]["max_length"],
    threads: 1
    resources:
        **job_resources("prune"),
    log:
        FT_DIR + "/diagnostics/diagnostics.log",
    conda:
        "../../envs/prune.yaml"
    script:
        "../scripts/delta_diagnostics.py"
