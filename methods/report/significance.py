"""Is variant A better than variant B on a task, or is the difference noise of the test set?

Both variants were scored on the same test examples, so the comparison is paired: the approximate
randomization test of ``stats.paired_permutation_test`` swaps A's and B's output per example and
recomputes the task's headline metric *with the evaluator's own metric code*
(``methods.evaluate.metrics``; lm-eval's per-document scores for decoders), so corpus-level metrics
such as MCC or Pearson/Spearman are tested as they are reported, not as a mean of per-example
numbers. Per-example outputs come from each evaluation's ``samples.jsonl``: encoders store
(prediction, label), decoders lm-eval's per-document metric values.

The p-values are per comparison and uncorrected; they measure test-set sampling only, not the
variation over fine-tuning or mask seeds (compare over seeds with the confidence intervals of the
tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from methods.evaluate.metrics import classification_metrics, regression_metrics
from methods.report.stats import paired_permutation_test
from methods.tasks import get_task

# Runs are paired when they share these (and differ only in the variant compared).
PAIR_KEYS = ["model", "task", "finetune", "seed", "drop_rate", "bits", "mask_seed"]


def per_example(samples: str | Path, task: str) -> tuple[np.ndarray, ...]:
    """The outputs a metric needs, one entry per test example in a fixed order: (predictions,
    labels) for encoders, the per-document headline metric for decoders."""
    spec = get_task(task)
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines() if line.strip()]
    if spec.is_encoder:
        rows.sort(key=lambda r: r["index"])
        kind = float if spec.kind == "regression" else int
        return (np.array([kind(r["prediction"]) for r in rows]), np.array([kind(r["label"]) for r in rows]))
    own = sorted((r for r in rows if "harness_task" not in r), key=lambda r: r["doc_id"])
    if not own or spec.primary not in own[0]:
        raise ValueError(f"{samples}: no per-document {spec.primary!r} for task {task}")
    return (np.array([float(r[spec.primary]) for r in own]),)


def metric_function(task: str):
    """(metric_fn, batched) for ``paired_permutation_test``: the task's headline metric."""
    spec = get_task(task)
    if not spec.is_encoder:
        return (lambda values: values.mean(axis=-1)), True
    if spec.primary == "accuracy":
        return (lambda predictions, labels: (predictions == labels).mean(axis=-1)), True
    if spec.primary == "mcc":
        return batched_mcc, True
    compute = regression_metrics if spec.kind == "regression" else classification_metrics
    return (lambda predictions, labels: compute(predictions, labels)[spec.primary]), False


def batched_mcc(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Matthews correlation of each row of (resamples, n) predictions against its labels, the
    multiclass form sklearn's ``matthews_corrcoef`` computes (0 where it is undefined), vectorised
    so a permutation test costs one pass instead of one sklearn call per resample."""
    predictions, labels = np.atleast_2d(predictions), np.atleast_2d(labels)
    n = predictions.shape[-1]
    correct = (predictions == labels).sum(axis=-1).astype(float)
    classes = np.union1d(np.unique(predictions), np.unique(labels))
    predicted = np.stack([(predictions == k).sum(axis=-1) for k in classes], axis=-1).astype(float)
    actual = np.stack([(labels == k).sum(axis=-1) for k in classes], axis=-1).astype(float)
    covariance = correct * n - (predicted * actual).sum(axis=-1)
    scale = np.sqrt((n ** 2 - (predicted ** 2).sum(axis=-1)) * (n ** 2 - (actual ** 2).sum(axis=-1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, covariance / np.where(scale > 0, scale, 1.0), 0.0)


def compare(rows_a: pd.DataFrame, rows_b: pd.DataFrame, n_perm: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired tests of every run of A against the run of B with the same ``PAIR_KEYS`` (headline
    metric rows of the tidy table, each with its ``samples`` path); one row per pair with the
    scores, their difference, its 95% CI (paired bootstrap) and the permutation p-value."""
    keys = [k for k in PAIR_KEYS if k in rows_a.columns]

    def key(row: dict) -> tuple:  # NaN (no drop rate, no bits) never equals itself: compare as None
        return tuple(None if isinstance(row[k], float) and np.isnan(row[k]) else row[k] for k in keys)

    b_by_key = {key(r): r for r in rows_b.to_dict("records")}
    results = []
    for a in rows_a.to_dict("records"):
        b = b_by_key.get(key(a))
        if b is None:
            continue
        metric, batched = metric_function(a["task"])
        result = paired_permutation_test(per_example(a["samples"], a["task"]), per_example(b["samples"], b["task"]),
                                         metric, n_perm=n_perm, seed=seed, batched=batched)
        # A's calibration sample tells its runs apart (B, the data-free baseline, has one per key)
        results.append({**{k: a[k] for k in keys}, "calibration_seed": a.get("calibration_seed", np.nan),
                        "a": a["variant"], "b": b["variant"], "metric": a["metric"],
                        "score_a": result.metric_a, "score_b": result.metric_b, "difference": result.difference,
                        "ci_low": result.ci_low, "ci_high": result.ci_high, "p_value": result.p_value,
                        "n": result.n})
    return pd.DataFrame(results)
