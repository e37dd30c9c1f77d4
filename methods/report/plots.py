"""The report's figures, from the tidy metrics table (one row per run and metric).

Every function builds a matplotlib ``Figure`` directly (no pyplot state, so no backend switch,
no figure leaks across a long report job), returns it, and when given ``path`` writes
``<path>.png`` (150 dpi, for Markdown/HTML) and ``<path>.pdf`` (vector, for papers) atomically.
PDFs carry no creation date, so reruns give identical bytes for identical data.

Repeated runs (seeds) of the same point are averaged and drawn with their Student-t confidence
interval (``stats.mean_ci``; no bar for a single run). Rows that differ only in columns the
function is not told about are treated as such repeats -- pass every column that distinguishes
variants in ``method`` (e.g. ``["finetune", "variant"]``).

Scores are drawn ×``scale`` (100: percentages) and labelled with the metric's name; the storage
axis is bits per parameter on a log₂ scale, because the interesting comparisons are between
octaves (16 → 8 → 4 → 2 bits), where a linear axis would crowd every low-bit variant together.
"""

from __future__ import annotations

import inspect
import math
from itertools import cycle
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from methods.io.checkpoint import atomic_file
from methods.prune.diagnostics import recommend
from methods.report.stats import summarize

PANEL = ("model", "task")
MAX_COLUMNS = 3
# Markers of the compression families; unknown families take the spare ones in turn.
FAMILY_MARKERS = {"finetune": "*", "prune": "o", "quantize": "s", "merge": "^", "prune+quantize": "D",
                  "merge+quantize": "v", "prune+merge": "P", "prune+merge+quantize": "X"}
_SPARE_MARKERS = ["h", "<", ">", "p", "8", "d"]
_COLORS = [f"C{i}" for i in range(10)]
_LINE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]


