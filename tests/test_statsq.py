"""StatsQ grid, STE and CGA (spec quantization.md §3, §9 checks 18–21), and a tiny QAT run through the
registered ``statsq-qat`` fine-tuning method."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from methods.finetune.train import Budget, finetune
from methods.quantize import statsq as statsq_module
from methods.quantize.artifact import assert_on_grid
from methods.quantize.common import QuantizeContext
from methods.quantize.statsq import (StatsQWeight, block_linear_names, cga_trainable_mask, finalize_statsq_model,
                                     prepare_statsq_model, statsq_fake_quant, statsq_quantize, statsq_scale,
                                     statsq_parametrized, statsq_tensor)
from methods.registry import get
from methods.tasks import get_task
from methods.zoo.models import build_decoder, build_decoder_tokenizer, build_encoder, build_encoder_tokenizer
from methods.zoo.tasks import generate_task

CTX = QuantizeContext()


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def rel_mse(w: torch.Tensor, q: torch.Tensor) -> float:
    return float(((q - w) ** 2).sum() / (w ** 2).sum())


# ----------------------------------------------------------------------------------------- grid (18, 19)

@pytest.mark.parametrize("bits", (2, 3, 4))
def test_exactly_2b_symmetric_midrise_levels_per_row(bits):
    """Check 18: per row the levels are s·(k + ½)/n, k = −n…n − 1: {±0.25, ±0.75}·s at b = 2; no zero."""
    w = gaussian(16, 512, seed=bits)
    q = statsq_quantize(w, bits)
    s = statsq_scale(w)
    n = 2 ** (bits - 1)
    expected = torch.tensor([(k + 0.5) / n for k in range(-n, n)])
    for row in range(16):
        assert torch.equal(torch.unique(q[row]), s[row] * expected)
    if bits == 2:
        assert expected.tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert (q != 0).all()


def test_zeros_are_not_preserved():
    """StatsQ has no zero level: a pruned (zero) entry becomes +s/2^b (u = 0 → k = round(−½) = 0)."""
    w = gaussian(8, 256, seed=1)
    w[:, ::3] = 0.0
    q = statsq_quantize(w, 3)
    s = statsq_scale(w)
    assert torch.equal(q[:, ::3], (s / 8).expand(8, q[:, ::3].shape[1]))


def test_gaussian_error_matches_the_spec_table_and_has_a_16_bit_floor():
    """Check 19 and the §3.1 table: rel-MSE 0.137 / 0.070 / 0.049 at 2 / 3 / 4 bits; at 16 bits about
    3.5% remains because ≈ 11% of Gaussian weights lie beyond the fixed ±2·mean|w| clip (expected)."""
    w = gaussian(256, 1024, seed=2)
    for bits, table in ((2, 0.137), (3, 0.070), (4, 0.049)):
        assert rel_mse(w, statsq_quantize(w, bits)) == pytest.approx(table, abs=0.004)
    floor = rel_mse(w, statsq_quantize(w, 16))
    assert 0.03 < floor < 0.04
    clipped = float((w.abs() >= statsq_scale(w)).float().mean())
    assert 0.10 < clipped < 0.12


@pytest.mark.parametrize("bits", (2, 3, 8, 16))
def test_ptq_record_reproduces_the_grid(bits):
    w = gaussian(16, 256, seed=3) * 0.02
    method = get("quantize", "statsq")
    exact = method.fn({"w": w}, context=CTX, bits=bits, scale_dtype="float32")["w"]
    assert exact.decode == "midrise" and exact.zero is None and exact.scale.shape == (16, 1)
    assert int(exact.codes.min()) >= 0 and int(exact.codes.max()) < 2 ** bits
    assert torch.equal(exact.dequantize(), statsq_quantize(w, bits))   # float32 scale: the official values
    half = method.fn({"w": w}, context=CTX, **method.resolve({"bits": bits}, "q"))["w"]
    assert half.scale.dtype == torch.float16
    n = 2 ** (bits - 1)
    stored = half.scale.to(torch.float32)
    assert torch.equal(half.dequantize(), stored * ((half.codes.to(torch.float32) - n + 0.5) / n))
    assert assert_on_grid(half) <= 2 ** bits


def test_statsq_rejects_bad_input():
    method = get("quantize", "statsq")
    with pytest.raises(ValueError, match="bits"):
        statsq_tensor(gaussian(2, 8), 1)
    with pytest.raises(ValueError, match="'w'.*overflows scale_dtype float16"):
        method.fn({"w": torch.full((2, 8), 1e5)}, context=CTX, bits=4, scale_dtype="float16")
    assert torch.equal(statsq_quantize(torch.zeros(3, 8), 4), torch.zeros(3, 8))   # s = 0: zeros, no NaN


# ----------------------------------------------------------------------------------------- STE (20)

def test_ste_forward_is_the_grid_and_backward_the_identity():
    """Check 20: ∂ŵ/∂W = I including clipped entries, and s (from the detached weight) gets no gradient."""
    w = (gaussian(16, 64, seed=4) * 2).requires_grad_()
    q = statsq_fake_quant(w, 2)
    assert torch.equal(q.detach(), statsq_quantize(w.detach(), 2))
    assert not statsq_scale(w).requires_grad
    upstream = gaussian(16, 64, seed=5)
    (q * upstream).sum().backward()
    clipped = w.detach().abs() >= statsq_scale(w)
    assert clipped.sum() > 50
    assert torch.equal(w.grad, upstream)   # any path through s = 2·mean|W| would add a dense correction


def test_parametrized_linear_trains_its_latent_weight_through_the_ste():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    torch.nn.utils.parametrize.register_parametrization(linear, "weight", StatsQWeight(3))
    latent = linear.parametrizations.weight.original
    x = torch.randn(5, 32)
    linear(x).sum().backward()
    assert torch.equal(linear.weight, statsq_quantize(latent.detach(), 3))
    assert torch.equal(latent.grad, torch.ones(5, 8).T @ x)   # d/dW of Σ(x Wᵀ) with an identity STE


# ----------------------------------------------------------------------------------------- CGA (21)

def official_frozen(weight: torch.Tensor, bits: int, boundary_range: float) -> torch.Tensor:
    """The OFQ ``freeze_outside_boundary_weight_idx`` loop, written out independently: 1 = frozen."""
    s = 2 * torch.mean(weight.abs(), dim=1, keepdim=True)
    n = float(2 ** (bits - 1))
    pre = torch.clamp(weight / s, -1.0, 1.0 - 1e-6) * n - 0.5
    rounded = torch.round(pre)
    keep = torch.zeros_like(weight)
    for i in np.arange(float(rounded.min()), float(rounded.max())):
        keep += (((pre - float(i)) <= 0.5 + boundary_range) & ((pre - float(i)) >= 0.5 - boundary_range)).float()
    return 1.0 - keep


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("boundary_range", (0.005, 0.05))
def test_cga_mask_matches_the_official_loop(bits, boundary_range):
    w = gaussian(32, 256, seed=bits) * 0.05
    trainable = cga_trainable_mask(w, bits, boundary_range)
    assert torch.equal(~trainable, official_frozen(w, bits, boundary_range).bool())
    assert 0 < int(trainable.sum()) < w.numel() // 2


class Toy(torch.nn.Module):
    """One 'transformer block' with a Linear, named like Llama's ``layers.N.``, plus an unquantized head."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 32))])
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.layers[0](x)))


