"""Figures of methods/report/plots.py: the Pareto front, files written, legible axes, clear errors."""

import itertools

import numpy as np
import pandas as pd
import pytest

from methods.report.plots import (delta_diagnostics_plot, pareto_front, pareto_plot, score_vs_bits,
                                  score_vs_drop_rate, variant_family, variant_label)


# -- the Pareto front -----------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points_with_ties():
    points = [
        (4.0, 0.80),   # front
        (4.0, 0.75),   # same bits, lower score: dominated
        (2.0, 0.70),   # front: cheapest
        (8.0, 0.80),   # same score as (4, 0.80) for more bits: dominated
        (8.0, 0.85),   # front
        (3.0, 0.60),   # dominated by (2, 0.70)
        (2.0, 0.70),   # exact duplicate of a front point: also on the front
        (16.0, 0.85),  # ties the best score at double the bits: dominated
        (1.0, 0.10),   # front: nothing is cheaper
    ]
    front = pareto_front(points)
    assert front.tolist() == [[1.0, 0.10], [2.0, 0.70], [2.0, 0.70], [4.0, 0.80], [8.0, 0.85]]


def test_pareto_front_of_a_dataframe_keeps_the_rows_sorted_by_storage():
    frame = pd.DataFrame({"variant": ["a", "b", "c", "d"], "bpp": [4.25, 2.1, 16.0, 3.0],
                          "value": [0.9, 0.5, 0.9, 0.4]})
    front = pareto_front(frame)
    assert front["variant"].tolist() == ["b", "a"]
    with pytest.raises(KeyError, match="'bits'"):
        pareto_front(frame, storage="bits")
    with pytest.raises(ValueError, match="NaN"):
        pareto_front(frame.assign(bpp=[np.nan, 1, 2, 3]))


def test_pareto_front_agrees_with_the_definition_on_random_points_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        points = np.column_stack([rng.integers(1, 6, 25), rng.integers(0, 5, 25)]).astype(float)
        dominated = [any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
                     for p in points]
        expected = sorted(map(tuple, points[~np.array(dominated)]), key=lambda p: (p[0], -p[1]))
        assert list(map(tuple, pareto_front(points))) == expected


def test_variant_family_and_label():
    frame = pd.DataFrame({"stage": ["finetune", "prune", "quantize", "quantize", "merge"],
                          "variant": ["ft", "dare", "gptq", "dare+gptq", "ties"],
                          "drop_rate": [0.0, 0.9, np.nan, 0.9, np.nan], "bits": [np.nan, np.nan, 4, 3, np.nan]})
    assert variant_family(frame).tolist() == ["finetune", "prune", "quantize", "prune+quantize", "merge"]
    assert variant_label(frame).tolist() == ["ft", "dare p=0.9", "gptq 4-bit", "dare+gptq p=0.9 3-bit", "ties"]


