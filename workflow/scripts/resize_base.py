"""The base of a model with vocab_rule resize-base: its vocabulary grown to the published
checkpoints' (methods/io/published.py: resize_base_vocabulary)."""
from methods.io.checkpoint import atomic_dir
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.io.published import resize_base_vocabulary

wc, params, inputs = snakemake.wildcards, snakemake.params, snakemake.input
with job(snakemake.log[0], snakemake.threads) as log:
    references = dict(zip(params.tasks, inputs.finetuned))
    manifest = Manifest("resize-base", "mean-rows", {"rule": "resize-base"},
                        {"base": params.base, **{f"finetuned:{t}": p for t, p in references.items()}})
    with atomic_dir(snakemake.output[0]) as out:
        info = resize_base_vocabulary(params.base, references, out, f"models.{wc.model}")
        manifest.write(out, **info)
    log.info("%s: base vocabulary %d -> %d rows (new rows: the mean of the base's)", wc.model, *info["rows"])
