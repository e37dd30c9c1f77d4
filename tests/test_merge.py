"""Merge methods (spec dpp_merge.md §3, §7 checks 18-25, 27, 30) and whole-model merging (apply.py)."""

import inspect
import itertools
import math

import pytest
import torch

from methods import registry
from methods.merge import common
from methods.merge.apply import merge_state_dicts
from methods.merge.delta_fusion import fusion_weights
from methods.prune.dare import keep_mask

METHODS = {"average", "soup-greedy", "task-arithmetic", "ties", "dare-ta", "dare-ties", "slerp", "delta-fusion"}
SHAPES = {"enc.layer.weight": (24, 16), "enc.layer.bias": (16,), "enc.norm.weight": (16,), "head.dense.weight": (8, 16)}


def _sd(seed, scale=1.0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}


def _zoo(n=3, zero_base=False, seed=0):
    """Base and n fine-tunes (base + distinct random deltas). A zero base makes θ_t = δ_t exactly."""
    base = {k: torch.zeros_like(v) for k, v in _sd(seed).items()} if zero_base else _sd(seed)
    names = [f"task{i}" for i in range(n)]
    models = {n_: {k: base[k] + d for k, d in _sd(seed + 10 + i, 1e-2).items()} for i, n_ in enumerate(names)}
    return base, models


def _merge(method, base, models, seed=0, score_fn=None, **params):
    params = registry.get("merge", method).resolve(params, "params")
    return merge_state_dicts(method, base, models, params, seed=seed, score_fn=score_fn)


def _fn(method, base, models, seed=0, score_fn=None, info=None, **params):
    """Call the registered function directly with the given model order."""
    params = registry.get("merge", method).resolve(params, "params")
    names = list(models)
    return registry.get("merge", method).fn(base, [models[n] for n in names], names=names, seed=seed,
                                            score_fn=score_fn, info=info, **params)


def _close(a, b, **kw):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **{"atol": 1e-7, "rtol": 1e-6, **kw}, msg=lambda m: f"{k}: {m}")


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _neg_distance_to(target):
    return lambda sd: -sum(float(((sd[k] - target[k]) ** 2).sum()) for k in target)


# --- registry ---------------------------------------------------------------------------------

def test_all_methods_registered_with_matching_defaults():
    assert set(registry.names("merge")) == METHODS
    for name in METHODS:
        spec = registry.get("merge", name)
        signature = inspect.signature(spec.fn)
        assert list(signature.parameters)[:2] == ["base", "models"]
        assert {"names", "seed", "score_fn", "info"} <= set(signature.parameters)
        for p in spec.params:  # the function's defaults are the registry's defaults
            assert signature.parameters[p.name].default == p.default, (name, p.name)


def test_density_and_semantics_are_validated():
    with pytest.raises(registry.MethodConfigError, match="params.density"):
        registry.get("merge", "ties").resolve({"density": 1.5}, "params")
    with pytest.raises(registry.MethodConfigError, match="params.semantics"):
        registry.get("merge", "dare-ta").resolve({"semantics": "peft"}, "params")


# --- task arithmetic (check 18) ---------------------------------------------------------------

@pytest.mark.parametrize("method,params", [
    ("task-arithmetic", {}), ("ties", {}), ("ties", {"semantics": "mergekit", "density": 0.5}),
    ("dare-ta", {}), ("dare-ta", {"semantics": "mergekit"}), ("dare-ties", {}), ("dare-ties", {"semantics": "mergekit"}),
])
def test_scale_zero_returns_the_base(method, params):
    base, models = _zoo()
    out, _ = _merge(method, base, models, scale=0.0, **params)
    _equal(out, base)


def test_task_arithmetic_is_base_plus_scaled_sum():
    base, models = _zoo()
    out, _ = _merge("task-arithmetic", base, models, scale=0.3)
    expected = {k: base[k] + 0.3 * sum(m[k] - base[k] for m in models.values()) for k in base}
    _close(out, expected)