def run_steps(cga_steps: int, total_steps: int, boundary_range: float = 0.05):
    """Train the toy for total_steps with weight decay 0.1 the way ``loop.train`` does (backward, clip,
    step); per step: (latent before, latent after, trainable mask before, grad right after backward)."""
    torch.manual_seed(0)
    model = Toy()
    prepare_statsq_model(model, None, {"bits": 2})
    method = get("finetune", "statsq-qat")
    params = method.resolve({"bits": 2, "cga_steps": cga_steps, "boundary_range": boundary_range}, "opt")
    opt = method.fn(model, lr=1e-2, weight_decay=0.1, total_steps=total_steps, **params)
    latent = model.layers[0][0].parametrizations.weight.original
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    history = []
    for _ in range(total_steps):
        before = latent.detach().clone()
        mask = cga_trainable_mask(latent, 2, boundary_range)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grad = latent.grad.clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append((before, latent.detach().clone(), mask, grad))
    return history, model


def test_cga_freezes_confident_weights_bit_identically():
    """Check 21: after an AdamW step with weight decay > 0 the frozen entries are bit-identical and only
    the entries within BR of a rounding boundary change; their gradient was zero before clipping."""
    history, _ = run_steps(cga_steps=1, total_steps=1)
    before, after, trainable, grad = history[0]
    assert 0 < int(trainable.sum()) < trainable.numel() // 2
    assert torch.equal(after[~trainable], before[~trainable])
    assert (after[trainable] != before[trainable]).all()
    assert (grad[~trainable] == 0).all() and (grad[trainable] != 0).any()
    # without CGA the same step moves the confident entries too (decay and gradient), so the above can fail
    plain, _ = run_steps(cga_steps=0, total_steps=1)
    assert (plain[0][1][~trainable] != plain[0][0][~trainable]).all()


