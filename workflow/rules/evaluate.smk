"""Score every variant on its task: our evaluator for encoders, lm-evaluation-harness for decoders."""


rule evaluate:
    input:
        checkpoint=PRUNE_DIR + "/checkpoint",
        data=lambda wc: task_data(wc.task, config["evaluate"]["split"]),
    output:
        metrics=PRUNE_DIR + "/metrics.json",
        samples=PRUNE_DIR + "/samples.jsonl",
    params:
        split=config["evaluate"]["split"],
        batch_size=config["evaluate"]["batch_size"],
        max_length=lambda wc: config["models"][wc.model]["max_length"],
        identity=lambda wc: {
            "experiment": EXP, "model": wc.model, "arch": config["models"][wc.model]["arch"],
            "task": wc.task, "finetune": wc.ft, "seed": int(wc.seed), "prune": wc.prune,
            "prune_method": prune_variants()[wc.prune]["method"], "drop_rate": float(wc.rate),
            "mask_seed": int(wc.mseed),
        },
    threads: 1
    resources:
        mem_mb=2000,
    log:
        PRUNE_DIR + "/evaluate.log",
    benchmark:
        PRUNE_DIR + "/evaluate.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"
