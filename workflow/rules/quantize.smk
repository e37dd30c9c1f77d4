"""Weight quantization of fine-tuned (or pruned) models, per method and code width; the packed
artifact is the stored variant, and evaluation decodes it over the source checkpoint."""


rule quantize:
    input:
        source=quantize_source,
        # a delta target, or a pruned source stored as a delta checkpoint, needs the base
        base=base_checkpoint,
        calibration=lambda wc: task_data(wc.task, "train"),
    output:
        artifact=directory(QUANT_DIR + "/artifact"),
    params:
        base=lambda wc: base_location(wc.model),
        variant=lambda wc: quantize_variants()[wc.quant],
        batch_size=config["evaluate"]["batch_size"],
        max_length=lambda wc: config["models"][wc.model]["max_length"],
    threads: 1
    resources:
        **job_resources("prune"),
    log:
        QUANT_DIR + "/quantize.log",
    benchmark:
        QUANT_DIR + "/quantize.benchmark.tsv"
    conda:
        "../../envs/prune.yaml"
    script:
        "../scripts/quantize.py"


rule evaluate_quantized:
    input:
        checkpoint=quantize_source,
        artifact=QUANT_DIR + "/artifact",
        # a delta target, or a pruned source stored as a delta checkpoint, needs the base
        base=base_checkpoint,
        data=lambda wc: task_data(wc.task, config["evaluate"]["split"]),
        text=perplexity_text,
    output:
        metrics=QUANT_DIR + "/metrics.json",
        samples=QUANT_DIR + "/samples.jsonl",
    params:
        **EVALUATION_PARAMS,
        base=lambda wc: base_location(wc.model),
        identity=lambda wc: quantize_identity(wc),
    threads: 1
    group:
        "evaluation"
    resources:
        **job_resources("evaluate"),
    log:
        QUANT_DIR + "/evaluate.log",
    benchmark:
        QUANT_DIR + "/evaluate.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"
