"""Conformance with compressed-tensors / llm-compressor (issue "Weight quantization" acceptance).

- RTN: our grids (``grids.rtn``) equal compressed-tensors' ``calculate_qparams`` + ``fake_quantize`` on the
  same tensor, except at exact ties (sym-full ≡ their symmetric int, asym ≡ their asymmetric int; their
  codes are ours shifted by −2^(b−1), their zero-point is ``−2^(b−1) − min/s`` rounded).
- GPTQ: llm-compressor's ``quantize_weight`` on one layer, same Hessian and damping, their up-front
  (observer) group parameters matched by our ``static_groups=True`` and their ``actorder="static"``
  (= "weight") by our ``actorder=True``: the reconstruction loss ½tr((W−Q)H(W−Q)ᵀ) agrees within 1%.

Test-only comparators; each part skips cleanly when its package is not installed. compressed-tensors
installs next to the project's pins; llm-compressor does not resolve with them (every release caps
transformers, tqdm, numpy or pyyaml below our pins), but its pure-torch ``quantize_weight`` imports and runs
when it is installed with ``pip install --no-deps`` next to the compressed-tensors version it pins. Scales
are float32 on both sides (no ``scale_dtype`` rounding) so that only the algorithms are compared.
"""

from __future__ import annotations

import pytest
import torch

from methods.quantize.gptq import gptq_layer
from methods.quantize.grids import GridSpec, rtn

ct = pytest.importorskip("compressed_tensors.quantization")


def their_args(bits: int, scheme: str, group_size: int, actorder: str | None = None):
    strategy = "channel" if group_size == -1 else "group"
    return ct.QuantizationArgs(num_bits=bits, type="int", symmetric=(scheme == "sym-full"), strategy=strategy,
                               group_size=None if group_size == -1 else group_size, actorder=actorder)


def their_qparams(w: torch.Tensor, args, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What their min-max weight observer computes: per-row or per-group min/max of the original W."""
    from compressed_tensors.quantization.utils import calculate_qparams
    rows, cols = w.shape
    width = cols if group_size == -1 else group_size
    grouped = w.reshape(rows, cols // width, width)
    return calculate_qparams(grouped.amin(dim=2), grouped.amax(dim=2), args)


def sample_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.01] *= 10.0   # outliers
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym-full"])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
def test_rtn_grid_equals_compressed_tensors_except_ties(bits, scheme, group_size):
    w = sample_weight(64, 256, seed=bits * 100 + group_size % 97)
    spec = GridSpec(bits, scheme, group_size, "float32")
    codes, ours, params = rtn(w, spec)
    args = their_args(bits, scheme, group_size)
    scale, zero_point = their_qparams(w, args, group_size)
    theirs = ct.fake_quantize(w, scale, zero_point, args)

    assert torch.equal(scale.float(), params.scale)      # same scale formula, bit for bit
    half = 2 ** (bits - 1)
    ratio = w / params.per_column()[0]
    tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4   # weight ties (round half even vs float noise)
    if scheme == "asym":
        # zero-point ties shift a whole group; their zp is ours - 2^(b-1) elsewhere
        raw = -w.reshape(64, -1, params.width).amin(dim=2).clamp(max=0) / params.scale
        zp_tie = ((raw - raw.floor()) - 0.5).abs() < 1e-4
        assert torch.equal((zero_point.float() + half)[~zp_tie], params.zero[~zp_tie])
        tie |= zp_tie.repeat_interleave(params.width, dim=1)
    # Grid S puts each group's absmax weight exactly on a tie (±(2^(b-1) - 1/2)·s); other ties are rare
    assert int(tie.sum()) < params.scale.numel() * (scheme == "sym-full") + 0.01 * w.numel()
    assert torch.equal(ours[~tie], theirs[~tie])
    assert (ours != theirs).sum() <= tie.sum()


quantize_weight = None
try:  # the GPTQ comparator is a second, separately installed package
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
except ImportError:
    pass


def correlated_inputs(n_in: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = mixing @ torch.randn(n_in, tokens, generator=g)
    x[torch.randperm(n_in, generator=g)[:3]] *= 15.0
    return x


def reconstruction_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    diff = (w - q).double()
    return float(0.5 * torch.trace(diff @ h.double() @ diff.t()))


@pytest.mark.skipif(quantize_weight is None, reason="llmcompressor is not installed")
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("scheme", ["asym", "sym-full"])
@pytest.mark.parametrize("group_size,actorder", [(-1, False), (-1, True), (32, False), (32, True)])
def test_gptq_loss_within_one_percent_of_llm_compressor(bits, scheme, group_size, actorder):
    x = correlated_inputs(128, 1024, seed=bits + group_size % 7)
    w = sample_weight(48, 128, seed=bits + 3 * actorder)
    h = 2.0 * x @ x.t() / x.shape[1]
    args = their_args(bits, scheme, group_size, actorder="static" if actorder else None)
    scale, zero_point = their_qparams(w, args, group_size)
    theirs, their_losses, fallback = quantize_weight(
        w.clone()[None], h.clone()[None], scale[None], zero_point[None], None, args, blocksize=64, percdamp=0.01)
    assert not bool(fallback.any())
    record, losses = gptq_layer(w, h, GridSpec(bits, scheme, group_size, "float32"), blocksize=64, percdamp=0.01,
                                actorder=actorder, static_groups=True)
    ours = record.dequantize()
    ours_loss, their_loss = reconstruction_loss(w, ours, h), reconstruction_loss(w, theirs[0], h)
    assert ours_loss == pytest.approx(their_loss, rel=0.01)
    # their recorded (damped) losses follow the same accounting as ours
    assert float(losses.sum()) == pytest.approx(float(their_losses.sum()), rel=0.01)
    # and the two are the same algorithm: nearly every weight lands on the same grid point
    assert (ours != theirs[0]).float().mean() < 0.02
