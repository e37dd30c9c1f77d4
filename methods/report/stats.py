"""Uncertainty for the report: how sure is a number, and is method A really better than method B?

Two different sources of noise matter in this benchmark, and each function here addresses one:

- **Run-to-run noise** (fine-tuning seed, mask seed): a variant's score over its seeds is a small
  sample. ``mean_ci`` gives a Student-t interval for its mean (exact for normal scores, and the
  usual choice for 3-10 seeds, where a bootstrap has too few distinct resamples to be trusted);
  ``bootstrap_ci`` gives a percentile interval for any statistic when there are many runs.
  ``summarize`` applies ``mean_ci`` per group of the tidy metrics table and yields the long table
  that ``methods.report.tables`` renders (``mean``, ``ci_low``, ``ci_high``, ``n``).
- **Test-set noise**: two methods scored on the same test examples differ partly because the
  examples are a finite sample. ``paired_bootstrap_test`` and ``paired_permutation_test`` resample
  *examples*, keeping each example's pair of outputs together, so the shared difficulty of an
  example cancels (much more power than comparing two independent intervals). Corpus-level metrics
  (MCC, F1, Pearson) are supported: the metric is recomputed on every resample of example indices,
  never averaged per example.

How to read the p-values
------------------------
Each p-value is two-sided and *per comparison*: the probability, if A and B were exchangeable on
these examples, of a difference at least as large as the observed one. Nothing is corrected for
multiple comparisons. A report comparing m pairs at level 0.05 expects about 0.05·m "significant"
differences by chance alone; to claim that *any* of them is real, compare each p with 0.05/m
(Bonferroni) or use Holm's step-down on the sorted p-values. A p-value says nothing about the size
of the difference -- read the confidence interval of the difference for that -- and the paired
tests only cover test-set sampling: a difference that flips sign across fine-tuning seeds is not
established by a small p on one seed. The smallest attainable p is 1/(resamples + 1); a p at that
floor means "smaller than the resolution", not zero. Results are deterministic given ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

# Largest number of resampled values held in memory at once (resamples x examples).
_CHUNK_ELEMENTS = 1 << 21


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")


def _finite_1d(values, what: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.isfinite(array).all():
        # A NaN here means a failed run or a metric that was never computed; averaging it away
        # would silently report a mean over fewer runs than the caption claims.
        raise ValueError(f"{what}: {int((~np.isfinite(array)).sum())} of {array.size} values are NaN or inf")
    return array


# -- intervals over runs ------------------------------------------------------------------------
def mean_ci(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the mean and its two-sided Student-t confidence interval.

    With one value there is no spread to estimate, so low and high are NaN (a table then shows the
    bare mean, a plot no error bar) rather than a zero-width interval that would look certain.
    Identical values give a zero-width interval, which is what the data say."""
    _check_level(level)
    x = _finite_1d(values)
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(_scipy_stats.t.ppf(0.5 + level / 2.0, n - 1)) * sem
    return mean, mean - half, mean + half, n


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 statistic: Callable | None = None) -> tuple[float, float, float, int]:
    """(estimate, low, high, n): a percentile-bootstrap interval for ``statistic`` (default mean).

    For statistics without a textbook interval (median, a trimmed mean) or skewed scores. With
    few values the percentile bootstrap undercovers (it cannot produce values outside the sample),
    so prefer ``mean_ci`` for a handful of seeds. ``statistic`` must reduce along ``axis=-1``
    like the numpy reductions (``np.median``, ``np.mean``), so all resamples are computed at once.
    n = 1 gives NaN bounds, as in ``mean_ci``."""
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _finite_1d(values)
    statistic = np.mean if statistic is None else statistic
    n = x.size
    estimate = float(statistic(x[None, :], axis=-1)[0])
    if n < 2:
        return estimate, math.nan, math.nan, n
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, step):
        k = min(step, n_boot - start)
        draws[start:start + k] = statistic(x[rng.integers(0, n, size=(k, n))], axis=-1)
    alpha = 1.0 - level
    low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return estimate, float(low), float(high), n


