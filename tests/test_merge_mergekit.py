"""Conformance of methods.merge with mergekit 0.1.5 (spec dpp_merge.md §3.6, §7 check 27).

Tiny Llama models (a base and three fine-tunes = base + distinct random perturbations) are saved in
float32, merged by mergekit's Python API and by ``merge_state_dicts``, and compared element-wise.
DARE variants draw different masks by design (methods/merge/apply.py, difference 1); for them
mergekit's Bernoulli draw is replaced by our mask for the same (model, tensor), so everything
else — L1 rescale, sign consensus, sum vs mean, λ — is compared exactly.
"""

import os

import pytest
import torch

mergekit = pytest.importorskip("mergekit")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mergekit.config  # noqa: E402
import mergekit.merge  # noqa: E402
import mergekit.options  # noqa: E402
import mergekit.sparsify  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from methods import registry  # noqa: E402
from methods.merge.apply import merge_state_dicts  # noqa: E402
from methods.prune.dare import keep_mask  # noqa: E402

NAMES = ("ft_a", "ft_b", "ft_c")
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mergekit_zoo").resolve()  # absolute: a relative path queries the Hub
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    base = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    model.save_pretrained(root / "base")
    states = {}
    for i, name in enumerate(NAMES):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(sd[k])
        model.save_pretrained(root / name)
        states[name] = sd
    return root, base, states


def _mergekit(root, out_name, config):
    conf = mergekit.config.MergeConfiguration.model_validate({"dtype": "float32", **config})
    out = root / out_name
    mergekit.merge.run_merge(conf, str(out), options=mergekit.options.MergeOptions(
        copy_tokenizer=False, quiet=True, write_model_card=False, lazy_unpickle=False))
    merged = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


def _ours(method, params, base, states, names=NAMES, seed=0):
    resolved = registry.get("merge", method).resolve(params, "params")
    return merge_state_dicts(method, base, {n: states[n] for n in names}, resolved, seed=seed)


def _compare(ours, theirs):
    assert set(ours) == set(theirs)
    worst = 0.0
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype == torch.float32
        torch.testing.assert_close(ours[k], theirs[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")
        worst = max(worst, float((ours[k] - theirs[k]).abs().max()))
    print(f"max abs difference vs mergekit: {worst:.3g}")
    return worst


def _models(root, names=NAMES, **parameters):
    return [{"model": str(root / n), "parameters": dict(parameters)} for n in names]


def test_task_arithmetic_matches(zoo):
    root, base, states = zoo
    theirs = _mergekit(root, "ta", {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
                                    "models": _models(root, weight=1.0), "parameters": {"lambda": 0.7}})
    ours, _ = _ours("task-arithmetic", {"scale": 0.7}, base, states)
    _compare(ours, theirs)


def test_linear_matches_uniform_soup(zoo):
    root, base, states = zoo
    theirs = _mergekit(root, "linear", {"merge_method": "linear", "models": _models(root, weight=1.0),
                                        "parameters": {"normalize": True}})
    ours, _ = _ours("average", {}, base, states)
    _compare(ours, theirs)


@pytest.mark.parametrize("density,lam", [(0.5, 1.0), (0.2, 0.8)])
def test_ties_mergekit_semantics_matches(zoo, density, lam):
    root, base, states = zoo
    theirs = _mergekit(root, f"ties{density}", {
        "merge_method": "ties", "base_model": str(root / "base"), "models": _models(root, weight=1.0, density=density),
        "parameters": {"normalize": True, "lambda": lam}})
    ours, _ = _ours("ties", {"density": density, "scale": lam, "semantics": "mergekit"}, base, states)
    _compare(ours, theirs)
    # and the paper semantics really is a different merge (global trim, ÷ count of the same signs)
    paper, _ = _ours("ties", {"density": density, "scale": lam, "semantics": "paper"}, base, states)
    assert any(not torch.allclose(paper[k], theirs[k], atol=ATOL, rtol=RTOL) for k in theirs)


def test_slerp_matches(zoo):
    root, base, states = zoo
    a, b = NAMES[:2]
    theirs = _mergekit(root, "slerp", {"merge_method": "slerp", "base_model": str(root / a),
                                       "models": [{"model": str(root / a)}, {"model": str(root / b)}],
                                       "parameters": {"t": 0.3}})
    ours, info = _ours("slerp", {"t": 0.3}, base, states, names=(b, a))
    _compare(ours, theirs)
    # both branches were exercised: norm weights (≈1) are colinear → lerp; random matrices are not
    assert 0 < len(info["slerp_lerp_tensors"]) < len(theirs)


@pytest.fixture
def our_masks_in_mergekit(zoo, monkeypatch):
    """Replace mergekit's Bernoulli sparsification by our mask of the same (model, tensor)."""
    root, base, states = zoo
    deltas = [(n, k, states[n][k] - base[k]) for n in NAMES for k in base]
    calls = []

    def install(drop_rate, seed):
        def bernoulli(tensor, density, rescale_norm=None):
            assert density == pytest.approx(1 - drop_rate)
            matches = [(n, k) for n, k, d in deltas if d.shape == tensor.shape and torch.equal(d, tensor)]
            assert len(matches) == 1, "could not identify the delta mergekit sparsifies"
            n, k = matches[0]
            calls.append((n, k))
            mask = keep_mask(tensor.shape, drop_rate, seed, f"{n}/{k}").to(tensor.dtype)
            return mergekit.sparsify.rescaled_masked_tensor(tensor, mask, rescale_norm)

        monkeypatch.setattr(mergekit.sparsify, "bernoulli", bernoulli)
        return calls

    return install


@pytest.mark.parametrize("mk_method,ours_method", [("dare_linear", "dare-ta"), ("dare_ties", "dare-ties")])
def test_dare_mergekit_semantics_matches_with_injected_masks(zoo, our_masks_in_mergekit, mk_method, ours_method):
    root, base, states = zoo
    drop_rate, seed, lam = 0.7, 11, 0.9
    calls = our_masks_in_mergekit(drop_rate, seed)
    theirs = _mergekit(root, mk_method, {
        "merge_method": mk_method, "base_model": str(root / "base"),
        "models": _models(root, weight=1.0, density=1 - drop_rate), "parameters": {"lambda": lam}})
    assert len(calls) == len(NAMES) * len(base)  # every delta went through our mask
    ours, _ = _ours(ours_method, {"drop_rate": drop_rate, "scale": lam, "semantics": "mergekit"}, base, states,
                    seed=seed)
    _compare(ours, theirs)