@pytest.mark.parametrize("method,params", [
    ("task-arithmetic", {}), ("ties", {"density": 1.0}), ("ties", {"density": 1.0, "semantics": "mergekit"}),
    ("dare-ta", {"drop_rate": 0.0}), ("delta-fusion", {}), ("average", {}),
])
def test_one_model_with_scale_one_is_that_model(method, params):
    base, models = _zoo(n=1)
    out, _ = _merge(method, base, models, **params)
    _close(out, models["task0"])


# --- TIES (checks 19-22) ----------------------------------------------------------------------

@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_ties_of_identical_models_density_one_is_that_model(semantics):
    base, models = _zoo(n=1)
    same = {n: models["task0"] for n in ("a", "b", "c")}
    out, _ = _merge("ties", base, same, density=1.0, semantics=semantics)
    _close(out, models["task0"])


def test_ties_paper_identical_models_keep_global_top_k():
    base, models = _zoo(n=1, zero_base=True)
    delta = models["task0"]
    same = {n: delta for n in ("a", "b")}
    out, _ = _merge("ties", base, same, density=0.2)  # granularity "model": one threshold for the whole model
    magnitudes = torch.cat([d.abs().reshape(-1) for d in delta.values()])
    keep = int(0.2 * magnitudes.numel())
    threshold = magnitudes.sort(descending=True).values[keep - 1]
    expected = {k: torch.where(d.abs() >= threshold, d, 0.0) for k, d in delta.items()}
    _equal(out, expected)
    assert sum(int((v != 0).sum()) for v in out.values()) == keep
    assert not torch.equal(out["enc.layer.weight"], delta["enc.layer.weight"])  # not the original model


def test_ties_mergekit_identical_models_keep_per_tensor_top_k():
    base, models = _zoo(n=1, zero_base=True)
    delta = models["task0"]
    out, _ = _merge("ties", base, {"a": delta, "b": delta}, density=0.3, semantics="mergekit")
    for k, d in delta.items():
        keep = max(1, int(0.3 * d.numel()))
        assert int((out[k] != 0).sum()) == keep
        assert torch.equal(out[k].abs().reshape(-1).sort().values[-keep:], d.abs().reshape(-1).sort().values[-keep:])


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_ties_trim_fraction_is_exact_for_distinct_magnitudes(granularity, density):
    base, models = _zoo(n=1, zero_base=True)
    out, _ = _merge("ties", base, models, density=density, granularity=granularity)
    counts = {k: int((v != 0).sum()) for k, v in out.items()}
    sizes = {k: v.numel() for k, v in out.items()}
    if granularity == "tensor":
        assert counts == {k: max(1, int(density * n)) for k, n in sizes.items()}
    else:
        assert sum(counts.values()) == int(density * sum(sizes.values()))
        # one global threshold: per-tensor fractions differ (the small-magnitude bias gets fewer)
        assert len({round(counts[k] / sizes[k], 3) for k in counts}) > 1


def test_ties_trim_keeps_entries_tied_with_the_threshold():
    delta = torch.tensor([0.5, -0.5, 0.5, 0.1, -0.2, 0.0])
    assert torch.equal(common.trim_top_magnitude(delta, 0.2), torch.tensor([0.5, -0.5, 0.5, 0, 0, 0]))
    # mergekit rule: exactly max(1, int(0.2*6)) = 1 kept; ties go to the lower index
    assert torch.equal(common.trim_top_exact(delta, 0.2), torch.tensor([0.5, 0, 0, 0, 0, 0]))
    assert torch.equal(common.trim_top_magnitude(delta, 0.0), torch.zeros(6))


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_ties_entries_have_elected_sign_and_lie_between_agreeing_values(density, semantics):
    base, models = _zoo(n=4, zero_base=True)
    out, _ = _merge("ties", base, models, density=density, granularity="tensor", semantics=semantics)
    for k in base:
        trim = common.trim_top_magnitude if semantics == "paper" else common.trim_top_exact
        trimmed = torch.stack([trim(m[k], density) for m in models.values()])
        gamma = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == gamma) & (trimmed != 0)
        merged = out[k]
        nonzero = merged != 0
        assert nonzero.any()
        assert torch.equal(torch.sign(merged[nonzero]), gamma[nonzero])
        low = torch.where(agree, trimmed, math.inf).amin(0)
        high = torch.where(agree, trimmed, -math.inf).amax(0)
        slack = 1e-6 * merged.abs()
        assert bool(((merged >= low - slack) & (merged <= high + slack))[nonzero].all())


