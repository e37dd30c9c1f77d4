"""Delta diagnostics (DONOD norms, DAREx variance term) and the DPP recommendation (spec §2.1, §2.6, §5, §7.29)."""

import math

import pandas as pd
import pytest
import torch

from methods.prune.dare import dare_delta
from methods.prune.diagnostics import (dare_output_std, layer_diagnostics, layer_index, recommend,
                                       tensor_diagnostics)


def _models(scale=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.1.output.dense.weight",
             "classifier.weight"]
    shapes = [(30, 8), (8, 8), (8,), (8, 8), (2, 8)]
    base = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    ft = {n: w + scale * torch.randn(w.shape, generator=g) + scale for n, w in base.items()}
    ft["bert.embeddings.position_ids"] = torch.arange(8)
    return base, ft


@pytest.mark.parametrize("name,index", [
    ("bert.encoder.layer.11.attention.self.query.weight", 11), ("model.layers.3.mlp.up_proj.weight", 3),
    ("transformer.h.0.attn.c_attn.weight", 0), ("vit.blocks.7.norm1.weight", 7),
    ("bert.embeddings.word_embeddings.weight", None), ("lm_head.weight", None), ("players.2.x", None)])
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_identical_models_have_zero_don_and_nod():
    base, _ = _models()
    rows = tensor_diagnostics(base, base)
    assert all(r["delta_of_norm"] == 0 and r["norm_of_delta"] == 0 and r["max_abs"] == 0 for r in rows)
    assert all(r["delta_of_norm"] == 0 and r["norm_of_delta"] == 0 for r in layer_diagnostics(rows))


def test_tensor_rows_match_direct_computation_and_don_is_bounded_by_nod():
    base, ft = _models()
    rows = {r["tensor"]: r for r in tensor_diagnostics(base, ft, exclude=[r"(^|\.)classifier\."])}
    assert set(rows) == set(base) - {"classifier.weight"}          # excluded; integer buffer skipped
    name = "bert.encoder.layer.0.attention.self.query.weight"
    delta = (ft[name] - base[name]).double()
    r = rows[name]
    assert r["layer"] == 0 and r["numel"] == 64
    assert r["mean"] == pytest.approx(delta.mean().item()) and r["var"] == pytest.approx(delta.var(correction=0).item())
    assert r["max_abs"] == pytest.approx(delta.abs().max().item())
    assert r["norm_of_delta"] == pytest.approx(delta.norm().item())
    assert r["delta_of_norm"] == pytest.approx(ft[name].double().norm().item() - base[name].double().norm().item())
    for row in rows.values():
        assert abs(row["delta_of_norm"]) <= row["norm_of_delta"] + 1e-12


def test_layer_rows_pool_exactly_and_sum_don_and_nod():
    base, ft = _models()
    trows = tensor_diagnostics(base, ft)
    layers = {r["layer"]: r for r in layer_diagnostics(trows)}
    assert list(layers) == [0, 1, "other", "model"]
    everything = torch.cat([(ft[n] - base[n]).double().reshape(-1) for n in base])
    assert layers["model"]["mean"] == pytest.approx(everything.mean().item())
    assert layers["model"]["var"] == pytest.approx(everything.var(correction=0).item())
    assert layers["model"]["delta_norm"] == pytest.approx(everything.norm().item())
    layer0 = [r for r in trows if r["layer"] == 0]
    assert layers[0]["tensors"] == 2
    assert layers[0]["norm_of_delta"] == pytest.approx(sum(r["norm_of_delta"] for r in layer0))
    assert layers[0]["delta_of_norm"] == pytest.approx(sum(r["delta_of_norm"] for r in layer0))
    frame = pd.DataFrame(layer_diagnostics(trows))                 # rows are DataFrame-ready
    assert frame.shape[0] == 4 and {"norm_of_delta", "delta_of_norm", "c_sq_row_sum"} <= set(frame.columns)


