from pathlib import Path

from methods import registry
from methods.device import compute_device
from methods.io.checkpoint import align_names, atomic_dir, load_state_dict, save_like
from methods.io.delta_artifact import save_delta_checkpoint
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.prune.apply import exclusion, prune_state_dict
from methods.prune.fit import DATA_DRIVEN, PruneFitter, TaskData
from methods.tasks import get_task

wc, params, inputs = snakemake.wildcards, snakemake.params, snakemake.input
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    variant = params.variant
    drop_rate = float(wc.rate)
    method_params = registry.get("prune", variant["method"]).resolve(
        {**variant.get("params", {}), "drop_rate": drop_rate}, "params")
    exclude = exclusion(variant, params.arch)
    finetuned = load_state_dict(inputs.finetuned)
    base = align_names(load_state_dict(params.base), finetuned, f"prune {wc.model}/{wc.task}")
    pruner, fitted = None, {}
    if variant["method"] in DATA_DRIVEN:
        data = TaskData(get_task(wc.task), Path(inputs.finetuned), Path(inputs.validation), Path(inputs.calibration),
                        params.batch_size, params.max_length, params.calibration_examples)
        fitter = PruneFitter(data, base, finetuned, exclude, int(wc.mseed), device=device)
        method_params, pruner, fitted = fitter.fit(variant["method"], method_params, variant.get("q_rule"), drop_rate)
        log.info("%s: fitted on the data: %s", variant["method"], {k: v for k, v in fitted.items() if k != "scan"})
    recorded = {k: v for k, v in method_params.items() if k != "norms"}  # norms: a tensor per layer
    manifest = Manifest("prune", variant["method"], {**recorded, "exclude": exclude, "q_rule": variant.get("q_rule")},
                        {"base": params.base, "finetuned": inputs.finetuned}, seeds={"mask": int(wc.mseed)})
    state, stats = prune_state_dict(base, finetuned, variant["method"], method_params, int(wc.mseed), exclude, pruner,
                                    device=device)
    with atomic_dir(snakemake.output[0]) as out:
        storage = None
        if params.storage == "delta":
            storage = save_delta_checkpoint(state, base, params.base, out, template_dir=inputs.finetuned)
            log.info("stored as a delta over the base: %d bytes, %.3f of a full copy, %.3f bits per parameter",
                     storage["file_bytes"], storage["size_ratio"], storage["bits_per_parameter"])
        else:
            save_like(state, inputs.finetuned, out)
        manifest.write(out, mask_generator="cpu float32, seeded per (mask seed, tensor name)", fitted=fitted,
                       tensors=stats, storage=storage)
    pruned = [s for s in stats.values() if s["pruned"]]
    kept = sum(s["kept_fraction"] * s["numel"] for s in pruned) / max(1, sum(s["numel"] for s in pruned))
    log.info("%s rate %s: %d tensors pruned, %d kept as fine-tuned; realised keep rate %.4f",
             variant["method"], wc.rate, len(pruned), len(stats) - len(pruned), kept)
