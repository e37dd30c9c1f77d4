from methods import registry
from methods.io.checkpoint import atomic_dir, load_state_dict, save_like
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.prune.apply import DEFAULT_EXCLUDE, prune_state_dict

wc, params = snakemake.wildcards, snakemake.params
with job(snakemake.log[0], snakemake.threads) as log:
    variant = params.variant
    method_params = registry.get("prune", variant["method"]).resolve(
        {**variant.get("params", {}), "drop_rate": float(wc.rate)}, "params")
    exclude = variant.get("exclude", DEFAULT_EXCLUDE[params.arch])
    manifest = Manifest("prune", variant["method"], {**method_params, "exclude": exclude},
                        {"base": params.base, "finetuned": snakemake.input.finetuned},
                        seeds={"mask": int(wc.mseed)})
    state, stats = prune_state_dict(load_state_dict(params.base), load_state_dict(snakemake.input.finetuned),
                                    variant["method"], method_params, int(wc.mseed), exclude)
    with atomic_dir(snakemake.output[0]) as out:
        save_like(state, snakemake.input.finetuned, out)
        manifest.write(out, mask_generator="cpu float32, seeded per (mask seed, tensor name)", tensors=stats)
    pruned = [s for s in stats.values() if s["pruned"]]
    kept = sum(s["kept_fraction"] * s["numel"] for s in pruned) / max(1, sum(s["numel"] for s in pruned))
    log.info("%s rate %s: %d tensors pruned, %d kept as fine-tuned; realised keep rate %.4f",
             variant["method"], wc.rate, len(pruned), len(stats) - len(pruned), kept)