def test_dare_inflates_nod_by_one_over_sqrt_keep_rate():
    name = "bert.embeddings.word_embeddings.weight"
    big = {name: torch.zeros(400, 100)}
    tuned = {name: 1e-2 * torch.randn(400, 100, generator=torch.Generator().manual_seed(3))}
    pruned = {name: dare_delta(tuned[name], 0.9, 0, name)}
    before = tensor_diagnostics(big, tuned)[0]["norm_of_delta"]
    after = tensor_diagnostics(big, pruned)[0]["norm_of_delta"]
    assert after / before == pytest.approx(1 / math.sqrt(0.1), rel=0.05)


def test_darex_variance_term_predicts_dare_output_spread():
    """§7.10: one Linear layer, std of (h_DARE − h_ft) over masks ≈ sqrt(p/(1−p)·Σ_j c_ij²)."""
    g = torch.Generator().manual_seed(7)
    base = {"enc.layers.0.fc.weight": torch.zeros(1, 300)}
    ft = {"enc.layers.0.fc.weight": 1e-2 * torch.randn(1, 300, generator=g) + 5e-3}
    x = torch.randn(300, generator=g) + 1.0
    p = 0.9
    row = tensor_diagnostics(base, ft, input_means={"enc.layers.0.fc.weight": x}, drop_rate=p)[0]
    delta = ft["enc.layers.0.fc.weight"][0]
    assert row["c_inputs"] == "mean activation"
    assert row["c_sq_row_sum"] == pytest.approx((delta * x).pow(2).sum().item(), rel=1e-5)
    outputs = torch.stack([(dare_delta(delta, p, s, "w") - delta) @ x for s in range(3000)])
    assert outputs.std().item() == pytest.approx(row["dare_output_std"], rel=0.1)
    assert dare_output_std(1.0, 1.0) == math.inf


def test_shape_mismatch_names_the_tensor():
    base, ft = _models()
    base["bert.encoder.layer.1.output.dense.weight"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="bert.encoder.layer.1.output.dense.weight"):
        tensor_diagnostics(base, ft)


def _rows(max_abs):
    return [{"max_abs": max_abs / 3}, {"max_abs": max_abs}]


@pytest.mark.parametrize("kwargs,method,finetune,q_words", [
    (dict(max_abs=0.1, can_finetune=True), "magnitude", "adamr-l1", None),
    (dict(max_abs=0.1, unlabelled_data=True), "importance", None, None),
    (dict(max_abs=0.1), "magnitude", None, None),
    (dict(max_abs=0.001, drop_rate=0.3), "dare", None, "1 - p"),
    (dict(max_abs=0.001, can_finetune=True), "dare", "adamr-l2", "1 - p"),
    (dict(max_abs=0.001, labelled_data=True), "darex-q", None, "per-layer analytic"),
    (dict(max_abs=0.001, labelled_data=True, arch="decoder"), "darex-q", None, "global q scanned"),
    (dict(max_abs=0.01, unlabelled_data=True, arch="decoder"), "darex-q", None, "top-5"),
    (dict(max_abs=0.001), "darex-q", None, "fixed q"),
    (dict(max_abs=0.001, labelled_data=True, structured=True), "structural", None, "analytic"),
])
def test_recommend_follows_the_darex_decision_procedure(kwargs, method, finetune, q_words):
    kwargs = {"drop_rate": 0.99, **kwargs}
    rows = _rows(kwargs.pop("max_abs"))
    result = recommend(rows, **kwargs)
    assert result["method"] == method and result["finetune"] == finetune
    assert (result["q_rule"] is None) == (q_words is None)
    if q_words:
        assert q_words in result["q_rule"]
    assert result["reason"] and "max|delta|" in result["reason"]
    assert result["delta_regime"] == ("large" if rows[1]["max_abs"] > 0.03 else
                                      "small" if rows[1]["max_abs"] <= 0.005 else "moderate")


def test_recommend_accepts_a_dataframe_of_real_diagnostics_and_rejects_nothing_to_prune():
    base, ft = _models(scale=1e-4)
    frame = pd.DataFrame(tensor_diagnostics(base, ft, exclude=[r"(^|\.)classifier\."]))
    result = recommend(frame, drop_rate=0.9, labelled_data=True)
    assert result["method"] == "darex-q" and result["delta_regime"] == "small"
    assert pd.DataFrame([result]).shape == (1, 8)
    with pytest.raises(ValueError, match="nothing would be pruned"):
        recommend([], drop_rate=0.9)
