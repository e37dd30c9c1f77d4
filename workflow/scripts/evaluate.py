import hashlib
import json
from pathlib import Path

from methods.device import compute_device
from methods.evaluate.harness import harness_score, run_named_tasks
from methods.evaluate.perplexity import text_perplexity
from methods.evaluate.run import evaluate_task, load_task_model
from methods.io.checkpoint import (align_names, atomic_file, checkpoint_hash, file_sha256, load_state_dict, read_json,
                                   write_json)
from methods.io.delta_artifact import is_delta_checkpoint, storage_summary
from methods.io.job import job
from methods.io.manifest import library_versions
from methods.merge.apply import load_merged
from methods.quantize.apply import materialize
from methods.quantize.artifact import artifact_hash, load_artifact
from methods.tasks import get_task

params, inputs = snakemake.params, snakemake.input
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    spec = get_task(snakemake.wildcards.task)
    # A merge: the task's own fine-tuned checkpoint (its head) with the merged tensors over it.
    # A quantized variant: its source checkpoint with the decoded artifact over it.
    merged = Path(inputs.merged) if "merged" in inputs.keys() else None
    artifact = Path(inputs.artifact) if "artifact" in inputs.keys() else None
    overrides, quantization, weights = None, {}, checkpoint_hash(inputs.checkpoint)
    if merged:
        overrides = load_merged(merged)
        weights = hashlib.sha256((weights + checkpoint_hash(merged)).encode()).hexdigest()
    if artifact:
        quantized, _, quantization = load_artifact(artifact)
        base = None
        if quantization["params"]["target"] == "delta":
            base = align_names(load_state_dict(params.base), load_state_dict(inputs.checkpoint), str(artifact))
        overrides = materialize(quantized, base)
        weights = hashlib.sha256((weights + artifact_hash(artifact)).encode()).hexdigest()
    model, tokenizer = load_task_model(inputs.checkpoint, spec, overrides, device=device)
    cache = Path(params.harness_cache) / weights if params.harness_cache else None
    named_options = {"include_path": params.harness_include or None,
                     "allow_code_execution": params.allow_code_execution}
    record_extra = {}
    if params.harness_scoring:  # a task without data of the suite (instruct, code): lm-eval tasks by name
        # evaluate.harness_tasks run in the same call; each lm-eval task runs once
        names = list(dict.fromkeys(params.harness_scoring + (params.harness_tasks or [])))
        named, harness, named_samples = run_named_tasks(model, tokenizer, names, params.batch_size, cache,
                                                        **named_options)
        metrics = harness_score(named, params.harness_scoring, f"evaluate.harness_scoring.{spec.name}")
        samples = [{"harness_task": task, **sample} for task, rows in named_samples.items() for sample in rows]
        record_extra["harness_tasks"] = {"metrics": named, "summary": harness}
    else:
        metrics, samples, harness = evaluate_task(model, tokenizer, spec, inputs.data, params.batch_size,
                                                  params.max_length, cache)
    text = inputs.text if "text" in inputs.keys() else []  # an empty input when not configured
    if text:
        ppl = text_perplexity(model, tokenizer, text, **params.perplexity)
        metrics["perplexity"] = ppl["perplexity"]
        record_extra["perplexity"] = {**ppl, "text": str(text), "text_sha256": file_sha256(text)}
    if params.harness_tasks and not spec.is_encoder and not params.harness_scoring:
        named, summary, named_samples = run_named_tasks(model, tokenizer, params.harness_tasks, params.batch_size,
                                                        cache, **named_options)
        record_extra["harness_tasks"] = {"metrics": named, "summary": summary}
        samples += [{"harness_task": task, **sample} for task, rows in named_samples.items() for sample in rows]
    with atomic_file(snakemake.output.samples) as f:
        for sample in samples:
            f.write(json.dumps(sample, sort_keys=True, default=str) + "\n")
    identity = dict(params.identity)
    if artifact:  # storage as measured from the packed artifact
        identity.update(bpp=quantization["bits"]["quantized_bpp"], model_bpp=quantization["bits"]["model_bpp"])
    elif is_delta_checkpoint(stored_delta := merged or Path(inputs.checkpoint)):  # storage beyond the base
        identity.update(model_bpp=storage_summary(stored_delta)["bits_per_parameter"])
    if merged:  # record the hyper-parameters chosen on the selection split
        selection = read_json(merged / "selection.json")
        chosen = dict(selection["params"])
        if "ingredients" in selection["info"]:  # soup-greedy: which models made it into the soup
            chosen["ingredients"] = selection["info"]["ingredients"]
        identity.update(params=chosen, selected_on=selection["selected_on"])
    write_json({**identity, "split": params.split, "primary_metric": spec.primary, "metrics": metrics,
                "checkpoint_sha256": weights, "harness": harness, **record_extra, "versions": library_versions()},
               snakemake.output.metrics)
    log.info("%s: %s", spec.name, metrics)
