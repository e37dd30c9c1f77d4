"""A task's fine-tuned checkpoint from a published one (models.<name>.finetuned.<task>): linked or
converted, checked against the base's vocabulary, with the manifest a fine-tuning writes."""
from methods.io.checkpoint import atomic_dir
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.io.published import check_vocabulary, fetch, materialize, vocabulary_size

wc, params = snakemake.wildcards, snakemake.params
with job(snakemake.log[0], snakemake.threads) as log:
    where = f"models.{wc.model}.finetuned.{wc.task}"
    source, published = fetch(params.entry, where)
    rows, base_rows = vocabulary_size(source), vocabulary_size(params.base)
    check_vocabulary(base_rows, rows, params.vocab_rule, where, f"models.{wc.model}")
    # stage "finetune" with method "published": the checkpoint plays the fine-tuned model everywhere
    # (reports, costs); the optimizer label and seed of the path only name it (every (optimizer, seed)
    # of the config gets these same weights)
    manifest = Manifest("finetune", "published", published, {}, seeds={})
    with atomic_dir(snakemake.output[0]) as out:
        done = materialize(source, out)
        manifest.write(out, task=wc.task, base=str(params.base), published=published, vocabulary_rows=rows,
                       base_vocabulary_rows=base_rows, vocab_rule=params.vocab_rule, **done)
    log.info("%s: %s %s (%s weights; %d vocabulary rows, base %d)", where, published["source"],
             published.get("id", published.get("path")), done["weights"], rows, base_rows)
