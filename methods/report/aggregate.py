"""Collect every evaluation record into one tidy table (one row per metric value)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from methods.io.checkpoint import read_json
from methods.tasks import METRIC_RANGES

# stage: finetune (the fine-tuned model itself), prune or merge; method: the registered method;
# variant: its label in the config; params: the method's parameters as JSON (for merges, the ones
# chosen on `selected_on`).
IDENTITY = ["experiment", "model", "arch", "task", "finetune", "seed", "stage", "method", "variant",
            "drop_rate", "mask_seed", "params", "selected_on", "split"]
COLUMNS = IDENTITY + ["metric", "value", "stderr", "is_primary", "checkpoint_sha256"]


class MetricOutOfRange(ValueError):
    pass


def records_to_frame(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        record = read_json(path)
        metrics = record["metrics"]
        for name, value in metrics.items():
            if name.endswith("_stderr"):
                continue
            low, high = METRIC_RANGES[name]
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                raise MetricOutOfRange(f"{path}: metric {name} = {value!r} is outside [{low}, {high}]")
            identity = {k: record[k] for k in IDENTITY}
            identity["params"] = json.dumps(identity["params"], sort_keys=True)
            rows.append({**identity, "metric": name, "value": float(value),
                         "stderr": metrics.get(f"{name}_stderr", float("nan")),
                         "is_primary": name == record["primary_metric"],
                         "checkpoint_sha256": record["checkpoint_sha256"]})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    order = ["experiment", "model", "task", "stage", "variant", "finetune", "seed", "drop_rate", "mask_seed", "metric"]
    return frame.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
