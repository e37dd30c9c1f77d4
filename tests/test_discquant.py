"""DiscQuant rounding (spec quantization.md §5; §9 checks 13-17) on a tiny Llama and a tiny BERT classifier."""

import pytest
import torch
from conftest import tiny_llama, token_batches
from transformers import BertConfig, BertForSequenceClassification

from methods import registry
from methods.quantize.apply import quantizable
from methods.quantize.common import QuantizeContext
from methods.quantize.discquant import DiscQuantRounding, discquant
from methods.quantize.grids import GridSpec, rtn


def _decoder():
    model = tiny_llama(initializer_range=0.1)
    return model, token_batches(64, 4, 16, 4, seed=1, padding=(slice(0, 1), slice(0, 5)))  # left padding, row 0


def _encoder():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = BertForSequenceClassification(config).eval()
    batches = token_batches(40, 8, 12, 4, seed=2, padding=(slice(0, 3), slice(9, None)))  # right padding
    return model, [{**b, "labels": torch.zeros(8, dtype=torch.long)} for b in batches]


@pytest.fixture(scope="module")
def decoder():
    model, batches = _decoder()
    targets = {n: model.get_parameter(n).detach().clone() for n in quantizable(model)}
    return model, batches, targets


@pytest.fixture(scope="module")
def encoder():
    model, batches = _encoder()
    targets = {n: model.get_parameter(n).detach().clone() for n in quantizable(model)}
    return model, batches, targets


def _context(model, batches, is_encoder=False, **kwargs):
    return QuantizeContext(model=model, batches=batches, is_encoder=is_encoder, **kwargs)


def _exact_ties(weight, spec):
    """Entries whose w/s lies exactly half-way between two codes (RTN rounds them half to even)."""
    from methods.quantize.grids import fit
    scale, _ = fit(weight, spec).per_column()
    units = weight / scale
    return (units - torch.floor(units)) == 0.5


@pytest.mark.parametrize("scheme,group_size", [("sym-full", -1), ("asym", 16), ("sym-restricted", 0)])
def test_outputs_are_down_or_up_and_at_most_2b_values_per_group(decoder, scheme, group_size):
    model, batches, targets = decoder
    context = _context(model, batches)
    out = discquant(targets, context=context, bits=3, scheme=scheme, group_size=group_size, steps=8, lr=0.2)
    spec = GridSpec(3, scheme, group_size)
    problem = DiscQuantRounding(targets, context, spec)
    for name, record in out.items():
        t = problem.targets[name]
        codes = record.codes.to(torch.float32)
        assert ((codes == t.down) | (codes == t.down + t.step)).all()
        value = record.dequantize()
        down, up = t.value(torch.zeros_like(t.y)), t.value(torch.ones_like(t.y))
        assert ((value == down) | (value == up)).all()
        inside = t.step > 0                  # clipped entries (Δ = 0) sit at the RTN value
        assert ((value - targets[name]).abs() <= (up - down) + 1e-7)[inside].all()
        assert torch.equal(value[~inside], rtn(targets[name], spec)[1][~inside])
        per_row, width = spec.groups(value.shape)
        groups = value.reshape(-1, width) if group_size != 0 else value.reshape(1, -1)
        assert max(len(torch.unique(g)) for g in groups) <= 2 ** 3
        assert record.decode == "affine" and record.bits == 3
        assert (record.zero is None) == (scheme != "asym")
    # the per-tensor record stores one scale
    if group_size == 0:
        assert all(r.scale.shape == (1, 1) for r in out.values())


@pytest.mark.parametrize("init", ["orig", "rtn"])
@pytest.mark.parametrize("scheme", ["sym-full", "asym"])
def test_zero_steps_from_orig_or_rtn_is_rtn_except_exact_ties(decoder, init, scheme):
    model, batches, targets = decoder
    out = discquant(targets, context=_context(model, batches), bits=4, scheme=scheme, steps=0, init=init)
    spec = GridSpec(4, scheme)
    for name, weight in targets.items():
        codes, dequantized, _ = rtn(weight, spec)
        ties = _exact_ties(weight, spec)
        assert torch.equal(out[name].codes[~ties], codes[~ties])
        assert torch.equal(out[name].dequantize()[~ties], dequantized[~ties])


def test_zero_steps_from_rand_agrees_with_rtn_about_half_the_time(decoder):
    model, batches, targets = decoder
    spec = GridSpec(4, "sym-full")
    out = discquant(targets, context=_context(model, batches, seed=3), bits=4, steps=0, init="rand")
    problem = DiscQuantRounding(targets, _context(model, batches), spec)
    agree = movable = 0
    for name, weight in targets.items():
        inside = problem.targets[name].step > 0
        agree += int((out[name].codes == rtn(weight, spec)[0])[inside].sum())
        movable += int(inside.sum())
    assert movable > 15_000
    assert abs(agree / movable - 0.5) < 0.02        # 4σ is 0.016
    again = discquant(targets, context=_context(model, batches, seed=3), bits=4, steps=0, init="rand")
    other = discquant(targets, context=_context(model, batches, seed=4), bits=4, steps=0, init="rand")
    assert all(torch.equal(out[n].codes, again[n].codes) for n in targets)
    assert not all(torch.equal(out[n].codes, other[n].codes) for n in targets)