def summarize(metrics: pd.DataFrame, by: Sequence[str], value: str = "value", level: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by`` with ``mean``, ``ci_low``, ``ci_high`` (Student-t, NaN for a
    single run) and ``n``: the long table ``tables.wide_table`` and the plots consume. Groups are
    sorted; NaN group keys are kept (pruning columns are NaN for merge rows)."""
    by = list(by)
    _require(metrics, by + [value])
    rows = []
    for key, part in metrics.groupby(by, sort=True, dropna=False):
        try:
            mean, low, high, n = mean_ci(part[value].to_numpy(), level)
        except ValueError as error:
            raise ValueError(f"{value!r} of group {dict(zip(by, key))}: {error}") from None
        rows.append((*key, mean, low, high, n))
    return pd.DataFrame(rows, columns=by + ["mean", "ci_low", "ci_high", "n"])


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the table has {list(frame.columns)}")


# -- paired tests over examples -----------------------------------------------------------------
@dataclass(frozen=True)
class PairedTestResult:
    """metric(A) − metric(B) on the same examples, with a two-sided p-value for "no difference"
    and a percentile-bootstrap confidence interval of the difference."""
    test: str
    metric_a: float
    metric_b: float
    difference: float
    p_value: float
    ci_low: float
    ci_high: float
    level: float
    n: int                 # examples
    resamples: int

    def significant(self, alpha: float = 0.05) -> bool:
        """p < alpha, for one comparison taken alone (see the module notes on multiple tests)."""
        return self.p_value < alpha


def _as_arrays(x, name: str) -> tuple[np.ndarray, ...]:
    """A method's per-example outputs: one array, or a tuple of arrays such as (predictions, labels)."""
    parts = tuple(x) if isinstance(x, tuple) else (x,)
    arrays = tuple(np.asarray(p) for p in parts)
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}]: per-example outputs must be 1-D, got shape {a.shape}")
    return arrays


def _paired_inputs(a, b) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], int]:
    a_arrays, b_arrays = _as_arrays(a, "a"), _as_arrays(b, "b")
    if len(a_arrays) != len(b_arrays):
        raise ValueError(f"a has {len(a_arrays)} per-example arrays, b has {len(b_arrays)}: pass the same structure")
    lengths = {len(x) for x in a_arrays + b_arrays}
    if len(lengths) != 1:
        raise ValueError(f"a paired test needs both methods scored on the same examples; got lengths {sorted(lengths)}")
    n = lengths.pop()
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 examples, got {n}")
    return a_arrays, b_arrays, n


def _batched_metric(metric_fn: Callable | None, batched: bool, parts: int) -> Callable:
    """A function of arrays shaped (resamples, examples) returning one value per resample."""
    if metric_fn is None:
        if parts != 1:
            raise ValueError(f"a and b hold {parts} arrays each; pass the metric_fn that combines them "
                             "(the default metric is the mean of a single per-example array)")
        return lambda x: np.asarray(x, dtype=np.float64).mean(axis=-1)
    if batched:
        return metric_fn
    return lambda *arrays: np.array([metric_fn(*row) for row in zip(*arrays)], dtype=np.float64)


def _evaluate(metric: Callable, arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    values = np.asarray(metric(*arrays), dtype=np.float64).reshape(-1)
    if values.shape[0] != arrays[0].shape[0]:
        raise ValueError(f"metric_fn returned {values.shape[0]} values for {arrays[0].shape[0]} resamples; "
                         "with batched=True it must reduce the last axis")
    return values


def _chunks(total: int, n: int):
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, total, step):
        yield start, min(step, total - start)


def _observed(metric: Callable, a_arrays, b_arrays) -> tuple[float, float]:
    one = lambda arrays: float(_evaluate(metric, tuple(x[None, :] for x in arrays))[0])  # noqa: E731
    return one(a_arrays), one(b_arrays)


