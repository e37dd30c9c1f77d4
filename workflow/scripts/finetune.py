from methods import registry
from methods.device import cache_key, compute_device
from methods.finetune.train import Budget, finetune
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.io.store import reuse_or_make
from methods.tasks import get_task
from methods.data.jsonl import read_jsonl

wc, params = snakemake.wildcards, snakemake.params
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    spec = get_task(wc.task)
    variant = params.variant
    optimizer_params = registry.get("finetune", variant["method"]).resolve(variant.get("params"), "params")
    budget = Budget(steps=params.budget["steps"], batch_size=params.budget["batch_size"], lr=params.budget["lr"],
                    weight_decay=params.budget.get("weight_decay", 0.0),
                    warmup_ratio=params.budget.get("warmup_ratio", 0.0), max_length=params.model["max_length"])
    parents = {"base": params.base} if snakemake.input.base else {}
    manifest = Manifest("finetune", variant["method"], {**optimizer_params, **vars(budget)}, parents,
                        seeds={"finetune": int(wc.seed)})
    rows = read_jsonl(snakemake.input.train)

    def make(out):
        losses = finetune(params.base, spec, rows, out, optimizer=variant["method"],
                          optimizer_params=optimizer_params, budget=budget, seed=int(wc.seed), device=device)
        manifest.write(out, task=wc.task, base=str(params.base), first_loss=losses[0],
                       final_loss=sum(losses[-50:]) / len(losses[-50:]))
        log.info("fine-tuned %s on %s: loss %.3f -> %.3f", wc.model, wc.task, losses[0], losses[-1])

    # written atomically; with --cache, reused from an identical earlier fine-tuning (methods/io/store.py):
    # the key holds the base's and the data's content, not their paths
    reuse_or_make(snakemake.output[0], "finetune",
                  {"model": params.model, "task": wc.task, "seed": int(wc.seed), "variant": variant,
                   "optimizer_params": optimizer_params, "budget": vars(budget), **cache_key(device)},
                  {"base": params.base, "train": snakemake.input.train}, make)