def test_kl_and_its_gradient_vanish_at_x_equals_y(decoder):
    """In range, W(y) = W. Grid S clips each row's positive absmax (that weight cannot be reproduced),
    so the check runs on Grid R with a float32 scale, where no weight lies beyond the range."""
    model, batches, targets = decoder
    problem = DiscQuantRounding(targets, _context(model, batches), GridSpec(3, "sym-restricted", scale_dtype="float32"))
    names = list(targets)

    def kl_and_grad(xs):
        xs = {n: x.clone().requires_grad_(True) for n, x in xs.items()}
        kl = problem.kl(xs, batches[0])
        grads = torch.autograd.grad(kl / problem.delta2, [xs[n] for n in names])
        return float(kl.detach()), max(float(g.abs().max()) for g in grads)

    y = {n: t.y for n, t in problem.targets.items()}
    for n, t in problem.targets.items():     # W(y) reproduces the weights
        assert torch.allclose(t.value(y[n]), targets[n], rtol=0, atol=1e-6)
    kl_y, grad_y = kl_and_grad(y)
    kl_r, grad_r = kl_and_grad(problem.init_x("rand", 0))
    assert abs(kl_y) < 1e-6 and kl_r > 1e-3
    assert grad_y < 1e-3 * grad_r


def test_linear_term_alone_converges_to_rtn_and_leaves_clamped_weights(decoder):
    """ρ = 0: descent on −⟨2y−1, x⟩ ends at round(y) wherever y ≠ ½; Δ = 0 entries stay at down."""
    model, batches, targets = decoder
    spec = GridSpec(3, "sym-full")
    problem = DiscQuantRounding(targets, _context(model, batches), spec)
    start = problem.init_x("rand", 0)
    xs, history = problem.optimize(start, steps=100, lr=0.05, rho=0.0, clamp=1.0)
    assert history == []                     # no model pass needed
    for name, t in problem.targets.items():
        codes = t.codes(xs[name])
        decided = (t.step > 0) & ((t.y - 0.5).abs() > 1e-4)
        assert decided.float().mean() > 0.9
        assert torch.equal(codes[decided], t.rtn_codes()[decided])
        assert torch.equal(codes[t.step == 0], t.down[t.step == 0])
    clamped = sum(int((t.step == 0).sum()) for t in problem.targets.values())
    assert clamped > 0                       # Grid S clips the positive absmax of every row


def test_x_stays_in_the_unit_cube_after_every_step(decoder):
    model, batches, targets = decoder
    problem = DiscQuantRounding(targets, _context(model, batches), GridSpec(3, "sym-full"))
    seen = []

    def check(step, xs):
        low = min(float(x.min()) for x in xs.values())
        high = max(float(x.max()) for x in xs.values())
        on_faces = sum(int(((x == 0) | (x == 1)).sum()) for x in xs.values())
        seen.append((step, low, high, on_faces))

    problem.optimize(problem.init_x("rand", 1), steps=6, lr=0.5, rho=200.0, clamp=1.0, callback=check)
    assert [s for s, *_ in seen] == list(range(6))
    assert all(0.0 <= low and high <= 1.0 for _, low, high, _ in seen)
    assert seen[0][3] > 0                    # the projection was active: steps of 0.5 leave the cube


def _rounded_kl(targets, context, spec, **params):
    out = discquant(targets, context=context, bits=spec.bits, scheme=spec.scheme, **params)
    problem = DiscQuantRounding(targets, context, spec)
    return problem.calibration_kl({n: q.dequantize() for n, q in out.items()}), out


def test_optimised_kl_beats_the_random_start_and_rtn_on_a_tiny_decoder(decoder):
    model, batches, targets = decoder
    spec = GridSpec(3, "sym-full")
    context = _context(model, batches)
    kl_rand, _ = _rounded_kl(targets, context, spec, steps=0, init="rand")
    kl_rtn, _ = _rounded_kl(targets, context, spec, steps=0, init="rtn")
    kl_dq, out = _rounded_kl(targets, context, spec, steps=48, init="rand")
    assert kl_dq < 0.5 * kl_rand
    assert kl_dq < kl_rtn                    # the KL term pays off on the data it sees
    info = next(iter(out.values())).info
    assert info["kl_last"] < info["kl_first"] and info["delta2"] > 0 and info["weight_decay"] == 0.01


def test_runs_on_a_tiny_bert_classifier_with_the_label_distribution(encoder):
    model, batches, targets = encoder
    spec = GridSpec(3, "sym-full")
    context = _context(model, batches, is_encoder=True)
    problem = DiscQuantRounding(targets, context, spec)
    assert problem.reference(batches[0]).shape == (8, 3)        # one label distribution per example
    kl_rand, _ = _rounded_kl(targets, context, spec, steps=0, init="rand")
    kl_dq, out = _rounded_kl(targets, context, spec, steps=40, init="rand")
    assert set(out) == set(targets) and len(targets) == 12
    assert kl_dq < kl_rand


