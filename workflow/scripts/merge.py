from safetensors.torch import save_file

from methods.device import compute_device
from methods.evaluate.multitask import MultiTaskScorer
from methods.io.checkpoint import align_names, atomic_dir, check_finite, load_state_dict, write_json
from methods.io.delta_artifact import save_delta_checkpoint
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.merge.apply import MERGED_WEIGHTS
from methods.merge.search import search
from methods.prune.apply import DEFAULT_EXCLUDE
from methods.tasks import get_task

wc, params, inputs = snakemake.wildcards, snakemake.params, snakemake.input
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    variant = params.variant
    exclude = variant.get("exclude", DEFAULT_EXCLUDE[params.arch])
    finetuned = dict(zip(params.tasks, inputs.finetuned))
    validation = dict(zip(params.tasks, inputs.validation))
    manifest = Manifest("merge", variant["method"], {"fixed": variant.get("params", {}), "grid": variant.get("grid", {}),
                                                     "exclude": exclude},
                        {"base": params.base, **{f"finetuned:{t}": p for t, p in finetuned.items()}},
                        seeds={"mask": int(wc.mseed)})
    scorer = MultiTaskScorer({task: (get_task(task), finetuned[task], validation[task]) for task in finetuned},
                             params.batch_size, params.max_length, device=device)
    models = {task: load_state_dict(path) for task, path in finetuned.items()}
    base = align_names(load_state_dict(params.base), next(iter(models.values())), f"merge {wc.model}")
    merged, selection = search(variant["method"], base, models,
                               variant.get("params", {}), variant.get("grid", {}), scorer,
                               seed=int(wc.mseed), exclude=exclude, where=f"merge variant {wc.merge}", device=device)
    selection.update(selected_on=params.selection_split, reference_scores=scorer.reference,
                     task_scores=scorer.history)
    check_finite(merged, f"merge {wc.merge} of {wc.model}")
    with atomic_dir(snakemake.output[0]) as out:
        storage = None
        if params.storage == "delta":  # the merged tensors as a delta over the base
            storage = save_delta_checkpoint(merged, base, params.base, out)
        else:
            save_file({k: v.contiguous() for k, v in merged.items()}, out / MERGED_WEIGHTS, metadata={"format": "pt"})
        write_json(selection, out / "selection.json")
        manifest.write(out, selected_params=selection["params"], selected_on=params.selection_split, storage=storage)
    log.info("%s: chose %s on %s from %d grid points", variant["method"], selection["params"],
             params.selection_split, len(selection["trials"]))