@pytest.mark.parametrize("values,paper,mergekit", [
    # the last entry's trimmed deltas cancel (γ = 0): paper → global majority sign, mergekit → +1
    ([[1.0, 2.0, 3.0, -5.0], [1.0, 2.0, 3.0, 5.0]], 5.0, 5.0),
    ([[-1.0, -2.0, -3.0, -5.0], [-1.0, -2.0, -3.0, 5.0]], -5.0, 5.0),
])
def test_ties_zero_sign_tie_break(values, paper, mergekit):
    base = {"w": torch.zeros(4)}
    models = {f"m{i}": {"w": torch.tensor(v)} for i, v in enumerate(values)}
    assert _merge("ties", base, models, density=1.0)[0]["w"][3] == paper
    assert _merge("ties", base, models, density=1.0, semantics="mergekit")[0]["w"][3] == mergekit


def test_ties_disjoint_mean_vs_mergekit_normalization():
    base = {"w": torch.zeros(3)}
    models = {"a": {"w": torch.tensor([1.0, 4.0, -1.0])}, "b": {"w": torch.tensor([3.0, -1.0, -3.0])},
              "c": {"w": torch.tensor([0.0, -2.0, 2.0])}}
    # entry 0: agreeing {1, 3} → 2; entry 1: Σ = 1 > 0 → only 4; entry 2: Σ = −2 → {−1, −3} → −2
    for semantics in ("paper", "mergekit"):
        out, _ = _merge("ties", base, models, density=1.0, semantics=semantics)
        assert torch.equal(out["w"], torch.tensor([2.0, 4.0, -2.0]))


# --- order invariance (check 22) and DARE masks (check 23) -----------------------------------

@pytest.mark.parametrize("method,params", [
    ("average", {}), ("soup-greedy", {}), ("task-arithmetic", {"scale": 0.4}), ("ties", {}),
    ("ties", {"semantics": "mergekit", "density": 0.3}), ("ties", {"granularity": "tensor"}),
    ("dare-ta", {"drop_rate": 0.5}), ("dare-ta", {"drop_rate": 0.5, "semantics": "mergekit"}),
    ("dare-ties", {"drop_rate": 0.5}), ("dare-ties", {"drop_rate": 0.5, "semantics": "mergekit"}),
    ("delta-fusion", {"alpha": 2.0}), ("slerp", {"t": 0.3}),
])
def test_model_order_does_not_change_the_result(method, params):
    base, models = _zoo(n=2 if method == "slerp" else 3)
    score = _neg_distance_to(models["task1"]) if method == "soup-greedy" else None
    reference, info = _merge(method, base, models, seed=3, score_fn=score, **params)
    for order in itertools.permutations(models):
        permuted = {n: models[n] for n in order}
        out, other_info = _merge(method, base, permuted, seed=3, score_fn=score, **params)
        _equal(out, reference)
        assert other_info == info
        _equal(_fn(method, base, permuted, seed=3, score_fn=score, **params), reference)


@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_adding_a_model_does_not_change_the_other_models_masks(semantics):
    base, models = _zoo(n=2)
    two, _ = _merge("dare-ta", base, models, seed=1, drop_rate=0.6, semantics=semantics)
    # a model with zero delta named so that it sorts between the others: masks keyed by index would shift
    three, _ = _merge("dare-ta", base, {**models, "task0b": dict(base)}, seed=1, drop_rate=0.6, semantics=semantics)
    _equal(two, three)
    other_seed, _ = _merge("dare-ta", base, models, seed=2, drop_rate=0.6, semantics=semantics)
    assert not torch.equal(other_seed["enc.layer.weight"], two["enc.layer.weight"])


def test_dare_paper_survivors_are_delta_over_keep_rate_with_name_keyed_masks():
    base, models = _zoo(n=1, zero_base=True)
    out, _ = _merge("dare-ta", base, models, seed=4, drop_rate=0.75)
    for k, d in models["task0"].items():
        keep = keep_mask(d.shape, 0.75, 4, f"task0/{k}")
        assert torch.equal(out[k], torch.where(keep, d / 0.25, 0.0))


