import json
import tempfile
from pathlib import Path

from methods.evaluate.encoder import evaluate_encoder
from methods.evaluate.harness import run_harness
from methods.io.checkpoint import atomic_file, checkpoint_hash, write_json
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.tasks import get_task
from methods.zoo.tasks import read_jsonl

params = snakemake.params
with job(snakemake.log[0], snakemake.threads) as log:
    spec = get_task(snakemake.wildcards.task)
    manifest = Manifest("evaluate", "lm-eval" if not spec.is_encoder else "encoder-evaluator",
                        {"split": params.split, "batch_size": params.batch_size})
    if spec.is_encoder:
        metrics, samples = evaluate_encoder(snakemake.input.checkpoint, spec, read_jsonl(snakemake.input.data),
                                            params.batch_size, params.max_length)
        harness = None
    else:
        with tempfile.TemporaryDirectory() as include_dir:
            metrics, harness, samples = run_harness(snakemake.input.checkpoint, spec, snakemake.input.data,
                                                    Path(include_dir), params.batch_size)
    with atomic_file(snakemake.output.samples) as f:
        for sample in samples:
            f.write(json.dumps(sample, sort_keys=True, default=str) + "\n")
    record = {**params.identity, "split": params.split, "primary_metric": spec.primary, "metrics": metrics,
              "checkpoint_sha256": checkpoint_hash(snakemake.input.checkpoint), "harness": harness}
    record.update({k: v for k, v in manifest.record.items() if k == "versions"})
    write_json(record, snakemake.output.metrics)
    log.info("%s: %s", spec.name, metrics)