# -- figures ------------------------------------------------------------------------------------
def metrics() -> pd.DataFrame:
    """A small tidy table: two panels, pruning at three rates, quantization at three widths, a
    merge, the fine-tuned model; three seeds each."""
    rng = np.random.default_rng(1)
    rows = []
    for (model, task, metric), seed in itertools.product([("bert", "sst2", "accuracy"), ("bert", "cola", "mcc")],
                                                         range(3)):
        base = {"model": model, "task": task, "metric": metric, "seed": seed, "finetune": "adamw"}
        rows.append({**base, "stage": "finetune", "variant": "ft", "drop_rate": 0.0, "bits": np.nan,
                     "bpp": np.nan, "value": 0.9 + rng.normal(0, 0.01)})
        for variant, rate in itertools.product(["dare", "magnitude"], [0.5, 0.9, 0.99]):
            rows.append({**base, "stage": "prune", "variant": variant, "drop_rate": rate, "bits": np.nan,
                         "bpp": 32 * (1 - rate) + 0.5, "value": 0.9 - rate ** 4 / 2 + rng.normal(0, 0.02)})
        for bits in (2, 4, 8):
            rows.append({**base, "stage": "quantize", "variant": "rtn", "drop_rate": np.nan, "bits": bits,
                         "bpp": bits + 0.125, "value": 0.9 - 0.3 / bits ** 2 + rng.normal(0, 0.01)})
        rows.append({**base, "stage": "merge", "variant": "ties", "drop_rate": np.nan, "bits": np.nan,
                     "bpp": 8.0, "value": 0.8 + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


def layers(blocks: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    names = [str(i) for i in range(blocks)] + ["other", "model"]
    size = len(names)
    return pd.DataFrame({"layer": names, "tensors": 6, "numel": 1000, "mean": rng.normal(0, 1e-4, size),
                         "var": rng.uniform(1e-6, 1e-5, size), "max_abs": rng.uniform(1e-3, 5e-2, size),
                         "delta_of_norm": rng.normal(0, 0.3, size), "norm_of_delta": rng.uniform(0.5, 2, size),
                         "delta_norm": 1.0, "c_mean": 0.0, "c_var": 1e-6, "c_sq_row_sum": 1e-4,
                         "dare_output_std_max": rng.uniform(0.01, 0.1, size)})


def assert_written(stem):
    png, pdf = stem.parent / (stem.name + ".png"), stem.parent / (stem.name + ".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000


def assert_legible(fig):
    """Every visible panel has labelled axes and x tick labels that do not overlap."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xlabel()]
    assert panels
    for ax in panels:
        assert ax.get_ylabel()
        boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels()
                        if t.get_visible() and t.get_text()), key=lambda b: b.x0)
        assert boxes, "no tick labels"
        for a, b in zip(boxes, boxes[1:]):
            assert not (a.x1 > b.x0 and a.y1 > b.y0 and b.y1 > a.y0), f"tick labels overlap on {ax.get_title()!r}"


def test_score_vs_drop_rate_writes_png_and_pdf(tmp_path):
    frame = metrics()
    pruned = pd.concat([frame[frame["stage"] == "prune"]]
                       + [frame[frame["stage"] == "finetune"].assign(variant=v) for v in ("dare", "magnitude")])
    fig = score_vs_drop_rate(pruned, tmp_path / "drop", method=["finetune", "variant"])
    assert_written(tmp_path / "drop")
    assert_legible(fig)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["bert / cola", "bert / sst2"]
    assert axes[0].get_ylabel() == "mcc (×100)" and "drop rate" in axes[0].get_xlabel()
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["0", "0.5", "0.9", "0.99"]


def test_score_vs_bits_writes_png_and_pdf_with_power_of_two_ticks(tmp_path):
    frame = metrics()
    fig = score_vs_bits(frame[frame["stage"].isin(["quantize", "finetune"])], tmp_path / "bits.png")
    assert_written(tmp_path / "bits")
    assert_legible(fig)
    ax = [a for a in fig.axes if a.get_visible()][0]
    assert ax.get_xscale() == "log" and "bits per parameter" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8", "16"]
    assert any("finetune (uncompressed)" in t.get_text() for t in fig.legends[0].get_texts())


def test_pareto_plot_marks_families_and_labels_the_front(tmp_path):
    frame = metrics()
    fig = pareto_plot(frame, tmp_path / "pareto")
    assert_written(tmp_path / "pareto")
    assert_legible(fig)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"prune", "quantize", "merge", "Pareto front"} <= set(legend)
    ax = [a for a in fig.axes if a.get_visible()][0]
    part = frame[(frame["task"] == "cola") & (frame["stage"] != "finetune")]
    means = part.assign(label=variant_label(part)).groupby(["label", "bpp"])["value"].mean().reset_index()
    expected = set(pareto_front(means)["label"])
    assert {t.get_text() for t in ax.texts} == expected and expected


def test_delta_diagnostics_plot_one_file_and_several(tmp_path):
    fig = delta_diagnostics_plot(layers(), tmp_path / "delta")
    assert_written(tmp_path / "delta")
    assert_legible(fig)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4 and [t.get_text() for t in visible[0].get_xticklabels()] == ["0", "1", "other"]
    both = pd.concat([layers().assign(task="sst2"), layers(3).assign(task="cola")])
    fig = delta_diagnostics_plot(both.drop(columns="dare_output_std_max"), tmp_path / "delta2", series="task")
    assert_written(tmp_path / "delta2")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    with pytest.raises(ValueError, match="series="):
        delta_diagnostics_plot(both)


def test_many_layers_keep_tick_labels_apart():
    fig = delta_diagnostics_plot(layers(48))
    assert_legible(fig)


def test_plot_errors_name_the_missing_column_or_the_problem():
    frame = metrics()
    with pytest.raises(KeyError, match="'drop_rate'"):
        score_vs_drop_rate(frame.drop(columns="drop_rate"))
    with pytest.raises(KeyError, match="'max_abs'"):
        delta_diagnostics_plot(layers().drop(columns="max_abs"))
    with pytest.raises(ValueError, match="mix several metrics"):
        pareto_plot(frame.assign(metric=np.where(frame.index % 2 == 0, "acc", "f1")))
    with pytest.raises(ValueError, match="no positive storage in column 'bpp'"):
        score_vs_bits(frame, reference=None)
    with pytest.raises(ValueError, match=r"drop rates must be in \[0, 1\)"):
        score_vs_drop_rate(frame[frame["stage"] == "prune"].assign(drop_rate=1.0))
    with pytest.raises(ValueError, match="no drop_rate"):
        score_vs_drop_rate(frame)      # merge and quantize rows have no drop rate
    with pytest.raises(ValueError, match="no rows"):
        pareto_plot(frame.iloc[:0])