def test_dare_masks_of_different_models_are_independent():
    p, shape = 0.5, (200, 200)
    a = keep_mask(shape, p, 0, "task0/w").float().reshape(-1)
    b = keep_mask(shape, p, 0, "task1/w").float().reshape(-1)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 4 / math.sqrt(a.numel())


@pytest.mark.parametrize("dare_method,plain_method,params", [
    ("dare-ta", "task-arithmetic", {"scale": 0.7}), ("dare-ties", "ties", {"density": 0.3, "scale": 0.7}),
    ("dare-ties", "ties", {"density": 0.3, "granularity": "tensor"}),
])
def test_dare_with_rate_zero_is_the_plain_merge(dare_method, plain_method, params):
    base, models = _zoo()
    dared, _ = _merge(dare_method, base, models, drop_rate=0.0, **params)
    plain, _ = _merge(plain_method, base, models, **params)
    _equal(dared, plain)


@pytest.mark.parametrize("method", ["dare-ta", "dare-ties"])
@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_dare_with_rate_one_is_the_base(method, semantics):
    base, models = _zoo()
    out, _ = _merge(method, base, models, drop_rate=1.0, semantics=semantics)
    _equal(out, base)


# --- mergekit semantics details (check 27) ----------------------------------------------------

def test_l1_rescale_preserves_the_l1_norm():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e-3
    for p in (0.5, 0.9, 0.99):
        keep = keep_mask(delta.shape, p, 0, "w")
        out = common.l1_rescale(delta, keep)
        assert keep.any()
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-6, atol=0)
        assert torch.equal(out == 0, ~keep)
        ratio = out[keep] / delta[keep]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))  # one factor per tensor
    assert torch.equal(common.l1_rescale(delta, torch.zeros_like(delta, dtype=torch.bool)), torch.zeros_like(delta))


def test_dare_mergekit_semantics_rescales_each_tensor_by_l1():
    base, models = _zoo(n=1, zero_base=True)
    out, _ = _merge("dare-ta", base, models, seed=2, drop_rate=0.9, semantics="mergekit")
    for k, d in models["task0"].items():
        keep = keep_mask(d.shape, 0.9, 2, f"task0/{k}")
        if keep.any():
            torch.testing.assert_close(out[k].abs().sum(), d.abs().sum(), rtol=1e-6, atol=0)
        assert torch.equal(out[k] != 0, keep & (d != 0))


def test_mergekit_dare_ties_sums_agreeing_deltas_paper_averages():
    base, models = _zoo(n=1)
    same = {"a": models["task0"], "b": models["task0"]}
    delta = {k: v - base[k] for k, v in models["task0"].items()}
    summed, info = _merge("dare-ties", base, same, drop_rate=0.0, semantics="mergekit")
    _close(summed, {k: base[k] + 2 * delta[k] for k in base})
    assert "density and granularity are ignored" in info["notes"][0]
    mean, _ = _merge("dare-ties", base, same, drop_rate=0.0, density=1.0, semantics="paper")
    _close(mean, models["task0"])


# --- soups (checks 24, 25) --------------------------------------------------------------------

def test_uniform_soup_of_identical_models_is_that_model_and_of_two_the_midpoint():
    base, models = _zoo(n=2)
    out, _ = _merge("average", base, {n: models["task0"] for n in ("a", "b", "c")})
    _close(out, models["task0"])
    mid, _ = _merge("average", base, models)
    _close(mid, {k: (models["task0"][k] + models["task1"][k]) / 2 for k in base})


def test_greedy_soup_contains_the_best_ingredient_and_scores_at_least_as_well():
    base, models = _zoo(n=4)
    target = {k: (models["task1"][k] + models["task2"][k]) / 2 for k in base}
    score = _neg_distance_to(target)
    out, info = _merge("soup-greedy", base, models, score_fn=score)
    best = max(info["scores"], key=info["scores"].get)
    assert info["ingredients"][0] == best
    assert score(out) >= max(info["scores"].values())
    assert info["soup_score"] == pytest.approx(score(out))
    assert set(info["ingredients"]) == {"task1", "task2"}  # the midpoint is the target: both join
    _close(out, target)


