"""Every computing entry point takes an explicit ``device``: on the CPU it gives exactly what the
default gives, and its results come back on the CPU. With a GPU, the same calls on CUDA match the
CPU: bit for bit where the arithmetic is element-wise (DARE and its relatives, magnitude pruning,
task arithmetic, TIES, averages), closely where sums, matrix products, powers or training may
round differently; quantization codes agree almost everywhere.

Without a GPU, ``stray_tensors_on_meta`` still finds a tensor created inside a computation without
a device: it lands on the meta device and cannot mix with the computation's tensors."""

import contextlib
import functools
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import tiny_llama, token_batches
from methods import registry
from methods.data.jsonl import write_jsonl
from methods.evaluate.multitask import MultiTaskScorer
from methods.evaluate.perplexity import perplexity
from methods.evaluate.run import evaluate_task, load_task_model
from methods.finetune.batching import batch_to
from methods.finetune.train import Budget, finetune
from methods.io.checkpoint import load_state_dict
from methods.merge.apply import merge_state_dicts
from methods.merge.search import search
from methods.prune.apply import DEFAULT_EXCLUDE, prune_state_dict
from methods.prune.calibration import collect_input_stats, input_means
from methods.prune.dare import keep_mask
from methods.prune.darex import analytic_q, learn_layer_q, mse_optimal_q
from methods.prune.diagnostics import diagnose
from methods.prune.fit import PruneFitter, TaskData
from methods.quantize.apply import materialize, quantize_model
from methods.tasks import get_task
from methods.zoo.models import build_decoder, build_decoder_tokenizer, build_encoder, build_encoder_tokenizer
from methods.zoo.pretrain import pretrain_decoder, pretrain_encoder
from methods.zoo.tasks import generate_corpus, generate_task

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
TASK = "zoo-sentiment"


def assert_same(result, reference, device: str, exact_on_gpu: bool, rtol: float = 1e-4, atol: float = 1e-5):
    """``result`` equals ``reference`` bit for bit on the CPU (and on a GPU when ``exact_on_gpu``),
    else within the tolerances; nested dicts, lists and tuples are compared entry by entry, and every
    tensor must be on the CPU (torch.testing checks the device)."""
    exact = device == "cpu" or exact_on_gpu
    if isinstance(reference, dict):
        assert result.keys() == reference.keys()
        for key in reference:
            assert_same(result[key], reference[key], device, exact_on_gpu, rtol, atol)
    elif isinstance(reference, (list, tuple)):
        assert len(result) == len(reference)
        for a, b in zip(result, reference):
            assert_same(a, b, device, exact_on_gpu, rtol, atol)
    elif isinstance(reference, torch.Tensor):
        torch.testing.assert_close(result, reference, rtol=0 if exact else rtol, atol=0 if exact else atol)
    elif isinstance(reference, float) and not exact:
        assert math.isclose(result, reference, rel_tol=rtol, abs_tol=atol), (result, reference)
    else:
        assert result == reference


@contextlib.contextmanager
def stray_tensors_on_meta():
    """Make the default device "meta" for the block: a tensor the code creates without naming its
    device (``torch.zeros(n)``) has no data there and fails as soon as it meets the computation's
    tensors (as a CPU tensor would meet CUDA ones), while every tensor created with ``device=`` or from
    another tensor (``zeros_like``, ``.to``) is unaffected. For pure tensor code only: model loading
    and tokenizers create their tensors without a device by design."""
    with torch.device("meta"):
        yield


# --- fixtures: tiny state dicts and a tiny fine-tuned encoder on disk ------------------------------


@pytest.fixture(scope="module")
def state_dicts():
    """A base and two fine-tunes with small deltas, named as the merge and prune code expects."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"embed_tokens.weight": (10, 6), "layers.0.mlp.weight": (8, 6), "layers.0.mlp.bias": (8,),
              "classifier.weight": (2, 6)}
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    models = {task: {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in base.items()}
              for task in ("a", "b")}
    return base, models


@pytest.fixture(scope="module")
def encoder_task(tmp_path_factory):
    """A tiny encoder base, a "fine-tuned" classifier (base plus a small random delta) and task splits.
    No dropout: it draws from the device's own generator, so training on two devices could not agree."""
    root = tmp_path_factory.mktemp("device")
    tokenizer = build_encoder_tokenizer(32)
    torch.manual_seed(0)
    build_encoder(tokenizer, 16, 1, 2, 32, 32, dropout=0.0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=2)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(root / "ft")
    tokenizer.save_pretrained(root / "ft")
    splits = generate_task(TASK, 0, {"train": 32, "validation": 24, "test": 4})
    for split in ("train", "validation"):
        write_jsonl(splits[split], root / f"{split}.jsonl")
    return root, splits


