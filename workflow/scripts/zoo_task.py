from methods.io.job import job
from methods.zoo.tasks import generate_task, write_jsonl

with job(snakemake.log[0]) as log:
    splits = generate_task(snakemake.wildcards.task, snakemake.params.seed, snakemake.params.sizes)
    for split, rows in splits.items():
        write_jsonl(rows, snakemake.output[split])
        log.info("%s: %d %s examples", snakemake.wildcards.task, len(rows), split)