def test_greedy_soup_accepts_only_strict_improvements():
    base, models = _zoo(n=2)
    duplicate = {"a": models["task0"], "b": models["task0"]}  # the candidate soup scores exactly the same
    out, info = _merge("soup-greedy", base, duplicate, score_fn=_neg_distance_to(models["task1"]))
    assert info["ingredients"] == ["a"]
    _equal(out, models["task0"])


def test_greedy_soup_needs_a_score_fn():
    base, models = _zoo()
    with pytest.raises(ValueError, match="score_fn"):
        _merge("soup-greedy", base, models)


# --- slerp ------------------------------------------------------------------------------------

def test_slerp_endpoints_and_model_order():
    base, models = _zoo(n=2)
    models = {"b": models["task1"], "a": models["task0"]}  # "a" sorts first whatever the dict order
    _equal(_merge("slerp", base, models, t=0.0)[0], models["a"])
    _equal(_merge("slerp", base, models, t=1.0)[0], models["b"])


def test_slerp_of_orthogonal_and_colinear_tensors():
    base = {"w": torch.zeros(2)}
    out, info = _merge("slerp", base, {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 1.0])}},
                       t=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert info["slerp_lerp_tensors"] == []
    a = torch.tensor([1.0, 2.0])
    out, info = _merge("slerp", base, {"a": {"w": a}, "b": {"w": 3 * a}}, t=0.25)
    torch.testing.assert_close(out["w"], 0.75 * a + 0.25 * 3 * a)  # colinear → lerp
    assert info["slerp_lerp_tensors"] == ["w"]


def test_slerp_needs_exactly_two_models():
    base, models = _zoo(n=3)
    with pytest.raises(ValueError, match="exactly two"):
        _merge("slerp", base, models)


# --- delta fusion (check 30) ------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 50.0])
def test_delta_fusion_weights_sum_to_one(alpha):
    deltas = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 1e-3
    deltas[:, 0] = 0  # all-zero column: uniform weights, no NaN
    weights = fusion_weights(deltas, "magnitude-power", alpha=alpha, eps=0.0)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(40))
    torch.testing.assert_close(weights[:, 0], torch.full((3,), 1 / 3))
    if alpha > 0:  # the checkpoint that moved a parameter most gets the largest weight
        assert torch.equal(weights[:, 1:].argmax(0), deltas[:, 1:].abs().argmax(0))


def test_delta_fusion_equal_magnitudes_and_alpha_zero_give_the_uniform_soup():
    base, models = _zoo(n=1)
    delta = {k: v - base[k] for k, v in models["task0"].items()}
    mirrored = {"a": models["task0"], "b": {k: base[k] - d for k, d in delta.items()}}  # equal |δ|, opposite sign
    _close(_merge("delta-fusion", base, mirrored, alpha=2.0)[0], _merge("average", base, mirrored)[0])
    base, models = _zoo(n=3)
    _close(_merge("delta-fusion", base, models, alpha=0.0)[0], _merge("average", base, models)[0])
    assert not torch.allclose(_merge("delta-fusion", base, models, alpha=1.0)[0]["enc.layer.weight"],
                              _merge("average", base, models)[0]["enc.layer.weight"])


def test_delta_fusion_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="unknown delta-fusion weighting"):
        fusion_weights(torch.zeros(2, 3), "fisher")


# --- apply.py ---------------------------------------------------------------------------------

def test_excluded_integer_and_new_tensors_are_skipped_and_listed():
    base, models = _zoo()
    for m in models.values():
        m["classifier.weight"] = torch.randn(2, 16)  # each task's own head, absent from the base
        m["enc.position_ids"] = torch.arange(16)
    base["enc.position_ids"] = torch.arange(16)
    out, info = merge_state_dicts("task-arithmetic", base, models, {"scale": 1.0}, exclude=[r"^head\."])
    assert set(out) == {"enc.layer.weight", "enc.layer.bias", "enc.norm.weight"}
    assert info["skipped"] == {"head.dense.weight": "excluded by pattern", "enc.position_ids": "not floating point",
                               "classifier.weight": "absent from base (new head)"}
    assert info["merged_tensors"] == 3 and info["models"] == ["task0", "task1", "task2"]
    assert info["method"] == "task-arithmetic" and info["params"] == {"scale": 1.0} and info["seed"] == 0


