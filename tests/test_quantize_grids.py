"""Uniform grids and RTN: spec quantization.md §9 checks 1–6 for the three schemes at per-tensor,
per-channel and per-group granularity, plus stored-scale exactness and the MSE clipping search."""

import pytest
import torch

from methods.quantize.artifact import OffGridError, assert_on_grid
from methods.quantize.common import QuantizeContext
from methods.quantize.grids import GridSpec, fit, quantize, rtn as grid_rtn
from methods.quantize.rtn import MSE_NORM, mse_clip_params, rtn_tensor
from methods.registry import MethodConfigError, get

SCHEMES = ("asym", "sym-full", "sym-restricted")
GROUPS = (0, -1, 32)   # per tensor, per channel, groups of 32 input columns
CTX = QuantizeContext()


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def rtn_method(weight: torch.Tensor, **params):
    spec = get("quantize", "rtn")
    return spec.fn({"w": weight}, context=CTX, **spec.resolve(params, "quantize.rtn"))["w"]


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_16_bits_is_identity_within_half_a_step(scheme, group_size):
    """Check 1 (float32 scale): |w − ŵ| ≤ s/2 entrywise and relative Frobenius error < 1e−4."""
    w = gaussian(32, 128)
    qt = rtn_tensor(w, GridSpec(16, scheme, group_size, "float32"))
    deq = qt.dequantize()
    step = qt.scale.to(torch.float32)[:, qt.group_index()].expand_as(w)
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-6) + 1e-7 * w.abs()).all()
    assert float(torch.linalg.norm(w - deq) / torch.linalg.norm(w)) < 1e-4
    # A float16 scale is rounded (to nearest, ≤ 2^−11 relative) before the codes are computed, so the
    # grid's range can shrink by that much and the extreme weights of a group clip by ≤ 2^−11·range.
    half = rtn_tensor(w, GridSpec(16, scheme, group_size, "float16"))
    step = half.scale.to(torch.float32)[:, half.group_index()].expand_as(w)
    if group_size == 0:
        absmax = w.abs().max().expand_as(w)
    else:
        width = 128 if group_size == -1 else group_size
        grouped = w.abs().reshape(32, 128 // width, width)
        absmax = grouped.amax(dim=2, keepdim=True).expand_as(grouped).reshape(32, 128)
    assert ((w - half.dequantize()).abs() <= step / 2 * (1 + 1e-6) + 2 * absmax * 2.0 ** -11).all()
    assert float(torch.linalg.norm(w - half.dequantize()) / torch.linalg.norm(w)) < 1e-3


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_on_grid_and_level_counts(scheme, group_size, bits):
    """Check 2: ŵ/s + z is an integer code in [0, qmax]; ≤ 2^b (Grid R: 2^b − 1) values per group."""
    w = gaussian(16, 128, seed=bits)
    spec = GridSpec(bits, scheme, group_size, "float16")
    qt = rtn_tensor(w, spec)
    deq = qt.dequantize()
    index = qt.group_index()
    scale = qt.scale.to(torch.float32)[:, index].expand_as(w)
    zero = (qt.zero.to(torch.float32)[:, index].expand_as(w) if qt.zero is not None
            else torch.full_like(w, qt.implicit_zero))
    code = deq / scale + zero
    assert (code - code.round()).abs().max() < 1e-4
    assert code.round().min() >= 0 and code.round().max() <= spec.qmax
    assert torch.equal(code.round().to(torch.int32), qt.codes)
    worst = assert_on_grid(qt)
    levels = 2 ** bits - 1 if scheme == "sym-restricted" else 2 ** bits
    assert worst <= levels
    assert assert_on_grid(deq, bits, group_size=group_size) == worst   # the plain-tensor form agrees


@pytest.mark.parametrize("scheme", ("asym", "sym-full"))
def test_3_bit_g64_uses_exactly_8_levels(scheme):
    """Check 2 [exp]: exactly 8 distinct values per group at 3-bit g64 on Gaussian weights."""
    qt = rtn_tensor(gaussian(8, 256, seed=3), GridSpec(3, scheme, 64))
    assert assert_on_grid(qt) == 8


def test_too_many_levels_is_reported():
    w = torch.arange(10, dtype=torch.float32).repeat(4, 1)   # 10 distinct values in every row
    assert assert_on_grid(w, 4, group_size=-1) == 10
    with pytest.raises(OffGridError, match="10 distinct values"):
        assert_on_grid(w, 3, group_size=-1)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_zero_is_preserved(scheme, group_size):
    """Check 2: Q(0) == 0, and pruned (zero) entries of a sparse delta stay exactly zero."""
    w = gaussian(16, 128, seed=1)
    w[torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.6] = 0.0
    w[3] = 0.0                  # an all-zero row
    w[5] = w[5].abs()           # an all-non-negative row
    for bits in (2, 3, 4):
        deq = rtn_tensor(w, GridSpec(bits, scheme, group_size)).dequantize()
        assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))
    assert torch.equal(rtn_tensor(torch.zeros(4, 64), GridSpec(3, scheme, group_size)).dequantize(),
                       torch.zeros(4, 64))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_idempotent_for_fixed_parameters(scheme, group_size):
    """Check 3: Q(Q(W; s, z); s, z) == Q(W; s, z)."""
    w = gaussian(16, 128, seed=4)
    params = fit(w, GridSpec(3, scheme, group_size))
    codes, once = quantize(w, params)
    codes_again, twice = quantize(once, params)
    assert torch.equal(once, twice) and torch.equal(codes, codes_again)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mse_strictly_decreases_with_bits(scheme):
    """Check 4 on 12,800 Gaussian weights, b = 2…8, per channel."""
    w = gaussian(100, 128, seed=5)
    errors = [mse(w, rtn_tensor(w, GridSpec(b, scheme, -1)).dequantize()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mse_decreases_with_finer_groups(scheme):
    """Check 5 on 131,072 weights: g32 < g64 < g128 < g256 < per channel < per tensor."""
    w = gaussian(128, 1024, seed=6)
    errors = [mse(w, rtn_tensor(w, GridSpec(4, scheme, g)).dequantize()) for g in (32, 64, 128, 256, -1, 0)]
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


def test_4_bit_symmetric_level_spans():
    """Check 6, pinning the conventions: Grid S spans [−(8/7.5)A, (7/7.5)A], Grid R [−A, A]."""
    a = 7.5                       # Grid S at 4 bits: s = 2A/15 = 1 exactly, so w/s is exact
    w = torch.tensor([[a, -a, 0.5, -3.2, 1.0, 6.9, -7.2, 2.5]], dtype=torch.float32)
    full = rtn_tensor(w, GridSpec(4, "sym-full", -1, "float32"))
    s = float(full.scale)
    assert s == 1.0 and full.implicit_zero == 8.0
    assert (s * (0 - 8), s * (15 - 8)) == (-(8 / 7.5) * a, (7 / 7.5) * a)
    deq = full.dequantize()[0]
    assert deq[0] == 7.0          # +A lands on the top level 7s = 0.933·A
    # −A sits exactly on the tie w/s = −7.5; round half to even takes it to the outer level −8s
    assert deq[1] == -8.0
    restricted = rtn_tensor(w, GridSpec(4, "sym-restricted", -1, "float32"))
    sr = float(restricted.scale)
    assert restricted.implicit_zero == 7.0 and sr == pytest.approx(a / 7, rel=1e-7)
    assert (sr * (0 - 7), sr * (14 - 7)) == pytest.approx((-a, a), rel=1e-6)
    assert restricted.dequantize()[0, :2].tolist() == pytest.approx([a, -a], rel=1e-6)


@pytest.mark.parametrize("scale_dtype", ("float16", "bfloat16", "float32"))
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_stored_scale_reproduces_the_dequantized_weight_exactly(scheme, group_size, scale_dtype):
    w = gaussian(16, 128, seed=7) * 0.02
    spec = GridSpec(4, scheme, group_size, scale_dtype)
    qt = rtn_tensor(w, spec)
    assert qt.scale.dtype == getattr(torch, scale_dtype) and qt.codes.dtype == torch.int32
    assert qt.scale.shape == ((1, 1) if group_size == 0 else (16, 128 // qt.width))
    assert (qt.zero is None) == (scheme != "asym")
    codes, deq, _ = grid_rtn(w, spec)
    assert torch.equal(qt.codes, codes)
    assert torch.equal(qt.dequantize(), deq)   # bit-exact from (codes, stored scale, zero) alone


def test_high_bit_asym_zero_points_fit_in_b_bits():
    """A float16 scale rounded below range/qmax used to push z past qmax at ≥ 12 bits (fixed in grids.py)."""
    for seed in range(10):
        w = gaussian(64, 64, seed=seed) - 2.0 * (seed + 1) / 10
        for bits in (12, 14, 16):
            qt = rtn_tensor(w, GridSpec(bits, "asym", -1, "float16"))
            assert int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= 2 ** bits - 1
            assert assert_on_grid(qt) <= 2 ** bits


def test_group_size_must_divide_the_input_size():
    with pytest.raises(ValueError, match=r"target 'w'.*group_size 48 does not divide the input size 100"):
        rtn_method(gaussian(4, 100), group_size=48)


def test_registered_parameters_are_checked():
    spec = get("quantize", "rtn")
    assert spec.resolve({}, "q") == {"bits": 4, "scheme": "asym", "group_size": -1, "scale_dtype": "float16",
                                     "mse_clip": False}
    with pytest.raises(MethodConfigError, match="q.scheme"):
        spec.resolve({"scheme": "sym"}, "q")
    with pytest.raises(MethodConfigError, match="q.bits"):
        spec.resolve({"bits": 1}, "q")
    with pytest.raises(MethodConfigError, match="q.group_size"):
        spec.resolve({"group_size": -2}, "q")
    with pytest.raises(ValueError, match="'bad'.*2-D"):
        spec.fn({"bad": torch.zeros(3)}, context=CTX, **spec.resolve({}, "q"))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_mse_clip_never_loses_and_picks_a_reference_shrink(scheme, group_size):
    """GPTQ reference MSE search: per group Σ|ŵ − w|^2.4 is ≤ plain RTN's, and the chosen scale is that
    of one of the 80 shrink factors p = 1 − i/100."""
    w = gaussian(16, 128, seed=8)
    w[2, 5] = 12.0                # an outlier: clipping it pays off for its row/group
    spec = GridSpec(3, scheme, group_size, "float32")
    clipped = rtn_method(w, bits=3, scheme=scheme, group_size=group_size, scale_dtype="float32", mse_clip=True)
    plain = rtn_tensor(w, spec)

    def group_error(qt):
        err = (qt.dequantize() - w).abs().pow(MSE_NORM)
        return err.sum() if group_size == 0 else err.reshape(16, -1, qt.width).sum(dim=2)

    assert (group_error(clipped) <= group_error(plain)).all()
    assert float(group_error(clipped).sum()) < float(group_error(plain).sum())
    assert clipped.info["mse_clip"] is True and assert_on_grid(clipped) <= 2 ** 3
    params = mse_clip_params(w, spec)
    base = fit(w, spec)
    ratios = params.scale / base.scale
    candidates = torch.tensor([1 - i / 100 for i in range(80)])
    assert ((ratios.reshape(-1, 1) - candidates).abs().min(dim=1).values < 1e-5).all()
    assert float(ratios.min()) < 1.0   # the outlier's group was shrunk