def _bootstrap_differences(metric: Callable, a_arrays, b_arrays, n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start, k in _chunks(n_boot, n):
        index = rng.integers(0, n, size=(k, n))
        out[start:start + k] = (_evaluate(metric, tuple(x[index] for x in a_arrays))
                                - _evaluate(metric, tuple(x[index] for x in b_arrays)))
    return out


def _percentile_ci(draws: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _p_value(extreme: int, total: int) -> float:
    # (1 + count) / (1 + total): the observed data count as one of the resamples, so p is never 0
    # and the test is exact-level for the permutation case.
    return (1.0 + extreme) / (1.0 + total)


def _at_least(stat: np.ndarray, observed: float) -> np.ndarray:
    # Differences of accuracies are multiples of 1/n, so ties with the observed value are common;
    # rounding must not push them to "less extreme" (that would make the test anti-conservative).
    return stat >= abs(observed) - 1e-12 * max(1.0, abs(observed))


def _prepare_paired(a, b, metric_fn, batched: bool, level: float, resamples: int, name: str):
    """Checked inputs of a paired test: (a arrays, b arrays, n, metric, metric(A), metric(B))."""
    _check_level(level)
    if resamples < 1:
        raise ValueError(f"{name} must be >= 1, got {resamples}")
    a_arrays, b_arrays, n = _paired_inputs(a, b)
    metric = _batched_metric(metric_fn, batched, len(a_arrays))
    metric_a, metric_b = _observed(metric, a_arrays, b_arrays)
    return a_arrays, b_arrays, n, metric, metric_a, metric_b


def paired_bootstrap_test(a, b, metric_fn: Callable | None = None, n_boot: int = 1000, seed: int = 0,
                          level: float = 0.95, batched: bool = False) -> PairedTestResult:
    """Is metric(A) − metric(B) on the same examples different from 0? Resample examples.

    ``a`` and ``b`` are the two methods' per-example outputs on the same examples, in the same
    order: one array each (e.g. 0/1 correctness, per-example loss), or a tuple of arrays each
    (e.g. ``(predictions, labels)``) for a corpus-level metric. Every resample draws n example
    indices with replacement and recomputes ``metric_fn`` on both methods at those indices, so MCC
    or F1 are resampled correctly. ``metric_fn`` (default: the mean of the single array) is called
    with 1-D arrays, once per resample; with ``batched=True`` it receives arrays of shape
    (resamples, n) and must return one value per row -- much faster for large n_boot.

    p-value: the bootstrap distribution of the difference, shifted to mean 0, is the null
    distribution (Efron & Tibshirani 1993, §16.4; Berg-Kirkpatrick et al. 2012):
    p = (1 + #{|d* − d| ≥ |d|}) / (1 + n_boot). The CI is the percentile interval of d*.
    The bootstrap is approximate: with a few dozen examples it is slightly anti-conservative;
    prefer ``paired_permutation_test`` there."""
    a_arrays, b_arrays, n, metric, metric_a, metric_b = _prepare_paired(a, b, metric_fn, batched, level, n_boot,
                                                                         "n_boot")
    difference = metric_a - metric_b
    draws = _bootstrap_differences(metric, a_arrays, b_arrays, n, n_boot, seed)
    extreme = int(_at_least(np.abs(draws - difference), difference).sum())
    low, high = _percentile_ci(draws, level)
    return PairedTestResult("paired bootstrap", metric_a, metric_b, difference, _p_value(extreme, n_boot),
                            low, high, level, n, n_boot)


def paired_permutation_test(a, b, metric_fn: Callable | None = None, n_perm: int = 1000, seed: int = 0,
                            level: float = 0.95, batched: bool = False, ci_boot: int | None = None
                            ) -> PairedTestResult:
    """Is metric(A) − metric(B) on the same examples different from 0? Swap A and B per example.

    Under "no difference" the labels A and B of each example's pair of outputs are exchangeable,
    so each resample swaps them independently with probability ½ (approximate randomization,
    Noreen 1989; Dror et al. 2018) and recomputes the metric difference; p = (1 + #{|d_perm| ≥ |d|})
    / (1 + n_perm). This is valid at every sample size (no asymptotics), which is why it is the
    default choice for small test sets. Inputs and ``metric_fn``/``batched`` as in
    ``paired_bootstrap_test``; in a tuple such as (predictions, labels) every component is swapped,
    which leaves the shared labels unchanged.

    A permutation gives no interval, so the CI comes from the paired bootstrap with the same
    ``seed`` and ``ci_boot`` resamples (default n_perm; 0 skips it, leaving NaN): identical to
    ``paired_bootstrap_test``'s interval for the same seed and resample count."""
    a_arrays, b_arrays, n, metric, metric_a, metric_b = _prepare_paired(a, b, metric_fn, batched, level, n_perm,
                                                                         "n_perm")
    difference = metric_a - metric_b
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    extreme = 0
    for _, k in _chunks(n_perm, n):
        swap = rng.random((k, n)) < 0.5
        first = tuple(np.where(swap, y[None, :], x[None, :]) for x, y in zip(a_arrays, b_arrays))
        second = tuple(np.where(swap, x[None, :], y[None, :]) for x, y in zip(a_arrays, b_arrays))
        extreme += int(_at_least(np.abs(_evaluate(metric, first) - _evaluate(metric, second)), difference).sum())
    ci_boot = n_perm if ci_boot is None else ci_boot
    low = high = math.nan
    if ci_boot > 0:
        low, high = _percentile_ci(_bootstrap_differences(metric, a_arrays, b_arrays, n, ci_boot, seed), level)
    return PairedTestResult("paired permutation", metric_a, metric_b, difference, _p_value(extreme, n_perm),
                            low, high, level, n, n_perm)
