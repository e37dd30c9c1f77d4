from pathlib import Path

import pandas as pd

from methods.data.lm_eval_scored import has_suite_data
from methods.device import compute_device
from methods.io.checkpoint import align_names, atomic_file, load_state_dict, write_json
from methods.io.job import job
from methods.prune.apply import DEFAULT_EXCLUDE
from methods.evaluate.run import load_task_model
from methods.prune.calibration import collect_input_stats, input_means
from methods.prune.diagnostics import diagnose
from methods.prune.fit import CALIBRATION_EXAMPLES, input_batches
from methods.tasks import get_task

wc, params, inputs, output = snakemake.wildcards, snakemake.params, snakemake.input, snakemake.output
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    finetuned = load_state_dict(inputs.finetuned)
    base = align_names(load_state_dict(params.base), finetuned, f"diagnostics {wc.model}/{wc.task}")
    exclude = DEFAULT_EXCLUDE[params.arch]  # the tensors the papers' DPP touches
    means = None
    if has_suite_data(wc.task):
        spec = get_task(wc.task)
        model, tokenizer = load_task_model(inputs.finetuned, spec, device=device)
        batches = input_batches(tokenizer, spec, Path(inputs.calibration), CALIBRATION_EXAMPLES, params.batch_size,
                                params.max_length)
        means = input_means(collect_input_stats(model, batches)) if batches else None
        del model
    else:  # a task without data of the suite (instruct, code): no inputs, so no model to load
        log.info("%s has no calibration inputs: statistics of the delta alone", wc.task)
    tensors, layers, recommendations = diagnose(base, finetuned, exclude=exclude, input_means=means,
                                                drop_rates=params.drop_rates, arch=params.arch, device=device)
    for path, rows in ((output.tensors, tensors), (output.layers, layers)):
        with atomic_file(path) as f:
            pd.DataFrame(rows).to_csv(f, index=False)
    write_json({"model": wc.model, "task": wc.task, "finetune": wc.ft, "seed": int(wc.seed),
                "recommendations": recommendations}, output.recommendation)
    model_row = layers[-1]
    log.info("%s/%s: max|delta| %.3g, NOD %.3g; recommended at p=%s: %s", wc.model, wc.task, model_row["max_abs"],
             model_row["norm_of_delta"], recommendations[-1]["drop_rate"], recommendations[-1]["method"])
