import pytest

from methods.evaluate.metrics import classification_metrics, regression_metrics


def test_classification_metrics_known_values():
    m = classification_metrics([1, 1, 0, 0], [1, 0, 0, 0])
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt(...) = (1*2 - 1*0) / sqrt(2*1*3*2)
    assert m["mcc"] == pytest.approx(2 / 12 ** 0.5)


def test_constant_predictions_score_zero_correlation():
    assert classification_metrics([1, 1, 1], [1, 0, 1])["mcc"] == 0.0
    assert regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0


def test_regression_metrics_known_values():
    m = regression_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 10.0])
    assert m["spearman"] == pytest.approx(1.0)
    assert 0.8 < m["pearson"] < 1.0
    assert m["pearson_spearman"] == pytest.approx((m["pearson"] + 1.0) / 2)


def test_metrics_equal_scipy_and_sklearn_on_fixed_random_inputs():
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    m = classification_metrics(predictions.tolist(), labels.tolist())
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(labels, predictions), abs=1e-12)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)
    assert m["accuracy_f1"] == pytest.approx((m["accuracy"] + m["f1"]) / 2)
    three = classification_metrics(rng.integers(0, 3, 300).tolist(), rng.integers(0, 3, 300).tolist())
    assert "f1" not in three  # F1 is GLUE's metric for the binary MRPC/QQP only
    gold = rng.uniform(0, 5, 400)
    pred = gold + rng.normal(0, 1.5, 400)
    r = regression_metrics(pred.tolist(), gold.tolist())
    assert r["pearson"] == pytest.approx(pearsonr(pred, gold).statistic, abs=1e-12)
    assert r["spearman"] == pytest.approx(spearmanr(pred, gold).statistic, abs=1e-12)
