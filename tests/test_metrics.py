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
