"""GPTQ (methods/quantize/gptq.py): spec quantization.md §9 checks 7–12, parity with the reference
``fasterquant`` and the sequential model driver on tiny BERT / Llama models."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from methods.quantize.common import QuantizeContext
from methods.quantize.gptq import (
    CholeskyError,
    Hessian,
    _calibrate,
    execution_groups,
    find_blocks,
    gptq_layer,
    gptq_model,
)
from methods.quantize.grids import GridSpec, rtn
from methods.registry import MethodConfigError, get

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# helpers


def correlated_inputs(n_in: int, tokens: int, seed: int, outliers: int = 2) -> torch.Tensor:
    """(n_in, tokens) inputs with correlated features and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = mixing @ torch.randn(n_in, tokens, generator=g)
    channels = torch.randperm(n_in, generator=g)[:outliers]
    x[channels] *= 20.0
    return x


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[torch.randint(0, rows, (3,), generator=g), torch.randint(0, cols, (3,), generator=g)] *= 8.0
    return w


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x @ x.t() / x.shape[1]


def layer_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q).double() @ x.double()).pow(2).sum())


def reference_fasterquant(W, H, bits, sym, groupsize=-1, blocksize=128, percdamp=0.01, actorder=False,
                          static_groups=False):
    """A straightforward port of IST-DASLab/gptq @2d65066 ``GPTQ.fasterquant`` with its ``Quantizer``
    (perchannel=True, weight=True, no MSE search), float32 throughout: the parity oracle."""
    maxq = 2 ** bits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            neg = xmin < 0
            xmin[neg] = -xmax[neg]
        empty = (xmin == 0) & (xmax == 0)
        xmin[empty], xmax[empty] = -1.0, 1.0
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def quant(x, scale, zero):
        return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)

    W, H = W.clone().float(), H.clone().float()
    columns = W.shape[1]
    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = [find_params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses, Q = torch.zeros_like(W), torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = int(perm[i1 + i]) if actorder else i1 + i
                    scale, zero = groups[idx // groupsize]
            q = quant(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q, Losses = Q[:, invperm], Losses[:, invperm]
    return Q, Losses


# ----------------------------------------------------------------------------------------------------
# parity with the reference


@pytest.mark.parametrize("scheme", ["asym", "sym-full"])
@pytest.mark.parametrize("group_size,actorder,static_groups", [
    (-1, False, False), (-1, True, False), (16, False, False), (16, True, False), (16, False, True),
    (16, True, True)])
def test_layer_equals_reference_port(scheme, group_size, actorder, static_groups):
    # blocksize 24 with g = 16: dynamic groups start mid-block (the quirk); column 5 is dead
    x = correlated_inputs(64, 512, seed=1)
    x[5] = 0.0
    w = weights(24, 64, seed=2)
    w[:, ::7] -= 0.3   # every group has a negative entry: reference sym == Grid S there
    h = hessian_of(x)
    spec = GridSpec(4, scheme, group_size, "float32")
    record, losses = gptq_layer(w, h, spec, blocksize=24, actorder=actorder, static_groups=static_groups)
    q_ref, losses_ref = reference_fasterquant(w, h, 4, scheme == "sym-full", group_size, blocksize=24,
                                              actorder=actorder, static_groups=static_groups)
    assert torch.equal(record.dequantize(), q_ref)
    assert torch.equal(losses, losses_ref.sum(0))
    assert ("g_idx" in record.extras) == (actorder and group_size > 0 and not static_groups)


# ----------------------------------------------------------------------------------------------------
# §9 check 7: H = c·I  =>  GPTQ == RTN


@pytest.mark.parametrize("scheme", ["asym", "sym-full", "sym-restricted"])
@pytest.mark.parametrize("group_size,cols", [(-1, 96), (0, 96), (128, 256), (32, 96)])
@pytest.mark.parametrize("actorder", [False, True])
def test_identity_hessian_equals_rtn(scheme, group_size, cols, actorder):
    w = weights(16, cols, seed=3)
    spec = GridSpec(3, scheme, group_size)
    record, _ = gptq_layer(w, 7.5 * torch.eye(cols), spec, blocksize=64, actorder=actorder)
    codes, dequantized, _ = rtn(w, spec)
    assert torch.equal(record.codes, codes)
    assert torch.equal(record.dequantize(), dequantized)


# ----------------------------------------------------------------------------------------------------
# §9 check 8: loss accounting


@pytest.mark.parametrize("options", [
    dict(spec=GridSpec(4, "asym", -1)),
    dict(spec=GridSpec(3, "sym-full", 16), actorder=True),
    dict(spec=GridSpec(2, "asym", 16), actorder=True, static_groups=True, percdamp=0.1),
    dict(spec=GridSpec(4, "sym-restricted", 0), blocksize=10),
    dict(spec=GridSpec(3, "asym", 32), preserve_zeros=True),
])
def test_losses_sum_to_damped_trace(options):
    x = correlated_inputs(64, 400, seed=4)
    w = weights(20, 64, seed=5)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(6)) < 0.3] = 0.0
    h = hessian_of(x)
    record, losses = gptq_layer(w, h, **options)
    percdamp = options.get("percdamp", 0.01)
    damped = h.double() + percdamp * torch.diag(h).double().mean() * torch.eye(64, dtype=torch.float64)
    diff = w.double() - record.dequantize().double()
    trace = 0.5 * torch.trace(diff @ damped @ diff.t())
    assert float(losses.sum()) == pytest.approx(float(trace), rel=1e-4)
    assert record.info["loss"] == pytest.approx(float(losses.sum()))
    if options["spec"].group_size == 0:   # per tensor: one stored (scale, zero) pair
        assert record.scale.shape == (1, 1)


# ----------------------------------------------------------------------------------------------------
# §9 check 9: GPTQ <= RTN on the calibration data, same grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym-full"])
@pytest.mark.parametrize("group_size,actorder,static_groups", [
    (-1, False, False), (-1, True, False), (32, False, False), (32, True, True)])
def test_gptq_not_worse_than_rtn(bits, scheme, group_size, actorder, static_groups):
    for seed in range(3):
        x = correlated_inputs(64, 256, seed=10 + seed)
        w = weights(32, 64, seed=20 + seed)
        spec = GridSpec(bits, scheme, group_size)
        record, _ = gptq_layer(w, hessian_of(x), spec, blocksize=32, actorder=actorder,
                               static_groups=static_groups)
        _, rtn_weight, _ = rtn(w, spec)
        assert layer_error(w, record.dequantize(), x) <= layer_error(w, rtn_weight, x) * (1 + 1e-3)


def test_gptq_improves_clearly_on_correlated_inputs():
    x = correlated_inputs(64, 1024, seed=7)
    w = weights(32, 64, seed=8)
    spec = GridSpec(3, "asym", -1)
    record, _ = gptq_layer(w, hessian_of(x), spec)
    _, rtn_weight, _ = rtn(w, spec)
    assert layer_error(w, record.dequantize(), x) < 0.8 * layer_error(w, rtn_weight, x)


# ----------------------------------------------------------------------------------------------------
# §9 check 11: dead columns, permutation equivariance


@pytest.mark.parametrize("scheme", ["asym", "sym-full"])
def test_dead_column_gives_zero_weight_column(scheme):
    x = correlated_inputs(48, 300, seed=9)
    x[[3, 17, 40]] = 0.0
    w = weights(16, 48, seed=10)
    record, losses = gptq_layer(w, hessian_of(x), GridSpec(4, scheme, 16), actorder=True)
    q = record.dequantize()
    assert torch.equal(q[:, [3, 17, 40]], torch.zeros(16, 3))
    assert record.info["dead_columns"] == 3
    assert (q[:, [0, 1, 2]] != 0).any()
    assert torch.all(losses[[3, 17, 40]] == 0)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_permutation_equivariance_with_actorder(group_size):
    x = correlated_inputs(64, 400, seed=11)
    w = weights(24, 64, seed=12)
    g = torch.Generator().manual_seed(13)
    if group_size == -1:
        perm = torch.randperm(64, generator=g)
    else:   # whole groups move and columns move inside their group: group membership is kept
        order = torch.randperm(4, generator=g)
        perm = torch.cat([order[k] * 16 + torch.randperm(16, generator=g) for k in range(4)])
    spec = GridSpec(3, "asym", group_size)
    record, losses = gptq_layer(w, hessian_of(x), spec, actorder=True, static_groups=True, blocksize=16)
    permuted, permuted_losses = gptq_layer(w[:, perm], hessian_of(x[perm]), spec, actorder=True,
                                           static_groups=True, blocksize=16)
    assert torch.equal(permuted.dequantize(), record.dequantize()[:, perm])
    assert torch.allclose(permuted_losses, losses[perm], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# §9 check 12: determinism


def test_deterministic():
    x = correlated_inputs(64, 300, seed=14)
    w = weights(16, 64, seed=15)
    spec = GridSpec(3, "sym-full", 16)
    first, l1 = gptq_layer(w, hessian_of(x), spec, actorder=True)
    second, l2 = gptq_layer(w, hessian_of(x), spec, actorder=True)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scale, second.scale)
    assert torch.equal(first.extras["g_idx"], second.extras["g_idx"]) and torch.equal(l1, l2)


# ----------------------------------------------------------------------------------------------------
# records, options and errors


def test_record_is_on_grid_and_decodes_to_the_algorithm_output():
    x = correlated_inputs(64, 300, seed=16)
    w = weights(16, 64, seed=17)
    spec = GridSpec(3, "asym", 16, "bfloat16")
    record, _ = gptq_layer(w, hessian_of(x), spec, actorder=True)
    assert record.codes.dtype == torch.int32 and record.codes.min() >= 0 and record.codes.max() <= spec.qmax
    assert record.scale.dtype == torch.bfloat16 and record.scale.shape == (16, 4)
    assert record.zero.shape == (16, 4) and record.width == 16
    g_idx = record.extras["g_idx"].long()
    assert torch.equal(torch.bincount(g_idx), torch.full((4,), 16))
    # g_idx groups follow act-order: columns of one group are consecutive in decreasing diag(H)
    order = torch.argsort(torch.diag(hessian_of(x)), descending=True, stable=True)
    assert torch.equal(g_idx[order], torch.arange(64) // 16)
    q = record.dequantize()
    for k in range(4):   # at most 2^b levels per (row, group)
        for row in range(16):
            assert q[row, g_idx == k].unique().numel() <= 2 ** spec.bits


def test_preserve_zeros_keeps_pruned_entries_zero():
    x = correlated_inputs(64, 400, seed=18)
    delta = weights(24, 64, seed=19)
    pruned = torch.rand(delta.shape, generator=torch.Generator().manual_seed(20)) < 0.6
    delta[pruned] = 0.0
    spec = GridSpec(4, "asym", 16)
    plain, _ = gptq_layer(delta, hessian_of(x), spec)
    kept, _ = gptq_layer(delta, hessian_of(x), spec, preserve_zeros=True)
    assert (plain.dequantize()[pruned] != 0).any()          # error feedback fills pruned entries
    assert torch.all(kept.dequantize()[pruned] == 0)
    assert (kept.dequantize()[~pruned] != 0).float().mean() > 0.5
    # the masked entries' error is absorbed by the others: still far better than RTN of the pruned delta
    _, rtn_delta, _ = rtn(delta, spec)
    assert layer_error(delta, kept.dequantize(), x) < layer_error(delta, rtn_delta, x)


def test_cholesky_failure_raises_or_falls_back_to_rtn(caplog):
    w = weights(8, 32, seed=21)
    h = -torch.eye(32) - 0.1          # negative definite, no dead column
    spec = GridSpec(4, "asym", -1)
    with pytest.raises(CholeskyError, match="proj.weight.*percdamp"):
        gptq_layer(w, h, spec, name="proj.weight")
    with caplog.at_level(logging.WARNING, logger="methods.quantize.gptq"):
        record, _ = gptq_layer(w, h, spec, name="proj.weight", on_cholesky_failure="rtn")
    assert "round-to-nearest" in caplog.text
    assert record.info["cholesky_fallback"] is True
    assert torch.equal(record.dequantize(), rtn(w, spec)[1])


@pytest.mark.parametrize("kwargs,match", [
    (dict(blocksize=0), "blocksize"),
    (dict(percdamp=-0.1), "percdamp"),
    (dict(on_cholesky_failure="ignore"), "on_cholesky_failure"),
    (dict(spec=GridSpec(4, "asym", 24)), "group_size 24"),
])
def test_bad_layer_options_are_named(kwargs, match):
    options = dict(spec=GridSpec(4, "asym", -1))
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gptq_layer(torch.randn(4, 32), torch.eye(32), **options)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_layer(torch.randn(4, 32), torch.eye(16), GridSpec(4))


def test_registered_params_are_checked():
    spec = get("quantize", "gptq")
    defaults = spec.resolve({}, "quantize.gptq")
    assert defaults == dict(bits=4, scheme="asym", group_size=-1, scale_dtype="float16", blocksize=128,
                            percdamp=0.01, actorder=False, static_groups=False, true_sequential=True,
                            preserve_zeros=False, on_cholesky_failure="raise")
    with pytest.raises(MethodConfigError, match="quantize.gptq.scheme"):
        spec.resolve({"scheme": "sym"}, "quantize.gptq")
    with pytest.raises(MethodConfigError, match="quantize.gptq.actorder"):
        spec.resolve({"actorder": "yes"}, "quantize.gptq")
    with pytest.raises(ValueError, match="needs the model and calibration batches"):
        spec.fn({"x.weight": torch.zeros(2, 2)}, context=QuantizeContext())


# ----------------------------------------------------------------------------------------------------
# Hessian accumulation


def test_hessian_matches_reference_accumulation_and_ignores_padding():
    g = torch.Generator().manual_seed(22)
    a, b = torch.randn(3, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    acc = Hessian(8)
    acc.add(a)
    acc.add(b)
    tokens = torch.cat([a.reshape(-1, 8), b.reshape(-1, 8)])
    assert acc.samples == 5 and acc.tokens == 29
    assert torch.allclose(acc.matrix, 2 * tokens.t() @ tokens / 5, rtol=1e-5, atol=1e-6)
    # padding: the same sequences padded to length 9 with junk, masked out, give the same H
    padded = torch.cat([b, 100 * torch.randn(2, 2, 8, generator=g)], dim=1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[:, 7:] = 0
    plain, masked = Hessian(8), Hessian(8)
    plain.add(b)
    masked.add(padded, mask)
    assert torch.allclose(masked.matrix, plain.matrix, rtol=1e-6, atol=1e-7) and masked.tokens == 14
    two_d = Hessian(8)
    two_d.add(a[0])
    assert two_d.samples == 1


# ----------------------------------------------------------------------------------------------------
# the sequential model driver on tiny transformers


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def calibration_batches(n: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(23)
    batches = []
    for _ in range(n):
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[1, 10:] = 0
        mask[3, 6:] = 0
        batches.append({"input_ids": torch.randint(1, 97, (4, 16), generator=g), "attention_mask": mask})
    return batches


def block_layers(model, prefix: str) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)}


def block_targets(model, marker: str) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and marker in name}


@pytest.mark.parametrize("build,marker,blocks,groups", [
    (tiny_bert, ".layer.", "bert.encoder.layer",
     [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
      ["intermediate.dense"], ["output.dense"]]),
    (tiny_llama, ".layers.", "model.layers",
     [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
])
def test_driver_quantizes_every_target_on_grid(build, marker, blocks, groups):
    model = build()
    batches = calibration_batches()
    targets = block_targets(model, marker)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    list_name, block_names = find_blocks(model, [k[:-len(".weight")] for k in targets])
    assert list_name == blocks and block_names == [f"{blocks}.0", f"{blocks}.1"]
    layers = block_layers(model, f"{blocks}.0.")
    found = execution_groups(model, batches[0], layers, model.get_submodule(f"{blocks}.0"), CPU)
    assert found == [[f"{blocks}.0.{name}" for name in group] for group in groups]

    params = dict(bits=3, scheme="sym-full", group_size=16, scale_dtype="float16")
    result = get("quantize", "gptq").fn(targets, context=QuantizeContext(model=model, batches=batches), **params)
    assert list(result) == list(targets)
    spec = GridSpec(3, "sym-full", 16)
    for key, record in result.items():
        assert record.codes.shape == targets[key].shape and record.codes.dtype == torch.int32
        assert 0 <= int(record.codes.min()) and int(record.codes.max()) <= spec.qmax
        assert record.zero is None and record.implicit_zero == 4.0 and record.scale.dtype == torch.float16
        q = record.dequantize()
        assert torch.all(q / record.scale.float().repeat_interleave(16, 1) + 4 == record.codes.float())
        assert record.info["calibration_tokens"] == 3 * (16 + 10 + 16 + 6)   # padding left out
        assert record.info["loss"] > 0
        error = (q - targets[key]).abs().max()
        assert 0 < error <= record.scale.float().max() * 4   # close to the weight, not a copy of it
    assert {record.info["sequential_group"] for record in result.values()} == {0, 1, 2, 3}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the model is left as it was


def test_block_stopping_gives_the_full_forward_hessian():
    model = tiny_llama()
    batches = calibration_batches()
    layers = block_layers(model, "model.layers.0.")
    stopped = _calibrate(model, batches, layers, model.model.layers[0], CPU)
    full = _calibrate(model, batches, layers, None, CPU)
    for name in layers:
        assert torch.equal(stopped[name].matrix, full[name].matrix)
        assert stopped[name].tokens == full[name].tokens == 3 * 48
    # and the cut really happens: the block after it never runs
    calls = []
    handle = model.model.layers[1].register_forward_hook(lambda *_: calls.append(1))
    _calibrate(model, batches, layers, model.model.layers[0], CPU)
    handle.remove()
    assert calls == []


def test_driver_propagates_quantization_error_forward():
    """Block 0 is quantized with H of the float model; block 1 with H of the model whose block 0 is
    already quantized (the reference's sequential semantics), checked against a manual run."""
    model = tiny_bert()
    batches = calibration_batches()
    targets = block_targets(model, ".layer.")
    spec = GridSpec(4, "asym", -1)
    result = gptq_model(model, targets, batches, spec, true_sequential=False, progress=False)

    manual = tiny_bert()
    modules = dict(manual.named_modules())
    block0 = {n[:-7]: modules[n[:-7]] for n in targets if ".layer.0." in n}
    block1 = {n[:-7]: modules[n[:-7]] for n in targets if ".layer.1." in n}
    h0 = _calibrate(manual, batches, block0, None, CPU)
    with torch.no_grad():
        for name, module in block0.items():
            record, _ = gptq_layer(targets[f"{name}.weight"], h0[name].matrix, spec)
            assert torch.equal(record.codes, result[f"{name}.weight"].codes)
            module.weight.copy_(record.dequantize())
    h1 = _calibrate(manual, batches, block1, None, CPU)
    float_model = tiny_bert()
    float_modules = dict(float_model.named_modules())
    h1_float = _calibrate(float_model, batches, {n: float_modules[n] for n in block1}, None, CPU)
    for name in block1:
        record, _ = gptq_layer(targets[f"{name}.weight"], h1[name].matrix, spec)
        assert torch.equal(record.codes, result[f"{name}.weight"].codes)
        assert h1_float[name].tokens == h1[name].tokens > 0
        assert not torch.allclose(h1[name].matrix, h1_float[name].matrix)   # block 0's error reached block 1


def test_driver_deltas_outside_targets_and_determinism():
    base = tiny_bert()
    model = tiny_bert()
    g = torch.Generator().manual_seed(24)
    offsets, deltas = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layer." in name or "pooler" in name):
            delta = 0.02 * torch.randn(module.weight.shape, generator=g)
            delta[torch.rand(delta.shape, generator=g) < 0.5] = 0.0     # a pruned delta
            offsets[f"{name}.weight"] = module.weight.detach().clone()
            deltas[f"{name}.weight"] = delta
    context = QuantizeContext(model=model, batches=calibration_batches(2), offsets=offsets)
    method = get("quantize", "gptq").fn
    result = method(deltas, context=context, bits=4, group_size=16, preserve_zeros=True, actorder=True,
                    static_groups=True)
    again = method(deltas, context=context, bits=4, group_size=16, preserve_zeros=True, actorder=True,
                   static_groups=True)
    for key, record in result.items():
        q = record.dequantize()
        assert torch.all(q[deltas[key] == 0] == 0)
        assert torch.equal(record.codes, again[key].codes)
    assert result["bert.pooler.dense.weight"].info["block"] is None
    assert result["bert.encoder.layer.1.output.dense.weight"].info["block"] == "bert.encoder.layer.1"
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), model.state_dict().values()))


def test_driver_rejects_targets_that_are_not_linear_weights():
    model = tiny_bert()
    with pytest.raises(KeyError, match="bert.embeddings.word_embeddings.weight"):
        gptq_model(model, {"bert.embeddings.word_embeddings.weight": torch.zeros(97, 32)},
                   calibration_batches(1), GridSpec(4))
    with pytest.raises(ValueError, match="shape"):
        gptq_model(model, {"bert.pooler.dense.weight": torch.zeros(3, 3)}, calibration_batches(1), GridSpec(4))
