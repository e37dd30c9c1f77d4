"""Confidence intervals and paired significance tests of methods/report/stats.py."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import matthews_corrcoef

from methods.report.stats import (bootstrap_ci, mean_ci, paired_bootstrap_test, paired_permutation_test,
                                  summarize)

SCORES = [0.812, 0.794, 0.833, 0.801, 0.779, 0.825, 0.808]


# -- intervals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0.8, 0.95, 0.99])
def test_mean_ci_matches_scipy_t_interval(level):
    mean, low, high, n = mean_ci(SCORES, level)
    x = np.array(SCORES)
    ref_low, ref_high = scipy_stats.t.interval(level, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert n == 7 and mean == pytest.approx(x.mean(), abs=1e-15)
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-12)


def test_mean_ci_of_one_run_has_no_interval_and_identical_runs_a_zero_width_one():
    mean, low, high, n = mean_ci([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(low) and math.isnan(high)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5, 3)


@pytest.mark.parametrize("values, message", [([], "no values"), ([0.1, float("nan")], "NaN"),
                                             ([0.1, float("inf")], "inf")])
def test_mean_ci_refuses_empty_or_non_finite_input(values, message):
    with pytest.raises(ValueError, match=message):
        mean_ci(values)


@pytest.mark.parametrize("level", [0, 1, 95])
def test_levels_outside_the_unit_interval_are_refused(level):
    with pytest.raises(ValueError, match="confidence level"):
        mean_ci(SCORES, level)
    with pytest.raises(ValueError, match="confidence level"):
        bootstrap_ci(SCORES, level)


def test_bootstrap_ci_is_seeded_and_close_to_the_t_interval_for_a_large_normal_sample():
    x = np.random.default_rng(1).normal(0.8, 0.05, 400)
    first = bootstrap_ci(x, 0.95, n_boot=3000, seed=7)
    assert first == bootstrap_ci(x, 0.95, n_boot=3000, seed=7)
    assert first != bootstrap_ci(x, 0.95, n_boot=3000, seed=8)
    estimate, low, high, n = first
    _, t_low, t_high, _ = mean_ci(x)
    assert n == 400 and estimate == pytest.approx(x.mean()) and low < estimate < high
    assert (high - low) == pytest.approx(t_high - t_low, rel=0.1)
    assert low == pytest.approx(t_low, abs=0.1 * (t_high - t_low))


def test_bootstrap_ci_of_the_median_and_of_one_value():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    estimate, low, high, _ = bootstrap_ci(x, statistic=np.median, seed=0)
    assert estimate == 3.0 and 1.0 <= low <= 3.0 <= high <= 100.0
    _, low, high, n = bootstrap_ci([2.0])
    assert n == 1 and math.isnan(low) and math.isnan(high)


def test_summarize_gives_one_row_per_group_with_the_t_interval():
    frame = pd.DataFrame({"variant": ["dare"] * 3 + ["ties"] * 2 + ["none"],
                          "drop_rate": [0.9, 0.9, 0.9, np.nan, np.nan, 0.0],
                          "value": SCORES[:3] + SCORES[3:5] + [0.9]})
    table = summarize(frame, ["variant", "drop_rate"])
    assert list(table.columns) == ["variant", "drop_rate", "mean", "ci_low", "ci_high", "n"]
    assert table["variant"].tolist() == ["dare", "none", "ties"] and table["n"].tolist() == [3, 1, 2]
    row = table.iloc[0]
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx(mean_ci(SCORES[:3])[:3])
    assert math.isnan(table.iloc[1]["ci_low"]) and math.isnan(table.iloc[2]["drop_rate"])  # NaN key kept
    with pytest.raises(KeyError, match="seed"):
        summarize(frame, ["variant", "seed"])


# -- paired tests -------------------------------------------------------------------------------
def _mcc_batched(pred, label):
    """MCC of binary predictions along the last axis (numpy, one value per resample)."""
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    tp, tn = (pred & label).sum(-1), (~pred & ~label).sum(-1)
    fp, fn = (pred & ~label).sum(-1), (~pred & label).sum(-1)
    denominator = np.sqrt(((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).astype(float))
    return np.where(denominator > 0, (tp * tn - fp * fn) / np.where(denominator > 0, denominator, 1.0), 0.0)


def _same_model_twice(rng, n, shift=0.0):
    """Two runs on the same n examples: per-example difficulty shared, correctness drawn
    independently (B's success probability lowered by ``shift``)."""
    p = rng.beta(2.0, 1.0, n)
    return (rng.random(n) < p).astype(float), (rng.random(n) < np.clip(p - shift, 0, 1)).astype(float)


def test_identical_outputs_give_zero_difference_and_p_one():
    x = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    for result in (paired_bootstrap_test(x, x, n_boot=200), paired_permutation_test(x, x, n_perm=200)):
        assert result.difference == 0.0 and result.p_value == 1.0 and result.ci_low == result.ci_high == 0.0
        assert result.n == 5 and not result.significant()


def test_the_default_metric_is_the_mean_and_results_are_seeded():
    rng = np.random.default_rng(0)
    a, b = _same_model_twice(rng, 150, shift=0.1)
    result = paired_bootstrap_test(a, b, n_boot=300, seed=3)
    assert result.metric_a == pytest.approx(a.mean()) and result.difference == pytest.approx(a.mean() - b.mean())
    assert result == paired_bootstrap_test(a, b, n_boot=300, seed=3)
    assert result.ci_low < result.difference < result.ci_high
    permutation = paired_permutation_test(a, b, n_perm=300, seed=3)
    assert permutation == paired_permutation_test(a, b, n_perm=300, seed=3)
    # the permutation test's interval is the paired bootstrap's for the same seed and count
    assert (permutation.ci_low, permutation.ci_high) == (result.ci_low, result.ci_high)


@pytest.mark.parametrize("test, kwargs", [(paired_bootstrap_test, {"n_boot": 500}),
                                          (paired_permutation_test, {"n_perm": 500, "ci_boot": 0})])
def test_false_positive_rate_is_near_the_level_when_both_methods_are_the_same(test, kwargs):
    rng = np.random.default_rng(2024)
    simulations = 400
    rejected = sum(test(*_same_model_twice(rng, 200), seed=s, **kwargs).p_value < 0.05 for s in range(simulations))
    assert 0.02 <= rejected / simulations <= 0.09


@pytest.mark.parametrize("test, kwargs", [(paired_bootstrap_test, {"n_boot": 500}),
                                          (paired_permutation_test, {"n_perm": 500, "ci_boot": 0})])
def test_false_positive_rate_of_a_corpus_metric_resampled_over_examples(test, kwargs):
    rng = np.random.default_rng(99)
    simulations, rejected = 300, 0
    for s in range(simulations):
        correct_a, correct_b = _same_model_twice(rng, 200)
        labels = rng.random(200) < 0.35            # imbalanced, as in CoLA (MCC-scored)
        pred_a, pred_b = np.where(correct_a > 0, labels, ~labels), np.where(correct_b > 0, labels, ~labels)
        result = test((pred_a, labels), (pred_b, labels), _mcc_batched, batched=True, seed=s, **kwargs)
        rejected += result.p_value < 0.05
    assert 0.02 <= rejected / simulations <= 0.09


def test_a_real_difference_is_detected_and_covered_by_the_interval():
    rng = np.random.default_rng(5)
    simulations, detected, covered = 100, {"bootstrap": 0, "permutation": 0}, 0
    for s in range(simulations):
        a, b = _same_model_twice(rng, 300, shift=0.12)
        boot = paired_bootstrap_test(a, b, n_boot=500, seed=s)
        detected["bootstrap"] += boot.p_value < 0.05
        detected["permutation"] += paired_permutation_test(a, b, n_perm=500, seed=s, ci_boot=0).p_value < 0.05
        true_difference = 0.12 - 0.12 ** 3 / 3   # E[min(p, 0.12)] for p ~ Beta(2, 1): the drop clipped at 0
        covered += boot.ci_low <= true_difference <= boot.ci_high
    assert detected["bootstrap"] / simulations >= 0.8 and detected["permutation"] / simulations >= 0.8
    assert covered / simulations >= 0.85


def test_a_per_example_metric_fn_equals_its_batched_version():
    rng = np.random.default_rng(3)
    labels = rng.random(80) < 0.4
    pred_a = np.where(rng.random(80) < 0.8, labels, ~labels)
    pred_b = np.where(rng.random(80) < 0.7, labels, ~labels)
    for test, kwargs in ((paired_bootstrap_test, {"n_boot": 100}), (paired_permutation_test, {"n_perm": 100})):
        loop = test((pred_a, labels), (pred_b, labels), matthews_corrcoef, seed=1, **kwargs)
        batched = test((pred_a, labels), (pred_b, labels), _mcc_batched, batched=True, seed=1, **kwargs)
        assert loop.metric_a == pytest.approx(matthews_corrcoef(labels, pred_a))
        for field in ("metric_a", "metric_b", "difference", "p_value", "ci_low", "ci_high"):
            assert getattr(loop, field) == pytest.approx(getattr(batched, field), abs=1e-12), field


def test_the_smallest_p_value_is_one_over_resamples_plus_one():
    a, b = np.ones(200), np.zeros(200)
    assert paired_bootstrap_test(a, b, n_boot=99).p_value == pytest.approx(0.01)
    assert paired_permutation_test(a, b, n_perm=99).p_value == pytest.approx(0.01)


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_test(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="metric_fn"):
        paired_permutation_test((np.ones(5), np.ones(5)), (np.ones(5), np.ones(5)))
    with pytest.raises(ValueError, match="same structure"):
        paired_bootstrap_test((np.ones(5), np.ones(5)), np.ones(5), metric_fn=lambda x, y: 0.0)
    with pytest.raises(ValueError, match="reduce the last axis"):
        paired_bootstrap_test(np.ones(5), np.zeros(5), metric_fn=lambda x: float(x.mean()), batched=True)


def test_summarize_names_the_group_with_a_missing_value():
    frame = pd.DataFrame({"variant": ["dare", "dare", "ties"], "value": [0.5, np.nan, 0.7]})
    with pytest.raises(ValueError, match=r"group \{'variant': 'dare'\}.*NaN"):
        summarize(frame, ["variant"])
