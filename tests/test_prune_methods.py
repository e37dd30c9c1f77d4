"""DAREx-family, importance-based and structural delta pruning (spec dpp_merge.md §2, §7)."""

import math

import numpy as np
import pytest
import torch

from methods import registry
from methods.merge import common as merge_common
from methods.prune import calibration, darex
from methods.prune.apply import prune_state_dict
from methods.prune.common import drop_count
from methods.prune.dare import dare_delta, keep_mask
from methods.prune.importance import importance_pruner, magnitude_keep_mask, wanda_keep_mask
from methods.prune.structural import structural_keep_mask


def _delta(*shape, seed=0, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _fn(name):
    return registry.get("prune", name).fn


RATES = [0.1, 0.5, 0.9, 0.99]


# --- DARE family: drop-only, darex-q, rescale rules ---------------------------------------------


@pytest.mark.parametrize("p", RATES)
def test_darex_q_with_q_one_minus_p_is_dare_bit_for_bit(p):
    delta = _delta(200, 50)
    out = _fn("darex-q")(delta, drop_rate=p, mask_seed=3, tensor_name="w", q=1 - p)
    assert torch.equal(out, dare_delta(delta, p, 3, "w"))


@pytest.mark.parametrize("p", RATES)
def test_q_one_is_drop_only_and_drop_only_is_dare_without_rescale(p):
    delta = _delta(200, 50)
    drop_only = _fn("drop-only")(delta, drop_rate=p, mask_seed=1, tensor_name="w")
    assert torch.equal(drop_only, _fn("darex-q")(delta, drop_rate=p, mask_seed=1, tensor_name="w", q=1.0))
    assert torch.equal(drop_only, dare_delta(delta, p, 1, "w", rescale=False))
    kept = drop_only != 0
    assert torch.equal(drop_only[kept], delta[kept])


def test_darex_q_entries_are_zero_or_delta_over_q_on_the_dare_mask():
    delta = _delta(20_000)
    q = 0.05
    out = _fn("darex-q")(delta, drop_rate=0.99, mask_seed=0, tensor_name="w", q=q)
    keep = keep_mask(delta.shape, 0.99, 0, "w")
    assert torch.equal(out != 0, keep)
    assert torch.equal(out[keep], delta[keep] / q)


def test_darex_q_expected_square_norm_is_keep_rate_times_norm_over_q_squared():
    """§7.5: E‖DAREx-q(δ)‖² = (1−p)‖δ‖²/q²."""
    delta = _delta(100_000)
    p, q = 0.9, 0.3
    out = _fn("darex-q")(delta, drop_rate=p, mask_seed=0, tensor_name="w", q=q)
    ratio = out.pow(2).sum() / ((1 - p) * delta.pow(2).sum() / q ** 2)
    assert 0.95 < ratio.item() < 1.05


def test_darex_q_output_change_has_the_predicted_bias_and_variance():
    """§2.1 / §7.10: h_diff = δ·x − (δ ⊙ m / q)·x has mean (1 − (1−p)/q)·S1 and variance
    p(1−p)/q²·S2 (Monte Carlo over 4,000 masks, ±10%)."""
    g = torch.Generator().manual_seed(5)
    delta, x = torch.randn(400, generator=g) * 1e-2 + 3e-3, torch.randn(400, generator=g)
    p, q = 0.9, 0.25
    c = delta * x
    diffs = torch.stack([c.sum() - (_fn("darex-q")(delta, drop_rate=p, mask_seed=s, tensor_name="w", q=q)
                                     * x).sum() for s in range(4000)]).double()
    bias, var = (1 - (1 - p) / q) * c.sum().item(), p * (1 - p) / q ** 2 * c.pow(2).sum().item()
    assert abs(diffs.mean().item() - bias) < 4 * math.sqrt(var / 4000)
    assert 0.9 < diffs.var().item() / var < 1.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_darex_q_mask_does_not_depend_on_the_weight_dtype(dtype):
    delta = _delta(50_000).to(dtype)
    out = _fn("darex-q")(delta, drop_rate=0.99, mask_seed=0, tensor_name="w", q=0.05)
    keep = keep_mask(delta.shape, 0.99, 0, "w")
    assert out.dtype == torch.float32 and torch.equal(out != 0, keep & (delta != 0))
    assert torch.equal(out[keep], delta.float()[keep] / 0.05)


def test_darex_q_rate_one_is_zero_and_q_one_rate_zero_is_identity():
    delta = _delta(100)
    assert torch.equal(_fn("darex-q")(delta, drop_rate=1.0, mask_seed=0, tensor_name="w", q=0.5),
                       torch.zeros_like(delta))
    assert torch.equal(_fn("darex-q")(delta, drop_rate=0.0, mask_seed=0, tensor_name="w", q=1.0), delta)


def test_q_per_tensor_exact_name_then_regex_then_global_and_errors_name_the_tensor():
    delta = _delta(1000)
    per = {"enc.layer.0.weight": 0.2, r"enc\.layer\.\d+\.weight": 0.4}
    run = lambda name, **kw: _fn("darex-q")(delta, drop_rate=0.9, mask_seed=0, tensor_name=name, **kw)  # noqa: E731
    keep0 = keep_mask(delta.shape, 0.9, 0, "enc.layer.0.weight")
    assert torch.equal(run("enc.layer.0.weight", q_per_tensor=per, q=0.9)[keep0], delta[keep0] / 0.2)
    keep1 = keep_mask(delta.shape, 0.9, 0, "enc.layer.1.weight")
    assert torch.equal(run("enc.layer.1.weight", q_per_tensor=per, q=0.9)[keep1], delta[keep1] / 0.4)
    keepn = keep_mask(delta.shape, 0.9, 0, "enc.norm.weight")
    assert torch.equal(run("enc.norm.weight", q_per_tensor=per, q=0.9)[keepn], delta[keepn] / 0.9)
    with pytest.raises(ValueError, match="enc.norm.weight"):
        run("enc.norm.weight", q_per_tensor=per)
    with pytest.raises(ValueError, match="'w'.*q must be > 0"):
        run("w", q=0.0)


def test_darex_q_params_follow_the_official_rescale_q_rule():
    params = darex.darex_q_params({"l.0.dense.weight": 0.2, "l.1.dense.weight": 0.4})
    assert params["q"] == pytest.approx(0.3)
    assert params["q_per_tensor"] == {"l.0.dense.weight": 0.2, "l.0.dense.bias": 0.2,
                                      "l.1.dense.weight": 0.4, "l.1.dense.bias": 0.4}
    assert darex.resolve_q("l.1.dense.bias", params["q"], params["q_per_tensor"]) == 0.4
    assert darex.resolve_q("emb.weight", params["q"], params["q_per_tensor"]) == pytest.approx(0.3)


def test_per_row_q_tensor_broadcasts():
    delta = _delta(8, 100)
    q = torch.linspace(0.1, 0.8, 8).reshape(8, 1)
    out = darex.darex_q_delta(delta, 0.5, 0, "w", q)
    keep = keep_mask(delta.shape, 0.5, 0, "w")
    assert torch.equal(out, torch.where(keep, delta / q, torch.zeros(())))


def test_dare_l1_match_preserves_l1_and_equals_the_merge_code_on_the_same_mask():
    delta = _delta(5000, seed=2)
    out = dare_delta(delta, 0.9, 4, "m/k", rescale_rule="l1-match")
    assert torch.equal(out != 0, keep_mask(delta.shape, 0.9, 4, "m/k"))
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    assert torch.equal(out, merge_common.dare(delta, 0.9, 4, "m", "k", "mergekit"))
    # rescale=False wins over the rule: DropOnly
    assert torch.equal(dare_delta(delta, 0.9, 4, "w", rescale=False, rescale_rule="l1-match"),
                       dare_delta(delta, 0.9, 4, "w", rescale=False))


def test_dare_registry_defaults_are_the_paper_semantics():
    spec = registry.get("prune", "dare")
    params = spec.resolve({"drop_rate": 0.5}, "prune[0]")
    assert params == {"drop_rate": 0.5, "rescale": True, "rescale_rule": "inverse-keep"}
    with pytest.raises(registry.MethodConfigError, match="rescale_rule"):
        spec.resolve({"rescale_rule": "l2"}, "prune[0]")


# --- magnitude ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(100, 0.29), (10, 0.9), (768, 0.99), (1, 0.5), (7, 0.0), (7, 1.0), (1000, 0.123)])
def test_magnitude_keeps_exactly_n_minus_floor_pn_largest(n, p):
    delta = _delta(n, seed=n)
    out = _fn("magnitude")(delta, drop_rate=p, mask_seed=0, tensor_name="w")
    k = n - drop_count(n, p)
    assert k == n - math.floor(round(p * n, 9))
    assert int((out != 0).sum()) == k
    if 0 < k < n:
        assert out[out != 0].abs().min() > delta[out == 0].abs().max()
    assert torch.equal(out[out != 0], delta[out != 0])     # no rescale by default


def test_magnitude_ties_drop_lower_index_first_and_keep_the_exact_count():
    delta = torch.tensor([1.0, -1.0, 1.0, 2.0, 1.0, -1.0, 0.5, 1.0]) * 1e-3
    keep = magnitude_keep_mask(delta, 0.5)      # drop 4: the 0.5 entry, then three of the six ±1s
    assert keep.tolist() == [False, False, False, True, True, True, False, True]
    equal = torch.full((4, 25), 1e-3)
    assert int(magnitude_keep_mask(equal, 0.9).sum()) == 10
    assert magnitude_keep_mask(equal, 0.9).reshape(-1)[-10:].all()


def test_magnitude_rescale_options():
    delta = _delta(1000, seed=3)
    kept = _fn("magnitude")(delta, drop_rate=0.8, mask_seed=0, tensor_name="w") != 0
    inv = _fn("magnitude")(delta, drop_rate=0.8, mask_seed=0, tensor_name="w", rescale=True)
    assert torch.equal(inv[kept], delta[kept] / (1 - 0.8))
    l1 = _fn("magnitude")(delta, drop_rate=0.8, mask_seed=0, tensor_name="w", rescale=True, rescale_rule="l1-match")
    assert l1.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    assert torch.equal(l1 != 0, kept)


def test_magnitude_is_deterministic_and_ignores_the_mask_seed():
    delta = _delta(50, 40)
    a = _fn("magnitude")(delta, drop_rate=0.7, mask_seed=0, tensor_name="w")
    assert torch.equal(a, _fn("magnitude")(delta, drop_rate=0.7, mask_seed=9, tensor_name="other"))


# --- importance (Wanda) and calibration ----------------------------------------------------------


def test_wanda_keeps_exact_count_per_row_and_equal_norms_reduce_to_per_row_magnitude():
    delta = _delta(6, 40, seed=4)
    keep = wanda_keep_mask(delta, torch.full((40,), 3.0), 0.75)
    assert keep.sum(1).tolist() == [10] * 6
    for i in range(6):
        assert torch.equal(keep[i], magnitude_keep_mask(delta[i], 0.75))


def test_wanda_norms_change_the_choice_toward_high_activation_features():
    delta = torch.ones(3, 4) * 1e-3
    norms = torch.tensor([1.0, 10.0, 0.1, 5.0])
    keep = wanda_keep_mask(delta, norms, 0.5)
    assert keep.tolist() == [[False, True, False, True]] * 3
    delta[:, 0] = 1e-1      # a large delta on a quiet feature still wins
    assert wanda_keep_mask(delta, norms, 0.5)[:, 0].all()


def test_importance_method_modes_and_errors(tmp_path):
    delta, bias = _delta(6, 40, seed=5), _delta(6, seed=6)
    norms = {"l.weight": torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.1}
    fn = _fn("importance")
    out = fn(delta, drop_rate=0.5, mask_seed=0, tensor_name="l.weight", norms=norms)
    assert torch.equal(out != 0, wanda_keep_mask(delta, norms["l.weight"], 0.5))
    b = fn(bias, drop_rate=0.5, mask_seed=0, tensor_name="l.bias", norms=norms)   # row-magnitude
    assert int((b != 0).sum()) == 3
    assert torch.equal(fn(bias, drop_rate=0.5, mask_seed=0, tensor_name="l.bias", norms=norms,
                          without_norms="keep"), bias)
    with pytest.raises(KeyError, match="l.bias"):
        fn(bias, drop_rate=0.5, mask_seed=0, tensor_name="l.bias", norms=norms, without_norms="error")
    with pytest.raises(ValueError, match="l.weight.*40 input features"):
        fn(delta, drop_rate=0.5, mask_seed=0, tensor_name="l.weight", norms={"l.weight": torch.ones(7)})
    with pytest.raises(ValueError, match="norms"):
        fn(delta, drop_rate=0.5, mask_seed=0, tensor_name="l.weight")
    path = tmp_path / "norms.safetensors"
    calibration.save_vectors(norms, path)
    assert torch.equal(fn(delta, drop_rate=0.5, mask_seed=0, tensor_name="l.weight", norms=str(path)), out)
    bound = importance_pruner(norms)
    assert torch.equal(bound(delta, drop_rate=0.5, mask_seed=0, tensor_name="l.weight"), out)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_calibration_means_and_norms_match_a_direct_computation_and_do_not_depend_on_batching():
    model = _mlp()
    x = torch.randn(30, 5, 8, generator=torch.Generator().manual_seed(1)) + 0.3
    whole = calibration.collect_input_stats(model, [x])
    split = calibration.collect_input_stats(model, list(x.split(7)))
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(whole["0.weight"].mean, flat.mean(0).float())
    torch.testing.assert_close(whole["0.weight"].norm, flat.norm(dim=0).float())
    hidden = torch.relu(model[0](x)).reshape(-1, 16).double()
    torch.testing.assert_close(whole["2.weight"].norm, hidden.norm(dim=0).float(), rtol=1e-5, atol=1e-6)
    for key in whole:
        torch.testing.assert_close(whole[key].mean, split[key].mean)
        torch.testing.assert_close(whole[key].norm, split[key].norm)
    assert set(calibration.input_norms(whole)) == {"0.weight", "2.weight"}
    assert model.training   # mode restored


def test_importance_through_prune_state_dict_with_collected_norms():
    model = _mlp()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = {k: v + _delta(*v.shape, seed=i, scale=1e-2) for i, (k, v) in enumerate(base.items())}
    norms = calibration.input_norms(calibration.collect_input_stats(model, [torch.randn(20, 8)]))
    out, stats = prune_state_dict(base, ft, "importance", {"drop_rate": 0.75, "norms": norms}, 0, [])
    kept = (out["0.weight"] - base["0.weight"]) != 0
    assert kept.sum(1).tolist() == [2] * 16
    assert stats["2.weight"]["kept_fraction"] == pytest.approx(0.25)


# --- structural -----------------------------------------------------------------------------------


def test_structural_drops_whole_rows_and_rescales_survivors_by_one_over_q():
    delta = _delta(400, 30, seed=7)
    out = _fn("structural")(delta, drop_rate=0.6, mask_seed=0, tensor_name="l.weight")
    rows_kept = (out != 0).any(1)
    assert torch.equal((out != 0), rows_kept.unsqueeze(1).expand_as(out))          # whole rows
    assert torch.equal(out[rows_kept], delta[rows_kept] / (1 - 0.6))
    assert abs(1 - rows_kept.float().mean().item() - 0.6) < 4 * math.sqrt(0.24 / 400)
    q = _fn("structural")(delta, drop_rate=0.6, mask_seed=0, tensor_name="l.weight", q=0.8)
    assert torch.equal(q[rows_kept], delta[rows_kept] / 0.8)


def test_structural_bias_follows_its_weight_rows_and_columns_mode_drops_columns():
    weight, bias = _delta(50, 20, seed=8), _delta(50, seed=9)
    w = _fn("structural")(weight, drop_rate=0.5, mask_seed=2, tensor_name="x.dense.weight")
    b = _fn("structural")(bias, drop_rate=0.5, mask_seed=2, tensor_name="x.dense.bias")
    assert torch.equal((w != 0).any(1), b != 0)
    cols = _fn("structural")(weight, drop_rate=0.5, mask_seed=2, tensor_name="x.dense.weight", axis="columns")
    kept_cols = (cols != 0).any(0)
    assert torch.equal(cols != 0, kept_cols.unsqueeze(0).expand_as(cols))
    assert 0 < int(kept_cols.sum()) < 20


def test_structural_masks_are_seeded_per_tensor_and_rate_extremes_hold():
    m = structural_keep_mask(torch.Size([500, 3]), 0.5, 0, "a.weight")
    assert torch.equal(m, structural_keep_mask(torch.Size([500, 3]), 0.5, 0, "a.weight"))
    assert not torch.equal(m, structural_keep_mask(torch.Size([500, 3]), 0.5, 1, "a.weight"))
    assert not torch.equal(m, structural_keep_mask(torch.Size([500, 3]), 0.5, 0, "b.weight"))
    delta = _delta(10, 10)
    assert torch.equal(_fn("structural")(delta, drop_rate=0.0, mask_seed=0, tensor_name="w"), delta)
    assert torch.equal(_fn("structural")(delta, drop_rate=1.0, mask_seed=0, tensor_name="w"), torch.zeros_like(delta))


@pytest.mark.parametrize("method,params", [
    ("drop-only", {}), ("darex-q", {"q": 0.3}), ("magnitude", {}), ("structural", {}),
    ("dare", {"rescale_rule": "l1-match"})])
def test_every_method_runs_through_prune_state_dict_with_registry_defaults(method, params):
    g = torch.Generator().manual_seed(0)
    base = {"enc.layer.0.w.weight": torch.randn(16, 8, generator=g), "enc.layer.0.w.bias": torch.randn(16, generator=g),
            "classifier.weight": torch.randn(2, 16, generator=g)}
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    resolved = registry.get("prune", method).resolve({**params, "drop_rate": 0.5}, "prune[0]")
    out, stats = prune_state_dict(base, ft, method, resolved, 0, [r"(^|\.)classifier\."])
    assert torch.equal(out["classifier.weight"], ft["classifier.weight"])
    assert 0.2 < stats["enc.layer.0.w.weight"]["kept_fraction"] < 0.8
    zero, _ = prune_state_dict(base, ft, method, {**resolved, "drop_rate": 1.0}, 0, [])
    assert torch.equal(zero["enc.layer.0.w.weight"], base["enc.layer.0.w.weight"])


# --- q rules: scan, analytic, MSE-optimal, learned -------------------------------------------------


def _official_find_optimal_param(objective, l_bound, u_bound, step=0.1, decay=0.1):
    """find_q_encoder.py::find_optimal_param, verbatim but for the objective argument."""
    best_score, best_scores, stop_id = -np.inf, {}, 0
    for initial in np.arange(l_bound, u_bound + step, step):
        score = objective(initial)
        best_scores[initial] = score
        if score >= best_score:
            best_score, stop_id = score, 0
        else:
            stop_id += 1
        if stop_id > 3:
            break
    sorted_slots = sorted(best_scores.items(), key=lambda x: x[1], reverse=True)
    l_bound = max(l_bound + step * decay, sorted_slots[0][0] - step * (1 - decay))
    u_bound = sorted_slots[0][0] + step
    best_score, stop_id = -np.inf, 0
    for initial in np.arange(l_bound, u_bound, step * decay):
        score = objective(initial)
        best_scores[initial] = score
        if score >= best_score:
            best_score, stop_id = score, 0
        else:
            stop_id += 1
        if stop_id > 3:
            break
    sorted_slots = sorted(best_scores.items(), key=lambda x: x[1], reverse=True)
    return sorted_slots[0][0]


@pytest.mark.parametrize("optimum", [0.013, 0.0712, 0.137, 0.26])
def test_scan_finds_the_optimum_of_a_unimodal_function_like_the_official_code(optimum):
    score = lambda q: -abs(q - optimum)  # noqa: E731
    result = darex.scan_global_q(score, 0.01, 0.3, 0.05)
    assert abs(result.best - optimum) <= 0.0025 + 1e-12
    assert result.best == pytest.approx(_official_find_optimal_param(score, 0.01, 0.3, 0.05), abs=1e-9)
    loss = lambda q: (q - optimum) ** 2  # noqa: E731
    assert darex.scan_global_q(loss, 0.01, 0.3, 0.05, maximize=False).best == pytest.approx(result.best)


def test_scan_stops_early_after_patience_worse_points():
    calls = []
    darex.scan_global_q(lambda q: calls.append(q) or -q, 0.0, 1.0, 0.05)
    coarse = [q for q in calls if round(q / 0.05, 6) == round(q / 0.05)]
    assert len(calls) < 15 and len(coarse) >= 5   # 1 best + 4 worse, then a short fine pass


def test_mean_without_outlier():
    assert darex.mean_without_outlier([1.0, 1.1, 0.9, 5.0]) == pytest.approx(1.0)
    assert darex.mean_without_outlier([1.0, 3.0]) == 2.0


def _official_row_q(p, c, eta, prob=0.95, stop_iter=0.8, q_start=None):
    """analytical_resolve_new in float64 (the official runs fp16), starting at ``q_start``·1000."""
    q_o = torch.ones(c.shape[0], 1, dtype=torch.float64) * (1 - p)
    stop_index = torch.zeros(c.shape[0], 1)
    best_res = torch.ones_like(q_o) * 10000
    phi = (1 - 2 * p) / np.log((1 - p) / p)
    for q_1000 in range(q_start, 999):
        q = q_1000 * 0.001
        term1 = (1 - (1 - p) / q) * torch.sum(c, dim=1, keepdim=True)
        term2 = eta ** 2 * phi * torch.sum(c ** 2, dim=1, keepdim=True) / (4 * q ** 2) + np.log(2 / (1 - prob))
        res = abs(eta * term1 + term2)
        index_s, index_l = res <= best_res, res >= best_res
        best_res[index_s] = res[index_s]
        q_o[index_s] = q
        stop_index[index_l] = 1
        if stop_index.mean() >= stop_iter:
            break
    return q_o.reshape(-1)


@pytest.mark.parametrize("p,eta", [(0.99, 0.37), (0.9, 1.01), (0.95, 0.27)])
def test_analytic_row_q_matches_the_official_scan_and_stays_in_range(p, eta):
    g = torch.Generator().manual_seed(11)
    c = (torch.randn(64, 33, generator=g, dtype=torch.float64) * 0.5 + 0.05)
    ours = darex.analytic_row_q(c, p, eta).double()
    start = round((1 - p) * 1000)
    torch.testing.assert_close(ours, _official_row_q(p, c, eta, q_start=start), atol=1e-6, rtol=0)
    assert ours.min() >= 1 - p - 1e-6 and ours.max() <= 0.999


def test_analytic_q_grid_never_starts_below_one_minus_p_and_zero_delta_gives_no_nan():
    assert darex.analytic_q_grid(0.9)[0].item() == pytest.approx(0.1)
    assert int((1 - 0.9) * 1000) == 99            # the official start: below 1 − p
    assert math.isfinite(darex.phi(0.5)) and darex.phi(0.5) == 0.5
    deltas = {"l.weight": torch.zeros(5, 4), "l.bias": torch.zeros(5)}
    q = darex.analytic_q(deltas, {"l.weight": torch.ones(4)}, 0.99, 0.37)
    assert set(q) == {"l.weight"} and math.isfinite(q["l.weight"]) and 0.01 <= q["l.weight"] <= 0.999


def test_mse_optimal_q_formula_and_it_minimises_monte_carlo_output_mse():
    """§7.12: q*_i = (1−p) + p·S2/S1² minimises the output MSE among a q grid."""
    g = torch.Generator().manual_seed(2)
    delta, x = torch.randn(1, 60, generator=g) * 1e-2 + 4e-3, torch.randn(60, generator=g).abs()
    p = 0.9
    c = delta[0] * x
    q_star = darex.mse_optimal_q(delta, x, p)
    assert q_star.item() == pytest.approx((1 - p) + p * c.pow(2).sum().item() / c.sum().item() ** 2, rel=1e-5)
    masks = [keep_mask(delta.shape, p, s, "w") for s in range(3000)]
    grid = sorted({0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.0, round(q_star.item(), 4)})

    def mse(q):
        return float(np.mean([((torch.where(m, delta, 0.0) / q - delta) @ x).pow(2).item() for m in masks]))

    errors = {q: mse(q) for q in grid}
    assert min(errors, key=errors.get) == round(q_star.item(), 4)
    assert errors[round(q_star.item(), 4)] < errors[0.1]      # beats DARE's q = 1 − p


def test_mse_optimal_q_over_inputs_and_zero_sum_rows():
    delta = torch.tensor([[1.0, -1.0], [2.0, 0.0]]) * 1e-3
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    q = darex.mse_optimal_q(delta, x, 0.5)
    assert math.isinf(q[0].item())                              # S1 = 0 for every input: drop it
    assert q[1].item() == pytest.approx(0.5 + 0.5 * 1.0)       # S2/S1² = 1 for a single entry
    layer = darex.mse_optimal_q(delta, x, 0.5, per_row=False)
    assert layer.dim() == 0 and layer.item() >= 0.5


def _pruned_setup(model, p=0.9, scale=0.05, seed=0):
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    deltas = {k: scale * torch.randn(v.shape, generator=g) + scale / 2 for k, v in base.items()}
    masks = {k: keep_mask(v.shape, p, 0, k) for k, v in deltas.items()}
    return base, deltas, masks


def test_learned_layer_q_reduces_output_change_on_a_tiny_mlp_and_is_deterministic():
    model = _mlp(1)
    base, deltas, masks = _pruned_setup(model)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(32, 8, generator=g) for _ in range(40)]
    val = [torch.randn(64, 8, generator=g)]
    result = darex.learn_layer_q(model, base, deltas, masks, batches, drop_rate=0.9, target="logits",
                                 val_batches=val, eval_every=5, patience=100)
    assert set(result.layer_q) == {"0.weight", "2.weight"}
    assert all(q >= 0.1 for q in result.layer_q.values())
    assert result.val_losses[-1][1] < 0.5 * result.val_losses[0][1]          # DARE's q → learned q
    again = darex.learn_layer_q(model, base, deltas, masks, batches, drop_rate=0.9, target="logits",
                                val_batches=val, eval_every=5, patience=100)
    assert again.layer_q == result.layer_q
    assert all(p.grad is None and p.requires_grad for p in model.parameters())   # model untouched

    def change(layer_q):
        params = darex.darex_q_params(layer_q)
        pruned = {k: base[k] + torch.where(masks[k], deltas[k], 0.0)
                  / darex.resolve_q(k, params["q"], params["q_per_tensor"]) for k in base}
        ft = {k: base[k] + deltas[k] for k in base}
        out = torch.func.functional_call(model, pruned, (val[0],))
        return (out - torch.func.functional_call(model, ft, (val[0],))).pow(2).mean().item()

    assert change(result.layer_q) < 0.5 * change({k: 0.1 for k in result.layer_q})


def test_learned_layer_q_on_a_tiny_bert_last_hidden_state():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config, add_pooling_layer=False)
    base, deltas, masks = _pruned_setup(model, p=0.9, scale=0.02)
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": torch.randint(0, 40, (4, 12), generator=g)} for _ in range(40)]
    val = [{"input_ids": torch.randint(0, 40, (16, 12), generator=g)}]
    result = darex.learn_layer_q(model, base, deltas, masks, batches, drop_rate=0.9, loss="mse", lr=3e-2,
                                 target="last_hidden_state", val_batches=val, eval_every=5, patience=100)
    assert len(result.layer_q) == 6      # query, key, value, attention output, intermediate, output
    assert all(q > 0.1 for q in result.layer_q.values())
    first, last = result.val_losses[0], result.val_losses[-1]
    assert first[0] == 0 and last[1] < 0.75 * first[1]     # step 0 is DARE (every q = 1 − p)
    assert result.initial_loss > np.mean(result.train_losses[-5:])