# -- shared plumbing ----------------------------------------------------------------------------
def _columns(spec: str | Sequence[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{what}: missing column(s) {missing}; the table has {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{what}: the table has no rows to plot")


def _joined(frame: pd.DataFrame, columns: list[str], separator: str) -> pd.Series:
    text = frame[columns[0]].astype(str)
    for c in columns[1:]:
        text = text + separator + frame[c].astype(str)
    return text


def _one_metric(frame: pd.DataFrame, metric: str, panel_key: str, what: str) -> dict[str, str]:
    """The metric of each panel; two metrics in one panel would put incomparable numbers on one axis."""
    if metric not in frame.columns:
        return {}
    names = frame.groupby(panel_key)[metric].unique()
    mixed = {k: sorted(map(str, v)) for k, v in names.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"{what}: panels {mixed} mix several metrics; filter the table first "
                         f"(e.g. to is_primary, or to one metric)")
    return {k: str(v[0]) for k, v in names.items()}


def _score_label(metric: str | None, scale: float) -> str:
    name = metric or "score"
    return f"{name} (×{scale:g})" if scale != 1 else name


def _grid(count: int, width: float = 4.4, height: float = 3.4) -> tuple[Figure, list]:
    columns = min(MAX_COLUMNS, count)
    rows = -(-count // columns)
    fig = Figure(figsize=(width * columns + 1.8, height * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _style_map(labels: Sequence[str], markers: Sequence[str] = _LINE_MARKERS) -> dict[str, tuple[str, str]]:
    """Colour and marker per label, fixed across panels so one legend serves the whole figure."""
    return {label: (color, marker) for label, color, marker in zip(labels, cycle(_COLORS), cycle(markers))}


def _legend(fig: Figure, axes: list, title: str | None = None) -> None:
    """One legend for the figure: inside the single panel when small ("best" spot, away from the
    data), otherwise outside on the right so it never covers a curve."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if not seen:
        return
    if len(axes) == 1 and len(seen) <= 4:
        axes[0].legend(seen.values(), seen.keys(), loc="best", fontsize=8, title=title, title_fontsize=8)
    else:
        fig.legend(seen.values(), seen.keys(), loc="outside right", fontsize=8, title=title,
                   title_fontsize=8)


def _category_ticks(ax, labels: list[str]) -> None:
    """Categorical x ticks at 0..n-1 (rotation and thinning happen after layout, in _declutter_ticks)."""
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)


def _log2_axis(ax, values: np.ndarray) -> None:
    """Log₂ x axis with ticks at whole powers of two bracketing the data (labelled 1, 2, 4, ...,
    and 1/2, 1/4 below one bit)."""
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return
    low, high = math.floor(math.log2(values.min())), math.ceil(math.log2(values.max()))
    if low == high:
        high += 1
    ax.set_xscale("log", base=2)
    ticks = [2.0 ** k for k in range(low, high + 1)]
    ax.set_xticks(ticks, [f"{t:g}" if t >= 1 else f"1/{int(round(1 / t))}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(2.0 ** (low - 0.15), 2.0 ** (high + 0.15))


def _errorbar(ax, x, summary: pd.DataFrame, scale: float, **style) -> None:
    mean = scale * summary["mean"].to_numpy(float)
    low = scale * summary["ci_low"].to_numpy(float)
    high = scale * summary["ci_high"].to_numpy(float)
    # A single run has no interval: draw the point without a bar rather than a zero-width one.
    yerr = np.vstack([np.nan_to_num(mean - low, nan=0.0), np.nan_to_num(high - mean, nan=0.0)])
    ax.errorbar(x, mean, yerr=yerr if np.any(yerr) else None, capsize=3, markersize=5, linewidth=1.3, **style)


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``<path>.png`` and ``<path>.pdf`` (a .png/.pdf suffix on ``path`` is replaced)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".pdf") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, options in ((".png", {"dpi": dpi}), (".pdf", {"metadata": {"CreationDate": None}})):
        target = stem.parent / (stem.name + suffix)
        with atomic_file(target, "wb") as f:
            fig.savefig(f, format=suffix[1:], **options)
        written.append(target)
    return written


def _overlaps(boxes: list, pad: float = 1.0) -> bool:
    boxes = sorted(boxes, key=lambda b: b.x0)
    return any(a.x1 + pad > b.x0 and a.y1 > b.y0 and b.y1 > a.y0 for a, b in zip(boxes, boxes[1:]))


def _tick_boxes(ax, renderer) -> list:
    return [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]


def _declutter_ticks(fig: Figure) -> None:
    """Make x tick labels legible after layout: measured, not guessed from string lengths. Labels
    that collide are rotated 45°, then 90°, then only every k-th is kept (one draw per round for
    all panels together)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    pending = [ax for ax in fig.axes if ax.get_visible() and ax.get_xticklabels()]

    def crowded(axes: list) -> list:
        fig.draw_without_rendering()
        renderer = canvas.get_renderer()
        return [ax for ax in axes if _overlaps(_tick_boxes(ax, renderer))]

    pending = crowded(pending)
    for rotation in (45, 90):
        if not pending:
            return
        for ax in pending:
            for tick in ax.get_xticklabels():
                tick.set_rotation(rotation)
                tick.set_horizontalalignment("right" if rotation == 45 else "center")
                tick.set_rotation_mode("anchor" if rotation == 45 else "default")
        pending = crowded(pending)
    step = 2
    while pending:
        for ax in pending:
            for k, tick in enumerate(t for t in ax.get_xticklabels() if t.get_text()):
                tick.set_visible(k % step == 0)
        pending = crowded(pending)
        step += 1


def _finish(fig: Figure, axes: list, title: str, legend_title: str | None, path) -> Figure:
    _legend(fig, axes, legend_title)
    fig.suptitle(title, fontsize=12)
    _declutter_ticks(fig)
    if path is not None:
        save_figure(fig, path)
    return fig


def _reference_lines(ax, reference: pd.DataFrame | None, value: str, scale: float, label: str) -> None:
    if reference is not None and len(reference):
        ax.axhline(scale * reference[value].mean(), color="0.35", linestyle="--", linewidth=1, label=label)


def _split_reference(frame: pd.DataFrame, reference: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if reference is None or "stage" not in frame.columns:
        return frame, None
    is_reference = frame["stage"] == reference
    return frame[~is_reference], frame[is_reference]


# -- score vs drop rate -------------------------------------------------------------------------
def _rate_position(rates: np.ndarray) -> np.ndarray:
    """x = −log10(1 − p): 0, 0.5, 0.9, 0.99, 0.999 fall evenly apart, as the interesting part of
    a pruning curve is how many nines of the delta can go."""
    if np.any(rates >= 1) or np.any(rates < 0):
        raise ValueError(f"drop rates must be in [0, 1), got {sorted(set(rates[(rates >= 1) | (rates < 0)]))}")
    return -np.log10(1.0 - rates)


def score_vs_drop_rate(metrics: pd.DataFrame, path: str | Path | None = None, *,
                       method: str | Sequence[str] = "variant", panel: str | Sequence[str] = PANEL,
                       value: str = "value", metric: str = "metric", scale: float = 100.0, level: float = 0.95,
                       title: str = "Score vs delta drop rate") -> Figure:
    """One panel per (model, task), one line per pruning method: the mean score over runs
    against the drop rate p, with its ``level`` confidence interval.

    Columns: ``panel`` columns, ``drop_rate``, ``method`` column(s), ``value``; ``metric`` (one per
    panel) names the y axis. Include the fine-tuned model as rows with drop_rate 0 of every method
    for the curves to start at the unpruned score. The x axis is spaced by −log10(1 − p)."""
    panels, methods = _columns(panel), _columns(method)
    _require(metrics, panels + methods + ["drop_rate", value], "score_vs_drop_rate")
    unrated = metrics["drop_rate"].isna()
    if unrated.any():
        stages = sorted(map(str, metrics.loc[unrated, "stage"].unique())) if "stage" in metrics.columns else "?"
        raise ValueError(f"score_vs_drop_rate: {int(unrated.sum())} rows have no drop_rate (stages {stages}); "
                         "keep only pruned rows and the fine-tuned model at drop rate 0")
    frame = metrics.assign(_panel=_joined(metrics, panels, " / "), _method=_joined(metrics, methods, " → "))
    metric_of = _one_metric(frame, metric, "_panel", "score_vs_drop_rate")
    summary = summarize(frame, ["_panel", "_method", "drop_rate"], value, level)
    styles = _style_map(sorted(summary["_method"].unique()))
    panel_names = sorted(summary["_panel"].unique())
    fig, axes = _grid(len(panel_names))
    for ax, name in zip(axes, panel_names):
        part = summary[summary["_panel"] == name]
        rates = np.array(sorted(part["drop_rate"].unique()), dtype=float)
        positions = _rate_position(rates)
        span = positions.max() - positions.min() if len(rates) > 1 else 1.0
        methods_here = sorted(part["_method"].unique())
        for k, (label, line) in enumerate(part.groupby("_method", sort=True)):
            line = line.sort_values("drop_rate")
            color, marker = styles[label]
            # a small sideways shift per method keeps overlapping error bars apart
            dodge = (k - (len(methods_here) - 1) / 2) * 0.012 * span
            _errorbar(ax, _rate_position(line["drop_rate"].to_numpy(float)) + dodge, line, scale, color=color,
                      marker=marker, label=label)
        ax.set_xticks(positions, [f"{r:g}" for r in rates])
        ax.set_xlabel("drop rate p (spaced by −log₁₀(1 − p))")
        ax.set_ylabel(_score_label(metric_of.get(name), scale))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    return _finish(fig, axes, title, "method", path)


# -- score vs storage ---------------------------------------------------------------------------
def _storage_values(frame: pd.DataFrame, storage: str, what: str) -> None:
    bad = frame[~(pd.to_numeric(frame[storage], errors="coerce") > 0)]
    if len(bad):
        stages = sorted(map(str, bad["stage"].unique())) if "stage" in bad.columns else "?"
        raise ValueError(f"{what}: {len(bad)} rows have no positive storage in column {storage!r} (stages {stages}); "
                         f"filter them out or pass them as the reference stage")


def score_vs_bits(metrics: pd.DataFrame, path: str | Path | None = None, *, storage: str = "bpp",
                  method: str | Sequence[str] = "variant", panel: str | Sequence[str] = PANEL,
                  value: str = "value", metric: str = "metric", scale: float = 100.0, level: float = 0.95,
                  reference: str | None = "finetune", title: str = "Score vs storage") -> Figure:
    """One panel per (model, task), one line per method: mean score against the exact storage in
    bits per parameter (``storage``, measured from the artifact), log₂ x axis.

    Rows whose ``stage`` equals ``reference`` (the uncompressed fine-tuned model) are drawn as a
    dashed horizontal line instead of a point, since their storage is not on the same scale; every
    other row needs a positive ``storage`` value. Points of one method at equal storage are runs of
    the same variant and are averaged."""
    panels, methods = _columns(panel), _columns(method)
    _require(metrics, panels + methods + [storage, value], "score_vs_bits")
    frame = metrics.assign(_panel=_joined(metrics, panels, " / "), _method=_joined(metrics, methods, " → "))
    metric_of = _one_metric(frame, metric, "_panel", "score_vs_bits")
    frame, references = _split_reference(frame, reference)
    _storage_values(frame, storage, "score_vs_bits")
    summary = summarize(frame.assign(_bits=frame[storage].astype(float)), ["_panel", "_method", "_bits"], value, level)
    styles = _style_map(sorted(summary["_method"].unique()))
    panel_names = sorted(summary["_panel"].unique())
    fig, axes = _grid(len(panel_names))
    for ax, name in zip(axes, panel_names):
        part = summary[summary["_panel"] == name]
        for label, line in part.groupby("_method", sort=True):
            line = line.sort_values("_bits")
            color, marker = styles[label]
            _errorbar(ax, line["_bits"].to_numpy(float), line, scale, color=color, marker=marker, label=label)
        _storage_panel(ax, name, part, references, value, scale, reference, storage, metric_of.get(name))
    return _finish(fig, axes, title, "method", path)


def _storage_panel(ax, name: str, part: pd.DataFrame, references: pd.DataFrame | None, value: str, scale: float,
                   reference: str | None, storage: str, metric: str | None) -> None:
    """What a score-vs-storage panel has besides its points: the uncompressed reference line, the
    log₂ storage axis, labels, title and grid."""
    _reference_lines(ax, None if references is None else references[references["_panel"] == name],
                     value, scale, f"{reference} (uncompressed)")
    _log2_axis(ax, part["_bits"].to_numpy(float))
    ax.set_xlabel(f"storage (bits per parameter, log₂ scale; {storage})")
    ax.set_ylabel(_score_label(metric, scale))
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)


# -- Pareto front -------------------------------------------------------------------------------
def _pareto_mask(bits: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Non-dominated points for (minimise bits, maximise score), in O(n log n).

    Sweeping by bits ascending (score descending within equal bits), a point is on the front iff
    its score beats every cheaper-or-equal point seen so far. Exact duplicates of a front point
    (same bits, same score) are kept: neither dominates the other, and dropping one would make the
    front depend on row order."""
    order = np.lexsort((-score, bits))
    mask = np.zeros(bits.shape[0], dtype=bool)
    best, last = -math.inf, None
    for i in order:
        if score[i] > best:
            mask[i], best, last = True, score[i], (bits[i], score[i])
        elif last is not None and (bits[i], score[i]) == last:
            mask[i] = True
    return mask


def pareto_front(points, *, storage: str = "bpp", score: str = "value"):
    """The variants no other variant beats on both storage (fewer bits) and score (higher).

    ``points``: a DataFrame with ``storage`` and ``score`` columns (returns its front rows, sorted
    by storage, ties by score descending), or an array-like of (bits, score) pairs (returns the
    front as an array of pairs in the same order). A point dominates another when it is no worse
    on both and better on one; ties on one axis are decided by the other, exact duplicates are
    both on the front. NaN is an error: a variant with unknown storage or score cannot be ranked."""
    if isinstance(points, pd.DataFrame):
        _require(points, [storage, score], "pareto_front")
        bits, scores = points[storage].to_numpy(float), points[score].to_numpy(float)
        names = (storage, score)
    else:
        array = np.asarray(points, dtype=float)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"pareto_front: expected (bits, score) pairs of shape (n, 2), got {array.shape}")
        bits, scores = array[:, 0], array[:, 1]
        names = ("bits", "score")
    for name, values in zip(names, (bits, scores)):
        if np.isnan(values).any():
            raise ValueError(f"pareto_front: {int(np.isnan(values).sum())} NaN values in {name!r}")
    mask = _pareto_mask(bits, scores)
    order = [i for i in np.lexsort((-scores, bits)) if mask[i]]
    if isinstance(points, pd.DataFrame):
        return points.iloc[order]
    return array[order]


def variant_family(metrics: pd.DataFrame) -> pd.Series:
    """Compression family of each row from the tidy table's columns: "prune" (a drop rate > 0),
    "merge" (stage merge), "quantize" (a code width in ``bits``), joined with "+" when a variant
    chains them, "finetune" for the uncompressed model."""
    parts = []
    if "drop_rate" in metrics.columns:
        parts.append(np.where(pd.to_numeric(metrics["drop_rate"], errors="coerce").fillna(0) > 0, "prune", ""))
    if "stage" in metrics.columns:
        parts.append(np.where(metrics["stage"] == "merge", "merge", ""))
    if "bits" in metrics.columns:
        parts.append(np.where(metrics["bits"].notna(), "quantize", ""))
    if not parts:
        raise KeyError(f"variant_family: needs a drop_rate, stage or bits column; "
                       f"the table has {list(metrics.columns)}")
    names = ["+".join(p for p in row if p) or "finetune" for row in zip(*parts)]
    return pd.Series(names, index=metrics.index, name="family")


def variant_label(metrics: pd.DataFrame, name: str = "variant") -> pd.Series:
    """A point's label on a Pareto plot: the variant name plus the settings that make its points
    differ (drop rate, code width), e.g. "dare p=0.9", "gptq 4-bit", "dare+gptq p=0.9 4-bit"."""
    _require(metrics, [name], "variant_label")
    text = metrics[name].astype(str)
    if "drop_rate" in metrics.columns:
        rate = pd.to_numeric(metrics["drop_rate"], errors="coerce")
        text = text + np.where(rate.fillna(0) > 0, " p=" + rate.map(lambda r: f"{r:g}"), "")
    if "bits" in metrics.columns:
        bits = pd.to_numeric(metrics["bits"], errors="coerce")
        text = text + np.where(bits.notna(), " " + bits.map(lambda b: f"{b:g}") + "-bit", "")
    return text


def pareto_plot(metrics: pd.DataFrame, path: str | Path | None = None, *, storage: str = "bpp",
                value: str = "value", family: str = "family", label: str | Sequence[str] | None = None,
                panel: str | Sequence[str] = PANEL, metric: str = "metric", scale: float = 100.0,
                reference: str | None = "finetune", title: str = "Score vs storage: every variant and the Pareto front"
                ) -> Figure:
    """Every variant as a point (mean over runs) of score against storage, one marker per
    compression family, the Pareto front as a step line and its points labelled; one panel per
    (model, task).

    The step line reads as "the best score reachable within this many bits": it stays flat until
    the next front point becomes affordable. ``family`` comes from that column when present, else
    from ``variant_family``; point labels from the ``label`` column(s), by default
    ``variant_label`` (variant + drop rate + code width). Reference rows (the uncompressed model)
    become a dashed line."""
    panels, labels = _columns(panel), _columns(label) if label is not None else []
    _require(metrics, panels + labels + [storage, value], "pareto_plot")
    frame = metrics.assign(_panel=_joined(metrics, panels, " / "),
                           _label=_joined(metrics, labels, " → ") if labels else variant_label(metrics),
                           _family=metrics[family] if family in metrics.columns else variant_family(metrics))
    metric_of = _one_metric(frame, metric, "_panel", "pareto_plot")
    frame, references = _split_reference(frame, reference)
    _storage_values(frame, storage, "pareto_plot")
    points = frame.assign(_bits=frame[storage].astype(float)).groupby(
        ["_panel", "_family", "_label", "_bits"], sort=True)[value].mean().reset_index()
    found = set(points["_family"])
    families = [f for f in FAMILY_MARKERS if f in found] + sorted(found - set(FAMILY_MARKERS))
    spare = cycle(_SPARE_MARKERS)
    markers = {f: FAMILY_MARKERS.get(f) or next(spare) for f in families}
    colors = dict(zip(families, cycle(_COLORS)))
    panel_names = sorted(points["_panel"].unique())
    fig, axes = _grid(len(panel_names), width=5.0, height=3.9)
    for ax, name in zip(axes, panel_names):
        part = points[points["_panel"] == name]
        for fam in families:
            group = part[part["_family"] == fam]
            if len(group):
                ax.scatter(group["_bits"], scale * group[value], marker=markers[fam], color=colors[fam], s=36,
                           alpha=0.85, label=fam, zorder=3)
        front = pareto_front(part, storage="_bits", score=value)
        xs, ys = front["_bits"].to_numpy(float), scale * front[value].to_numpy(float)
        right = part["_bits"].max()
        ax.step(np.append(xs, right), np.append(ys, ys[-1]), where="post", color="black", linewidth=1.2,
                label="Pareto front", zorder=2)
        for k, (x, y, text) in enumerate(zip(xs, ys, front["_label"])):
            # alternate above/below so neighbouring labels on a dense front do not collide
            ax.annotate(text, (x, y), xytext=(4, 6 if k % 2 == 0 else -11), textcoords="offset points",
                        fontsize=7, zorder=4,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
        _storage_panel(ax, name, part, references, value, scale, reference, storage, metric_of.get(name))
    return _finish(fig, axes, title, "family", path)


# -- delta diagnostics --------------------------------------------------------------------------
_DEFAULTS = inspect.signature(recommend).parameters
SMALL_DELTA = _DEFAULTS["small_delta"].default   # DARE works below (the DARE paper: ≲ 0.002-0.005)
LARGE_DELTA = _DEFAULTS["large_delta"].default   # DARE fails above (the DARE paper: ~0.03)
LAYER_COLUMNS = ["layer", "max_abs", "var", "norm_of_delta", "delta_of_norm"]


def _layer_order(layers: pd.Series) -> list[str]:
    """Block indices in numeric order, then "other" (embeddings, head, final norm)."""
    names = {str(x) for x in layers}
    numeric = sorted((n for n in names if n.lstrip("-").isdigit()), key=int)
    return numeric + sorted(names - set(numeric))


def delta_diagnostics_plot(layers: pd.DataFrame, path: str | Path | None = None, *,
                           series: str | Sequence[str] | None = None,
                           title: str = "Delta statistics per layer") -> Figure:
    """Per-layer delta statistics from ``layers.csv`` (``methods/prune/diagnostics.py:
    layer_diagnostics``): where in the network fine-tuning moved the weights, and whether the
    deltas are small enough for DARE.

    Panels: max|δ| with the DARE paper's regimes (DARE works below ``SMALL_DELTA``, fails above
    ``LARGE_DELTA``); the standard deviation of δ; Norm of Delta ‖δ‖_F and Delta of Norm
    ‖θ_ft‖ − ‖θ₀‖ (summed over the layer's tensors); and, when the file has it, the largest
    predicted DARE output standard deviation (``dare_output_std_max``). The whole-model row
    ("model") is left out: it would dwarf the per-layer sums. ``series`` names the column(s) that
    tell several concatenated layers.csv files apart (e.g. ``["model", "task"]``)."""
    _require(layers, LAYER_COLUMNS, "delta_diagnostics_plot")
    keys = _columns(series) if series is not None else []
    _require(layers, keys, "delta_diagnostics_plot")
    frame = layers.assign(layer=layers["layer"].astype(str))
    frame = frame[frame["layer"] != "model"]
    frame = frame.assign(_series=_joined(frame, keys, " / ") if keys else "delta")
    repeated = frame.duplicated(["_series", "layer"])
    if repeated.any():
        raise ValueError(f"delta_diagnostics_plot: layer(s) {sorted(frame.loc[repeated, 'layer'].unique())} appear "
                         f"more than once{' per series ' + str(keys) if keys else ''}; pass series= with the column "
                         "that tells the files apart")
    order = _layer_order(frame["layer"])
    position = {name: i for i, name in enumerate(order)}
    tick_labels = order
    panels = [("max_abs", "max |δ| (weight units)", True), ("std", "std of δ (weight units)", True),
              ("norms", "‖δ‖_F (NOD) and ‖θ_ft‖ − ‖θ₀‖ (DON)", False)]
    if "dare_output_std_max" in frame.columns and frame["dare_output_std_max"].notna().any():
        panels.append(("dare_output_std_max", "max predicted DARE output std\n(output units, highest p)", True))
    # room on the right for the legend when several files are compared
    fig = Figure(figsize=(11.5 + (3.0 if keys else 0.0), 3.6 * math.ceil(len(panels) / 2) + 0.4),
                 layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / 2), 2, squeeze=False).ravel().tolist()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    styles = _style_map(sorted(frame["_series"].unique()))
    for ax, (key, ylabel, log) in zip(axes, panels):
        for name, part in frame.groupby("_series", sort=True):
            part = part.assign(_x=part["layer"].map(position)).sort_values("_x")
            color, marker = styles[name]
            x = part["_x"].to_numpy()
            if key == "std":
                ax.plot(x, np.sqrt(part["var"].to_numpy(float)), marker=marker, color=color, label=name)
            elif key == "norms":
                ax.plot(x, part["norm_of_delta"].to_numpy(float), marker=marker, color=color, label=name)
                ax.plot(x, part["delta_of_norm"].to_numpy(float), marker=marker, color=color, linestyle=":",
                        markerfacecolor="none")
            else:
                ax.plot(x, part[key].to_numpy(float), marker=marker, color=color, label=name)
        if log:
            ax.set_yscale("log")
        if key == "max_abs":
            # keep both regime thresholds in view: how far a model is from either is the point
            shown = frame["max_abs"].to_numpy(float)
            shown = shown[shown > 0]
            bottom = min(shown.min(initial=SMALL_DELTA), SMALL_DELTA) / 2
            ax.set_ylim(bottom, max(shown.max(initial=LARGE_DELTA), LARGE_DELTA) * 2)
            ax.axhspan(bottom, SMALL_DELTA, color="tab:green", alpha=0.08)
            ax.axhline(SMALL_DELTA, color="tab:green", linestyle="--", linewidth=1)
            ax.axhline(LARGE_DELTA, color="tab:red", linestyle="--", linewidth=1)
            ax.text(1.0, SMALL_DELTA, f" DARE works ≤ {SMALL_DELTA:g}", transform=ax.get_yaxis_transform(),
                    fontsize=7, color="tab:green", va="bottom", ha="right")
            ax.text(1.0, LARGE_DELTA, f" DARE fails ≥ {LARGE_DELTA:g}", transform=ax.get_yaxis_transform(),
                    fontsize=7, color="tab:red", va="bottom", ha="right")
        if key == "norms":
            ax.axhline(0, color="0.6", linewidth=0.8)
            ax.legend([Line2D([], [], color="0.3"), Line2D([], [], color="0.3", linestyle=":")],
                      ["NOD ‖δ‖_F (solid)", "DON (dotted)"], loc="best", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("transformer block (other = embeddings, head)" if "other" in order else "transformer block")
        _category_ticks(ax, tick_labels)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[:len(panels)]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if keys:
        fig.legend(handles.values(), handles.keys(), loc="outside right", fontsize=8, title=" / ".join(keys),
                   title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    _declutter_ticks(fig)
    if path is not None:
        save_figure(fig, path)
    return fig
