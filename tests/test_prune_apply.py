"""Whole-model pruning: which tensors are touched, dtype handling, and clear errors."""

import pytest
import torch

from methods.prune.apply import DEFAULT_EXCLUDE, prune_state_dict

PARAMS = {"drop_rate": 0.9, "rescale": True}


def _models(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    base = {"bert.encoder.weight": torch.randn(32, 32, generator=g),
            "bert.pooler.dense.weight": torch.randn(32, 32, generator=g)}
    ft = {k: (v + 1e-2 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
    ft["classifier.weight"] = torch.randn(2, 32, generator=g).to(dtype)  # new head: no base value
    ft["bert.embeddings.position_ids"] = torch.arange(32)
    return base, ft


def test_classifier_and_integer_buffers_kept_bit_identical():
    base, ft = _models()
    out, stats = prune_state_dict(base, ft, "dare", PARAMS, 0, DEFAULT_EXCLUDE["encoder"])
    assert torch.equal(out["classifier.weight"], ft["classifier.weight"])
    assert torch.equal(out["bert.embeddings.position_ids"], ft["bert.embeddings.position_ids"])
    assert stats["classifier.weight"] == {"pruned": False, "reason": "excluded by pattern"}
    assert stats["bert.pooler.dense.weight"]["pruned"]  # the pooler is pruned, as in MergeLM


def test_pruned_tensor_is_base_plus_dare_delta():
    base, ft = _models()
    out, stats = prune_state_dict(base, ft, "dare", PARAMS, 0, [])
    delta = out["bert.encoder.weight"] - base["bert.encoder.weight"]
    original = ft["bert.encoder.weight"] - base["bert.encoder.weight"]
    kept = stats["bert.encoder.weight"]["kept_fraction"]
    assert 0.02 < kept < 0.25
    torch.testing.assert_close(delta[delta != 0], (original / 0.1)[delta != 0], rtol=1e-5, atol=1e-6)


def test_new_tensor_without_exclusion_is_kept_as_fine_tuned():
    base, ft = _models()
    out, stats = prune_state_dict(base, ft, "dare", PARAMS, 0, [])
    assert torch.equal(out["classifier.weight"], ft["classifier.weight"])
    assert stats["classifier.weight"]["reason"] == "absent from base (new head)"


def test_output_keeps_fine_tuned_dtype():
    base, ft = _models(torch.bfloat16)
    out, _ = prune_state_dict(base, ft, "dare", PARAMS, 0, [])
    assert out["bert.encoder.weight"].dtype == torch.bfloat16


def test_shape_mismatch_names_the_tensor():
    base, ft = _models()
    base["bert.encoder.weight"] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match="bert.encoder.weight"):
        prune_state_dict(base, ft, "dare", PARAMS, 0, [])


def test_rate_zero_returns_the_fine_tuned_weights_bit_for_bit():
    base, ft = _models()
    out, _ = prune_state_dict(base, ft, "dare", {"drop_rate": 0.0, "rescale": True}, 0, [])
    assert all(torch.equal(out[k], ft[k]) for k in ft)
    dropped, _ = prune_state_dict(base, ft, "dare", {"drop_rate": 1.0, "rescale": True}, 0, [])
    assert torch.equal(dropped["bert.encoder.weight"], base["bert.encoder.weight"])


def test_tensor_presets_select_attention_and_mlp_only():
    from methods.prune.apply import excluded, exclusion

    encoder = exclusion({"tensors": "attention-mlp"}, "encoder")
    assert not excluded("bert.encoder.layer.0.attention.self.query.weight", encoder)
    assert not excluded("bert.encoder.layer.1.intermediate.dense.bias", encoder)
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.LayerNorm.weight",
                 "bert.pooler.dense.weight", "classifier.weight"):
        assert excluded(name, encoder), name
    decoder = exclusion({"tensors": "attention-mlp"}, "decoder")
    assert not excluded("model.layers.3.self_attn.q_proj.weight", decoder)
    assert not excluded("model.layers.0.mlp.down_proj.weight", decoder)
    for name in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert excluded(name, decoder), name
    assert exclusion({}, "encoder") == [r"(^|\.)classifier\."] and exclusion({"tensors": "all"}, "encoder") == []
    assert exclusion({"exclude": ["x"], "tensors": "all"}, "decoder") == ["x"]
