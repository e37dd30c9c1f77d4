"""Collect every evaluation record into one tidy table (one row per metric value)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from methods.evaluate.harness import named_task_primary
from methods.io.checkpoint import read_json
from methods.tasks import METRIC_RANGES

# stage: finetune (the fine-tuned model itself), prune, quantize or merge; method: the registered
# method; variant: its label in the config; params: the method's parameters as JSON (for merges, the
# ones chosen on `selected_on`). Quantized variants carry their code width `bits` and the storage
# measured from the packed artifact: `bpp` per quantized parameter, `model_bpp` per model parameter
# (pruned and merged variants: `model_bpp` measured from their delta checkpoints); `calibration_seed`
# is the quantizer's calibration sample.
IDENTITY = ["experiment", "model", "arch", "task", "finetune", "seed", "stage", "method", "variant",
            "drop_rate", "mask_seed", "calibration_seed", "bits", "bpp", "model_bpp", "params", "selected_on",
            "split"]
OPTIONAL = {"calibration_seed", "bits", "bpp", "model_bpp"}  # absent from records of some stages
# samples: the per-example outputs next to the record (paired significance tests read them)
COLUMNS = IDENTITY + ["metric", "value", "stderr", "is_primary", "checkpoint_sha256", "samples"]


class MetricOutOfRange(ValueError):
    pass


def _rows(path, record: dict, task: str, metrics: dict, primary: str, checked: bool) -> list[dict]:
    identity = {k: record.get(k) if k in OPTIONAL else record[k] for k in IDENTITY}
    identity["params"] = json.dumps(identity["params"], sort_keys=True)
    identity["task"] = task
    rows = []
    for name, value in metrics.items():
        if name.endswith("_stderr"):
            continue
        low, high = METRIC_RANGES.get(name, (-math.inf, math.inf)) if not checked else METRIC_RANGES[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise MetricOutOfRange(f"{path}: metric {name} = {value!r} is outside [{low}, {high}] (task {task})")
        rows.append({**identity, "metric": name, "value": float(value),
                     "stderr": metrics.get(f"{name}_stderr", float("nan")),
                     "is_primary": name == primary, "checkpoint_sha256": record["checkpoint_sha256"],
                     "samples": str(Path(path).with_name("samples.jsonl"))})
    return rows


def records_to_frame(paths: list[str | Path]) -> pd.DataFrame:
    """One row per metric value. lm-eval tasks run by name (evaluate.harness_tasks) become rows of
    their own with task ``lm-eval:<name>``; their metric names are lm-eval's."""
    rows = []
    for path in paths:
        record = read_json(path)
        rows += _rows(path, record, record["task"], record["metrics"], record["primary_metric"], checked=True)
        for task, metrics in record.get("harness_tasks", {}).get("metrics", {}).items():
            rows += _rows(path, record, f"lm-eval:{task}", metrics, named_task_primary(metrics), checked=False)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    order = ["experiment", "model", "task", "stage", "variant", "finetune", "seed", "drop_rate", "mask_seed", "bits",
             "metric"]
    return frame.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
