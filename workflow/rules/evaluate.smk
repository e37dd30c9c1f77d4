"""Score every variant on its task: our evaluator for encoders, lm-evaluation-harness for decoders."""

# What every evaluation rule passes to workflow/scripts/evaluate.py besides the row's identity.
EVALUATION_PARAMS = {
    "split": config["evaluate"]["split"],
    "batch_size": config["evaluate"]["batch_size"],
    "max_length": lambda wc: config["models"][wc.model]["max_length"],
    "perplexity": perplexity_settings(),
    "harness_tasks": config["evaluate"].get("harness_tasks", []),
    # tasks without data of the suite (instruct, code): the lm-eval tasks that score them
    "harness_scoring": lambda wc: config["evaluate"].get("harness_scoring", {}).get(wc.task, []),
    "harness_include": config["evaluate"].get("harness_include", ""),
    "allow_code_execution": config["evaluate"].get("allow_code_execution", False),
    "harness_cache": harness_cache(),
}


rule evaluate:
    input:
        checkpoint=PRUNE_DIR + "/checkpoint",
        base=base_checkpoint,  # a delta checkpoint is rebuilt over it
        data=lambda wc: task_data(wc.task, config["evaluate"]["split"]),
        text=perplexity_text,
    output:
        metrics=PRUNE_DIR + "/metrics.json",
        samples=PRUNE_DIR + "/samples.jsonl",
    params:
        **EVALUATION_PARAMS,
        identity=lambda wc: identity(wc, "prune", prune_variants()[wc.prune]["method"], wc.prune,
                                     drop_rate=float(wc.rate), mask_seed=int(wc.mseed),
                                     params={**prune_variants()[wc.prune].get("params", {}),
                                             **({"q_rule": prune_variants()[wc.prune]["q_rule"]["rule"]}
                                                if "q_rule" in prune_variants()[wc.prune] else {}),
                                             "drop_rate": float(wc.rate)}),
    threads: 1
    group:
        "evaluation"
    resources:
        **job_resources("evaluate"),
    log:
        PRUNE_DIR + "/evaluate.log",
    benchmark:
        PRUNE_DIR + "/evaluate.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_finetuned:
    input:
        checkpoint=FT_DIR + "/checkpoint",
        data=lambda wc: task_data(wc.task, config["evaluate"]["split"]),
        text=perplexity_text,
    output:
        metrics=FT_DIR + "/metrics.json",
        samples=FT_DIR + "/samples.jsonl",
    params:
        **EVALUATION_PARAMS,
        identity=lambda wc: identity(wc, "finetune", finetune_variants()[wc.ft]["method"], wc.ft),
    threads: 1
    group:
        "evaluation"
    resources:
        **job_resources("evaluate"),
    log:
        FT_DIR + "/evaluate.log",
    benchmark:
        FT_DIR + "/evaluate.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"


rule evaluate_merge:
    input:
        checkpoint=lambda wc: FT_DIR.format(model=wc.model, task=wc.task, ft=wc.ft, seed=wc.seed) + "/checkpoint",
        merged=MERGE_DIR + "/checkpoint",
        base=base_checkpoint,
        data=lambda wc: task_data(wc.task, config["evaluate"]["split"]),
        text=perplexity_text,
    output:
        metrics=MERGE_DIR + "/eval~{task}/metrics.json",
        samples=MERGE_DIR + "/eval~{task}/samples.jsonl",
    params:
        **EVALUATION_PARAMS,
        identity=lambda wc: identity(wc, "merge", merge_variants()[wc.merge]["method"], wc.merge,
                                     mask_seed=int(wc.mseed)),
    threads: 1
    group:
        "evaluation"
    resources:
        **job_resources("evaluate"),
    log:
        MERGE_DIR + "/eval~{task}/evaluate.log",
    benchmark:
        MERGE_DIR + "/eval~{task}/evaluate.benchmark.tsv"
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate.py"
