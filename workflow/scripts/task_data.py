from methods.data.jsonl import write_jsonl
from methods.data.prepare import SPLITS, prepare_task
from methods.io.job import job

with job(snakemake.log[0]) as log:
    splits = prepare_task(snakemake.wildcards.task, snakemake.params.data, snakemake.params.zoo)
    for split in SPLITS:
        write_jsonl(splits[split], snakemake.output[split])
        log.info("%s: %d %s examples", snakemake.wildcards.task, len(splits[split]), split)
