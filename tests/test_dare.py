"""DARE properties (spec dpp_merge.md §7, checks 1-8)."""

import math

import pytest
import torch

from methods.prune.apply import prune_state_dict
from methods.prune.dare import dare_delta, keep_mask


def _delta(n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 1e-3


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_fraction_dropped_is_p(p):
    delta = _delta()
    out = dare_delta(delta, p, mask_seed=0, tensor_name="w")
    dropped = (out == 0).float().mean().item()
    n = delta.numel()
    assert abs(dropped - p) <= 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_survivors_equal_delta_over_keep_rate(p):
    delta = _delta()
    out = dare_delta(delta, p, mask_seed=3, tensor_name="w")
    kept = out != 0
    assert kept.any()
    assert torch.equal(out[kept], delta[kept] / (1 - p))


def test_rate_zero_is_identity_and_rate_one_gives_zero():
    delta = _delta()
    assert torch.equal(dare_delta(delta, 0.0, 0, "w"), delta)
    out = dare_delta(delta, 1.0, 0, "w")
    assert torch.equal(out, torch.zeros_like(delta)) and torch.isfinite(out).all()


def test_drop_only_keeps_survivors_unscaled():
    delta = _delta()
    out = dare_delta(delta, 0.9, 0, "w", rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert torch.equal(kept, dare_delta(delta, 0.9, 0, "w") != 0)  # same mask as DARE


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_mean_over_masks_converges_to_delta(p):
    """E[DARE(δ)] = δ. The squared error of a K-mask mean is (p/(1-p))·‖δ‖²/K in expectation;
    allow 3x that (a chi-square-like sum over 2,000 entries sits well inside)."""
    delta = _delta(2_000)
    k = 400
    mean = torch.stack([dare_delta(delta, p, seed, "w") for seed in range(k)]).mean(0)
    error = (mean - delta).pow(2).sum().item()
    expected = p / (1 - p) * delta.pow(2).sum().item() / k
    assert 0.5 * expected < error < 1.5 * expected


def test_expected_norm_grows_by_inverse_keep_rate():
    delta = _delta(50_000)
    p = 0.9
    out = dare_delta(delta, p, 0, "w")
    ratio = out.pow(2).sum() / (delta.pow(2).sum() / (1 - p))
    assert 0.95 < ratio.item() < 1.05


def test_masks_identical_across_runs_and_differ_across_seeds_and_tensors():
    a = keep_mask(torch.Size([1000]), 0.5, 7, "layer.weight")
    b = keep_mask(torch.Size([1000]), 0.5, 7, "layer.weight")
    assert torch.equal(a, b)
    assert not torch.equal(a, keep_mask(torch.Size([1000]), 0.5, 8, "layer.weight"))
    assert not torch.equal(a, keep_mask(torch.Size([1000]), 0.5, 7, "other.weight"))


def test_masks_do_not_depend_on_tensor_order_or_other_tensors():
    g = torch.Generator().manual_seed(1)
    base = {name: torch.randn(64, 32, generator=g) for name in ("a.weight", "b.weight", "c.weight")}
    ft = {name: w + 1e-3 * torch.randn(w.shape, generator=g) for name, w in base.items()}
    forward, _ = prune_state_dict(base, ft, "dare", {"drop_rate": 0.9, "rescale": True}, 0, [])
    backward_order = dict(reversed(list(ft.items())))
    backward, _ = prune_state_dict(base, backward_order, "dare", {"drop_rate": 0.9, "rescale": True}, 0, [])
    only_b, _ = prune_state_dict(base, {"b.weight": ft["b.weight"]}, "dare", {"drop_rate": 0.9, "rescale": True}, 0, [])
    for name in ft:
        assert torch.equal(forward[name], backward[name])
    assert torch.equal(forward["b.weight"], only_b["b.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mask_independent_of_weight_dtype_and_keep_rate_exact_in_low_precision(dtype):
    """A bf16 probability tensor would make p = 0.99 keep 1.17% (spec §1.6); masks are drawn in
    float32 whatever the weights' dtype, so the realised keep rate is 1%."""
    delta = _delta(200_000).to(dtype)
    keep = keep_mask(delta.shape, 0.99, 0, "w")
    out = dare_delta(delta, 0.99, 0, "w")
    assert torch.equal(out != 0, keep & (delta != 0))
    assert torch.equal(out[keep], delta.float()[keep] / (1 - 0.99))
    assert abs(keep.float().mean().item() - 0.01) < 4 * math.sqrt(0.01 * 0.99 / delta.numel())


def test_out_of_range_rate_rejected():
    with pytest.raises(ValueError, match="drop_rate"):
        dare_delta(_delta(10), 1.5, 0, "w")