def test_cga_runs_for_the_last_steps_only_and_recomputes_its_mask():
    history, _ = run_steps(cga_steps=2, total_steps=4)
    for step, (before, after, trainable, _) in enumerate(history):
        frozen_moved = bool((after[~trainable] != before[~trainable]).any())
        assert frozen_moved == (step < 2), step
    assert not torch.equal(history[2][2], history[3][2])   # the mask follows the moving weights


def test_qat_parameters_are_checked():
    method = get("finetune", "statsq-qat")
    model = prepare_statsq_model(Toy(), None, {"bits": 3})
    with pytest.raises(ValueError, match="cga_steps > 0 needs total_steps"):
        method.fn(model, lr=1e-3, weight_decay=0.0, bits=3, cga_steps=2)
    with pytest.raises(ValueError, match="cga_steps=5 exceeds the 4 training steps"):
        method.fn(model, lr=1e-3, weight_decay=0.0, bits=3, cga_steps=5, total_steps=4)
    with pytest.raises(ValueError, match="boundary_range"):
        method.fn(model, lr=1e-3, weight_decay=0.0, bits=3, boundary_range=0.5)
    with pytest.raises(ValueError, match="bits=2 differs"):
        method.fn(model, lr=1e-3, weight_decay=0.0, bits=2)
    with pytest.raises(ValueError, match="prepare_model"):
        method.fn(Toy(), lr=1e-3, weight_decay=0.0, bits=3)


# ----------------------------------------------------------------------------------------- QAT hooks

def test_prepare_targets_block_linears_of_a_llama_and_finalize_restores_them():
    torch.manual_seed(0)
    model = build_decoder(build_decoder_tokenizer(16), 32, 1, 2, 64, 16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_statsq_model(model, None, {"bits": 2})
    names = sorted(name for name, _, _ in statsq_parametrized(model))
    assert names == sorted(f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj"))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.weight, statsq_quantize(original["model.layers.0.self_attn.q_proj.weight"], 2))
    assert model(input_ids=torch.tensor([[4, 5, 6]]), labels=torch.tensor([[4, 5, 6]])).loss.isfinite()
    finalize_statsq_model(model)
    assert sorted(block_linear_names(model)) == names and not statsq_parametrized(model)
    restored = model.state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_tiny_qat_run_through_the_finetune_driver(tmp_path, monkeypatch):
    tokenizer = build_encoder_tokenizer(32)
    torch.manual_seed(0)
    build_encoder(tokenizer, 32, 1, 2, 64, 32).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = generate_task("zoo-sentiment", 0, {"train": 32, "validation": 10, "test": 10})["train"]
    task = get_task("zoo-sentiment")
    budget = Budget(steps=4, batch_size=8, lr=1e-2, weight_decay=0.01, warmup_ratio=0.0, max_length=32)
    method = get("finetune", "statsq-qat")

    active = []
    step = statsq_module.CGAAdamW.step

    def spy(self, closure=None):
        active.append(self.cga_active())
        return step(self, closure)

    monkeypatch.setattr(statsq_module.CGAAdamW, "step", spy)
    params = method.resolve({"bits": 2, "cga_steps": 2, "boundary_range": 0.05}, "params")
    finetune(tmp_path / "base", task, rows, tmp_path / "ft", optimizer="statsq-qat", optimizer_params=params,
             budget=budget, seed=0)
    assert active == [False, False, True, True]   # the driver passed total_steps: CGA on the last 2 steps

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).state_dict()
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft", num_labels=2).state_dict()
    assert set(tuned) == set(base)   # no parametrization names survive
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(tuned[query], base[query])
    # the checkpoint holds latent floats, which the statsq PTQ step then puts on the 2-bit grid
    assert len(torch.unique(tuned[query][0])) > 4
    quantized = get("quantize", "statsq").fn({query: tuned[query]}, context=CTX, bits=2, scale_dtype="float32")
    assert assert_on_grid(quantized[query]) == 4

    with pytest.raises(ValueError, match="cga_steps=5 exceeds the 4 training steps"):
        finetune(tmp_path / "base", task, rows, tmp_path / "ft2", optimizer="statsq-qat",
                 optimizer_params=method.resolve({"bits": 2, "cga_steps": 5}, "params"), budget=budget, seed=0)
