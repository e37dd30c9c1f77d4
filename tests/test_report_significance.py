"""The paired comparison's metrics are the evaluator's: batched MCC equals sklearn's on every resample."""

import json

import numpy as np
import pandas as pd
from sklearn.metrics import matthews_corrcoef

from methods.report.significance import batched_mcc, compare


def test_batched_mcc_equals_sklearn():
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        labels = rng.integers(0, classes, size=(50, 40))
        predictions = np.where(rng.random((50, 40)) < 0.7, labels, rng.integers(0, classes, size=(50, 40)))
        predictions[0] = 0  # a constant prediction: MCC undefined, 0 by convention
        ours = batched_mcc(predictions, labels)
        expected = [matthews_corrcoef(y, p) for p, y in zip(predictions, labels)]
        assert np.allclose(ours, expected, atol=1e-12)


def _samples(path, predictions, labels):
    path.write_text("".join(json.dumps({"index": i, "prediction": int(p), "label": int(y)}) + "\n"
                            for i, (p, y) in enumerate(zip(predictions, labels))))
    return str(path)


def test_compare_pairs_runs_by_setting_and_detects_a_real_difference(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    good = np.where(rng.random(400) < 0.9, labels, 1 - labels)
    bad = np.where(rng.random(400) < 0.6, labels, 1 - labels)
    row = {"model": "m", "task": "zoo-acceptability", "finetune": "adamw", "seed": 0, "drop_rate": 0.9,
           "bits": float("nan"), "mask_seed": 0, "metric": "mcc"}
    a = pd.DataFrame([{**row, "variant": "magnitude", "samples": _samples(tmp_path / "a.jsonl", good, labels)}])
    b = pd.DataFrame([{**row, "variant": "dare", "samples": _samples(tmp_path / "b.jsonl", bad, labels)},
                      {**row, "drop_rate": 0.5, "variant": "dare",
                       "samples": _samples(tmp_path / "c.jsonl", good, labels)}])
    result = compare(a, b, n_perm=500)
    assert len(result) == 1 and result["drop_rate"].item() == 0.9  # paired with the same drop rate only
    assert np.isclose(result["score_a"].item(), matthews_corrcoef(labels, good))
    assert result["p_value"].item() < 0.01 and result["ci_low"].item() > 0