def test_shape_mismatch_names_the_tensor_and_shapes():
    base, models = _zoo()
    models["task1"]["enc.layer.weight"] = torch.zeros(24, 8)
    with pytest.raises(ValueError, match=r"enc\.layer\.weight.*task1.*\(24, 8\).*\(24, 16\)"):
        merge_state_dicts("average", base, models, {})


def test_tensor_missing_from_a_model_names_it():
    base, models = _zoo()
    del models["task2"]["enc.norm.weight"]
    with pytest.raises(ValueError, match=r"enc\.norm\.weight.*task2"):
        merge_state_dicts("average", base, models, {})
    out, info = merge_state_dicts("average", base, models, {}, exclude=[r"norm"])  # excluding it is fine
    assert "enc.norm.weight" not in out and info["skipped"]["enc.norm.weight"] == "excluded by pattern"


def test_base_only_tensor_is_skipped_not_merged():
    """A pre-training head (e.g. BERT's MLM head) is in the base but in no fine-tuned model."""
    base, models = _zoo()
    base["cls.predictions.bias"] = torch.zeros(7)
    out, info = merge_state_dicts("average", base, models, {})
    assert "cls.predictions.bias" not in out
    assert info["skipped"]["cls.predictions.bias"] == "absent from every model (a pre-training head)"


def test_vocabulary_rows_are_aligned_to_the_base():
    base, models = _zoo()
    base["model.embed_tokens.weight"] = torch.randn(10, 4)
    for i, m in enumerate(models.values()):
        m["model.embed_tokens.weight"] = torch.cat([base["model.embed_tokens.weight"] + 0.1 * (i + 1),
                                                    torch.randn(i, 4)])  # task i added i tokens
    out, info = merge_state_dicts("average", base, models, {})
    assert out["model.embed_tokens.weight"].shape == (10, 4)
    torch.testing.assert_close(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"] + 0.2)
    assert info["vocab_aligned"] == {"model.embed_tokens.weight": {"task1": (11, 10), "task2": (12, 10)}}
    models["task0"]["model.embed_tokens.weight"] = torch.randn(9, 4)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*task0.*fewer"):
        merge_state_dicts("average", base, models, {})


def test_output_has_the_base_dtype():
    base, models = _zoo()
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    models["task0"] = {k: v.to(torch.float16) for k, v in models["task0"].items()}
    out, _ = _merge("ties", base, models)
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    expected, _ = _merge("ties", {k: v.float() for k, v in base.items()},
                         {n: {k: v.float() for k, v in m.items()} for n, m in models.items()})
    _equal(out, {k: v.to(torch.bfloat16) for k, v in expected.items()})  # computed in float32, cast once


def test_tied_input_output_embeddings_merge_once_and_stay_tied(tmp_path):
    """transformers saves a tied LM head once (as the embedding); the merge sees one tensor and the
    merged model, loaded back, still has lm_head == embed_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from methods.io.checkpoint import load_state_dict

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(config)
    base_model.save_pretrained(tmp_path / "base")
    states = {}
    for i in range(2):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base_model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"ft{i}")
        states[f"ft{i}"] = load_state_dict(tmp_path / f"ft{i}")
    base = load_state_dict(tmp_path / "base")
    assert "lm_head.weight" not in base  # stored once, as the embedding
    merged, info = merge_state_dicts("task-arithmetic", base, states, {"scale": 0.5})
    assert "model.embed_tokens.weight" in merged and "lm_head.weight" not in merged
    reloaded = LlamaForCausalLM(config)
    reloaded.load_state_dict(merged, strict=False)
    assert torch.equal(reloaded.lm_head.weight, merged["model.embed_tokens.weight"])