def test_decoder_kl_counts_non_padding_tokens_only(decoder):
    model, batches, targets = decoder
    problem = DiscQuantRounding(targets, _context(model, batches), GridSpec(3, "sym-full"))
    assert problem.reference(batches[0]).shape == (int(batches[0]["attention_mask"].sum()), 64)


def test_deltas_keep_their_zeros_and_track_the_offset_model(decoder):
    """Delta targets: the grid is the delta's, the model runs offset + W(x), pruned zeros stay 0."""
    model, batches, targets = decoder
    g = torch.Generator().manual_seed(5)
    offsets = {n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in targets.items()}
    deltas = {}
    for n, w in targets.items():
        delta = w - offsets[n]
        delta[torch.rand(delta.shape, generator=g) < 0.5] = 0.0
        deltas[n] = delta
    context = _context(model, batches, offsets=offsets)
    problem = DiscQuantRounding(deltas, context, GridSpec(3, "sym-restricted", scale_dtype="float32"))
    y = {n: t.y for n, t in problem.targets.items()}
    assert abs(problem.kl(y, batches[0]).item()) < 1e-6          # the original is offset + delta
    out = discquant(deltas, context=context, bits=3, steps=10)
    for n, delta in deltas.items():
        assert (out[n].dequantize()[delta == 0] == 0).all()
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_deterministic_for_a_fixed_seed(decoder):
    model, batches, targets = decoder
    first = discquant(targets, context=_context(model, batches, seed=7), bits=3, steps=5)
    second = discquant(targets, context=_context(model, batches, seed=7), bits=3, steps=5)
    assert all(torch.equal(first[n].codes, second[n].codes) for n in targets)


def test_registered_with_official_defaults_and_named_errors(decoder):
    spec = registry.get("quantize", "discquant")
    params = spec.resolve({}, "quantize.discquant")
    assert params == {"bits": 4, "scheme": "sym-full", "group_size": -1, "scale_dtype": "float16", "steps": 64,
                      "lr": 0.05, "rho": 200.0, "clamp": 1.0, "warmup_steps": 0, "init": "rand"}
    with pytest.raises(registry.MethodConfigError, match="quantize.discquant.init"):
        spec.resolve({"init": "zeros"}, "quantize.discquant")
    model, batches, targets = decoder
    context = _context(model, batches)
    with pytest.raises(ValueError, match="warmup_steps"):
        discquant(targets, context=context, steps=4, warmup_steps=8)
    with pytest.raises(ValueError, match="rho"):
        discquant(targets, context=context, rho=-1.0)
    with pytest.raises(ValueError, match="group_size 24 does not divide"):
        discquant(targets, context=context, group_size=24)
    with pytest.raises(ValueError, match="needs the model and calibration batches"):
        discquant(targets, context=QuantizeContext())


def test_one_step_matches_the_official_update_rule(decoder):
    """x.grad ← −(2y−1) + clamp(ρ·∇[KL/δ²], −c, c); AdamW(lr, (0.9, 0.999), weight_decay 0.01); clamp to [0, 1]."""
    model, batches, targets = decoder
    problem = DiscQuantRounding(targets, _context(model, batches), GridSpec(3, "sym-full"))
    start = problem.init_x("rand", 2)
    names = list(targets)
    xs = {n: start[n].clone().requires_grad_(True) for n in names}
    kl = problem.kl(xs, batches[0])
    grads = torch.autograd.grad(kl / problem.delta2, [xs[n] for n in names])
    rho, c, lr = 200.0, 0.3, 0.05
    expected = {}
    for n, g in zip(names, grads):
        y = problem.targets[n].y
        applied = -(2 * y - 1) + torch.clamp(rho * g, -c, c)
        x = start[n] * (1 - lr * 0.01)                            # decoupled weight decay
        m_hat, v_hat = applied, applied.pow(2)                    # first Adam step, bias-corrected
        expected[n] = torch.clamp(x - lr * m_hat / (v_hat.sqrt() + 1e-8), 0, 1)
    got, history = problem.optimize(start, steps=1, lr=lr, rho=rho, clamp=c)
    assert history == [pytest.approx(float(kl.detach()))]
    for n in names:
        assert torch.allclose(got[n], expected[n], rtol=0, atol=1e-6)
    clipped = sum(int((rho * g).abs().gt(c).sum()) for g in grads)
    assert clipped > 0                                            # the clamp was exercised


def test_warmup_starts_from_a_zero_learning_rate(decoder):
    model, batches, targets = decoder
    problem = DiscQuantRounding(targets, _context(model, batches), GridSpec(3, "sym-full"))
    start = problem.init_x("rand", 0)
    moved = []
    problem.optimize(start, steps=6, lr=0.1, rho=200.0, clamp=1.0, warmup_steps=3,
                     callback=lambda step, xs: moved.append(any(not torch.equal(xs[n], start[n]) for n in xs)))
    assert moved == [False, True, True, True, True, True]        # get_cosine_schedule_with_warmup: lr(0) = 0