# --- batches -------------------------------------------------------------------------------------


def test_batch_to_moves_every_tensor_and_keeps_the_rest():
    ids = torch.arange(4)
    batch = {"input_ids": ids, "nested": (ids, [ids]), "output_hidden_states": True}
    moved = batch_to(batch, "cpu")
    assert moved["input_ids"] is ids and moved["nested"][1][0] is ids  # already there: the same tensors
    assert isinstance(moved["nested"], tuple) and moved["output_hidden_states"] is True
    assert batch_to(ids, torch.device("cpu")) is ids


# --- pruning -------------------------------------------------------------------------------------

PRUNES = [  # (method, params, bit for bit on a GPU)
    ("dare", {"drop_rate": 0.7}, True),
    ("dare", {"drop_rate": 0.7, "rescale_rule": "l1-match"}, False),   # a float32 sum over each tensor
    ("drop-only", {"drop_rate": 0.7}, True),
    ("darex-q", {"drop_rate": 0.7, "q": 0.5}, True),
    ("magnitude", {"drop_rate": 0.7}, True),
    ("importance", {"drop_rate": 0.5, "norms": {"layers.0.mlp.weight": torch.linspace(0.5, 2.0, 6)}}, True),
    ("structural", {"drop_rate": 0.5}, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, params, exact", PRUNES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(PRUNES)])
def test_prune_state_dict_on_a_device(state_dicts, device, method, params, exact):
    base, models = state_dicts
    # a mapping of norms is what the fitter passes; the registry's own check takes a file name
    params = {**registry.get("prune", method).resolve({k: v for k, v in params.items() if k != "norms"}, "test"),
              **{k: v for k, v in params.items() if k == "norms"}}
    reference = prune_state_dict(base, models["a"], method, params, 3, DEFAULT_EXCLUDE["encoder"])
    with stray_tensors_on_meta():
        result = prune_state_dict(base, models["a"], method, params, 3, DEFAULT_EXCLUDE["encoder"], device=device)
    assert_same(result[0], reference[0], device, exact)
    assert_same(result[1], reference[1], device, exact_on_gpu=False)   # norms: float32 sums


@pytest.mark.parametrize("device", DEVICES)
def test_delta_diagnostics_on_a_device(state_dicts, device):
    base, models = state_dicts
    means = {"layers.0.mlp.weight": torch.linspace(-1.0, 1.0, 6)}
    kwargs = dict(exclude=[], input_means=means, drop_rates=[0.5, 0.9], arch="encoder")
    with stray_tensors_on_meta():
        result = diagnose(base, models["a"], device=device, **kwargs)
    assert_same(result, diagnose(base, models["a"], **kwargs), device, exact_on_gpu=False, rtol=1e-9,
                atol=1e-12)   # float64 statistics


# --- merging -------------------------------------------------------------------------------------

MERGES = [  # (method, params, bit for bit on a GPU: element-wise over two models)
    ("task-arithmetic", {"scale": 0.7}, True),
    ("dare-ta", {"drop_rate": 0.5}, True),
    ("dare-ta", {"drop_rate": 0.5, "semantics": "mergekit"}, False),   # L1 rescale: a sum over each tensor
    ("ties", {"density": 0.5}, True),
    ("ties", {"density": 0.5, "granularity": "tensor"}, True),
    ("ties", {"density": 0.5, "semantics": "mergekit"}, True),
    ("dare-ties", {"drop_rate": 0.5}, True),
    ("dare-ties", {"drop_rate": 0.5, "semantics": "mergekit"}, False),
    ("average", {}, True),
    ("slerp", {"t": 0.3}, False),         # the angle comes from a sum over each tensor
    ("delta-fusion", {"alpha": 2.0}, False),   # pow may round differently
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, params, exact", MERGES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(MERGES)])
def test_merge_state_dicts_on_a_device(state_dicts, device, method, params, exact):
    base, models = state_dicts
    params = registry.get("merge", method).resolve(params, "test")
    exclude = DEFAULT_EXCLUDE["encoder"]
    with stray_tensors_on_meta():
        merged, info = merge_state_dicts(method, base, models, params, seed=5, exclude=exclude, device=device)
    reference, reference_info = merge_state_dicts(method, base, models, params, seed=5, exclude=exclude)
    assert_same(merged, reference, device, exact)
    assert info == reference_info or not exact


@pytest.mark.parametrize("device", DEVICES)
def test_grid_search_and_greedy_soup_on_a_device(state_dicts, device):
    base, models = state_dicts
    seen = []

    def score(merged):   # one entry, so the choice does not hang on how a device rounds a sum
        seen.append({k: v.device.type for k, v in merged.items()})
        return float(merged["layers.0.mlp.weight"][0, 0])

    grid = {"scale": [0.3, 1.0]}
    with stray_tensors_on_meta():
        result = search("task-arithmetic", base, models, {}, grid, score, seed=0, exclude=[], device=device)
    reference = search("task-arithmetic", base, models, {}, grid, score, seed=0, exclude=[])
    assert_same(result[0], reference[0], device, exact_on_gpu=True)
    assert result[1]["params"] == reference[1]["params"]
    seen.clear()
    with stray_tensors_on_meta():
        soup, _ = merge_state_dicts("soup-greedy", base, models, {}, score_fn=score, device=device)
    assert {kind for scored in seen for kind in scored.values()} == {torch.device(device).type}
    assert_same(soup, merge_state_dicts("soup-greedy", base, models, {}, score_fn=score)[0], device, True)


# --- fine-tuning and pre-training -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adamw", "adamr-l2", "lora"])
def test_finetune_on_a_device(encoder_task, tmp_path, device, optimizer):
    root, splits = encoder_task
    params = registry.get("finetune", optimizer).resolve({"rank": 2} if optimizer == "lora" else {}, "params")
    budget = Budget(steps=3, batch_size=8, lr=1e-3, weight_decay=0.01, warmup_ratio=0.0, max_length=32)

    def run(out, **device_kwarg):
        losses = finetune(root / "base", get_task(TASK), splits["train"], tmp_path / out, optimizer=optimizer,
                          optimizer_params=params, budget=budget, seed=0, **device_kwarg)
        return losses, load_state_dict(tmp_path / out)

    assert_same(run("on-device", device=device), run("default"), device, exact_on_gpu=False, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pretrain", [pretrain_encoder, pretrain_decoder], ids=["encoder", "decoder"])
def test_pretrain_on_a_device(tmp_path, monkeypatch, device, pretrain):
    # dropout draws from the device's own generator: off, so that two devices can agree
    monkeypatch.setattr("methods.zoo.pretrain.build_encoder", functools.partial(build_encoder, dropout=0.0))
    settings = dict(seed=0, hidden_size=16, layers=1, heads=2, intermediate_size=32, max_length=32, steps=2,
                    batch_size=8, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0)
    if pretrain is pretrain_encoder:
        settings["mlm_probability"] = 0.15
    corpus = generate_corpus(0, 32)

    def run(out, **device_kwarg):
        losses = pretrain(corpus, tmp_path / out, **settings, **device_kwarg)
        return losses, load_state_dict(tmp_path / out)

    assert_same(run("on-device", device=device), run("default"), device, exact_on_gpu=False, rtol=1e-3, atol=1e-3)


# --- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_evaluation_and_multitask_scoring_on_a_device(encoder_task, device):
    root, _ = encoder_task
    spec = get_task(TASK)
    override = {"classifier.bias": torch.tensor([0.05, -0.05])}

    def evaluated(**device_kwarg):
        model, tokenizer = load_task_model(root / "ft", spec, override, **device_kwarg)
        assert next(model.parameters()).device.type == torch.device(device_kwarg.get("device", "cpu")).type
        return evaluate_task(model, tokenizer, spec, root / "validation.jsonl", 8, 32)

    # predictions are argmaxes: the same classes unless a logit pair ties within rounding
    assert_same(evaluated(device=device), evaluated(), device, exact_on_gpu=True)

    tasks = {TASK: (spec, root / "ft", root / "validation.jsonl")}
    scorer, reference = MultiTaskScorer(tasks, 8, 32, device=device), MultiTaskScorer(tasks, 8, 32)
    assert scorer.reference == reference.reference
    merged = {name: t + 0.01 for name, t in load_state_dict(root / "ft").items() if "encoder.layer" in name}
    assert scorer(merged) == reference(merged)


@pytest.mark.parametrize("device", DEVICES)
def test_perplexity_where_the_model_is(device):
    tokenizer = build_decoder_tokenizer(32)
    torch.manual_seed(0)
    model = build_decoder(tokenizer, 16, 1, 2, 32, 32).eval()
    text = " ".join(generate_corpus(0, 8))
    reference = perplexity(model, tokenizer, text, window=16, stride=8)
    result = perplexity(model.to(device), tokenizer, text, window=16, stride=8)
    assert_same(result, reference, device, exact_on_gpu=False)


# --- data-driven pruning ---------------------------------------------------------------------------

FITS = [("importance", None), ("darex-q", {"rule": "mse-optimal"}), ("darex-q", {"rule": "learned", "steps": 3})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, q_rule", FITS, ids=[m if r is None else r["rule"] for m, r in FITS])
def test_prune_fitter_on_a_device(encoder_task, device, method, q_rule):
    root, _ = encoder_task
    data = TaskData(get_task(TASK), root / "ft", root / "validation.jsonl", root / "train.jsonl",
                    batch_size=8, max_length=32, calibration_examples=16)
    base, finetuned = load_state_dict(root / "base"), load_state_dict(root / "ft")
    exclude = DEFAULT_EXCLUDE["encoder"]

    def fitted(**device_kwarg):
        fitter = PruneFitter(data, base, finetuned, exclude, mask_seed=0, **device_kwarg)
        params, pruner, record = fitter.fit(method, {"drop_rate": 0.9}, q_rule, 0.9)
        state, _ = prune_state_dict(base, finetuned, method, params, 0, exclude, pruner, **device_kwarg)
        return params, record, state

    assert_same(fitted(device=device), fitted(), device, exact_on_gpu=False, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_darex_statistics_and_q_rules_compute_where_the_model_is(device):
    batches = token_batches(64, 2, 8, 2, seed=0, padding=(slice(0, 1), slice(0, 2)))
    finetuned = tiny_llama().state_dict()
    base = {name: t - 0.01 * (t.abs() + 1) if t.is_floating_point() else t for name, t in finetuned.items()}
    deltas = {name: finetuned[name] - base[name] for name in finetuned if finetuned[name].is_floating_point()}
    layers = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
    masks = {name: keep_mask(deltas[name].shape, 0.9, 0, name) for name in layers}

    def run(model, to_device):
        stats = collect_input_stats(model, batches)
        means = input_means(stats)
        learned = learn_layer_q(model, base, deltas, masks, batches, drop_rate=0.9, target="logits",
                                loss="top5-mse", max_steps=2)
        placed = {name: to_device(deltas[name]) for name in layers}
        q = mse_optimal_q(placed[layers[0]], means[layers[0]], 0.9)
        assert q.device == placed[layers[0]].device
        return {"stats": {name: (s.total, s.sq_total, s.tokens) for name, s in stats.items()},
                "learned": (learned.layer_q, learned.train_losses),
                "analytic": analytic_q(placed, means, 0.9, eta=0.5), "mse-optimal": q.cpu()}

    reference = run(tiny_llama(), lambda t: t)
    model = tiny_llama().to(device)
    with stray_tensors_on_meta():
        result = run(model, lambda t: t.to(device))
    assert_same(result, reference, device, exact_on_gpu=False, rtol=1e-3, atol=1e-5)


# --- quantization ----------------------------------------------------------------------------------

# On a GPU a code may land on the neighbouring level: means, sums, matrix products and Cholesky
# factors round differently there (the grids' divisions are correctly rounded, methods.device.divide).
QUANTIZERS = [
    ("rtn", {"bits": 4}),
    ("rtn", {"bits": 4, "mse_clip": True}),
    ("statsq", {"bits": 4}),
    ("gptq", {"bits": 4, "group_size": 16, "actorder": True}),
    ("nupes", {"bits": 4, "mode": "data-driven", "steps": 2}),
    ("discquant", {"bits": 4, "steps": 2}),
]
ONE_LAYER = [r"^(?!model\.layers\.0\.self_attn\.q_proj\.)"]   # the first block's query projection only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, params", QUANTIZERS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(QUANTIZERS)])
@pytest.mark.parametrize("target", ["weights", "delta"])
def test_quantize_model_on_a_device(device, method, params, target):
    params = registry.get("quantize", method).resolve(params, "test")
    batches = token_batches(64, 2, 8, 2, seed=0, padding=(slice(0, 1), slice(0, 2)))
    base = {k: v - 0.01 for k, v in tiny_llama().state_dict().items()} if target == "delta" else None
    kwargs = dict(target=target, base=base, batches=batches, exclude=ONE_LAYER, is_encoder=False)
    reference = quantize_model(tiny_llama(), method, params, **kwargs)
    model = tiny_llama()
    with stray_tensors_on_meta():
        result = quantize_model(model, method, params, device=device, **kwargs)
    assert list(result) == ["model.layers.0.self_attn.q_proj.weight"]
    assert all(r.codes.device.type == "cpu" for r in result.values())
    if device == "cpu":
        assert_same(materialize(result, base), materialize(reference, base), device, exact_on_gpu=True)
    else:
        agree = sum(int((result[n].codes == reference[n].codes).sum()) for n in reference)
        assert agree >= 0.99 * sum(r.codes.numel() for r in reference.values())
