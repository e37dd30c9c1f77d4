"""RTN (round-to-nearest), the data-free baseline of spec quantization.md §1.

Every target is quantized independently on one of the uniform grids of ``grids.py`` (Grid A ``asym``,
Grid S ``sym-full``, Grid R ``sym-restricted``) per channel (``group_size=-1``), per tensor (``0``) or
in groups of g input columns. ``asym`` per channel without MSE clipping is the RTN row of the GPTQ
README (``llama.py --nearest``).

``mse_clip=True`` is the GPTQ reference's optional clipping search (``Quantizer.configure(mse=True)``
with its defaults grid=100, maxshrink=0.8, norm=2.4): for shrink factors p = 1, 0.99, …, 0.21 the
group range becomes (p·xmin, p·xmax), the grid is refitted, and each group (row, row-group, or the
whole tensor when per tensor) keeps the first p with the smallest Σ|ŵ − w|^2.4. As everywhere in
``grids.py`` the scale is rounded to ``scale_dtype`` before codes are computed, so the stored record
reproduces the dequantized weight exactly.

A per-tensor record stores a single (1, 1) scale (and zero), which ``QuantizedTensor.dequantize``
broadcasts over the rows, so the artifact counts one scale, not one per row.
"""

from __future__ import annotations

import torch

from methods.quantize.common import QuantizeContext, QuantizedTensor
from methods.quantize.grids import (SCALE_DTYPES, SCHEMES, GridParams, GridSpec, decode, encode, fit, quantize,
                                    range_params)
from methods.registry import Param, register

MSE_GRID = 100        # shrink step 1/grid
MSE_MAXSHRINK = 0.8   # int(maxshrink·grid) = 80 candidates: p = 1 … 0.21
MSE_NORM = 2.4        # error exponent


def check_target(name: str, weight: torch.Tensor, method: str) -> None:
    """Targets are finite floating 2-D (out, in) tensors; the message names the tensor."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"{method}: target {name!r} must be a floating-point tensor")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{method}: target {name!r} must be a non-empty 2-D (out, in) weight, "
                         f"got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{method}: target {name!r} has NaN/inf values")


def check_targets(targets: dict[str, torch.Tensor], spec: GridSpec, method: str) -> None:
    """``check_target`` for every target, and that the grid's grouping fits its shape."""
    for name, weight in targets.items():
        check_target(name, weight, method)
        try:
            spec.groups(weight.shape)
        except ValueError as error:
            raise ValueError(f"{method}: target {name!r}: {error}") from None


def mse_clip_params(weight: torch.Tensor, spec: GridSpec) -> GridParams:
    """Grid parameters after the GPTQ reference's MSE shrink search (see the module docstring)."""
    weight = weight.to(torch.float32)
    rows, columns = weight.shape
    per_row, width = spec.groups(weight.shape)
    # the search units: (units, groups per unit, entries per group)
    grouped = weight.reshape(1, 1, rows * columns) if spec.group_size == 0 else weight.reshape(rows, per_row, width)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    best = torch.full_like(low, float("inf"))
    best_scale, best_zero = torch.zeros_like(low), torch.zeros_like(low)
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        scale, zero = range_params(p * low, p * high, spec)
        s, z = scale.unsqueeze(2), zero.unsqueeze(2)
        error = (decode(encode(grouped, s, z, spec.qmax), s, z) - grouped).abs().pow(MSE_NORM).sum(dim=2)
        better = error < best          # strict: ties keep the larger range, as the reference does
        best = torch.where(better, error, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    if spec.group_size == 0:
        best_scale, best_zero = best_scale.expand(rows, 1), best_zero.expand(rows, 1)
    return GridParams(best_scale.contiguous(), best_zero.contiguous(), spec, width)


def rtn_tensor(weight: torch.Tensor, spec: GridSpec, mse_clip: bool = False, name: str = "tensor") -> QuantizedTensor:
    """RTN of one 2-D weight as a ``QuantizedTensor`` (decode ``affine``, codes int32, scale in the
    stored dtype, integer zero-points (int32) for ``asym``, implicit zero otherwise)."""
    check_target(name, weight, "rtn")
    weight = weight.detach().to(torch.float32)
    try:
        params = mse_clip_params(weight, spec) if mse_clip else fit(weight, spec)
    except ValueError as error:
        raise ValueError(f"rtn: target {name!r}: {error}") from None
    codes, _ = quantize(weight, params)
    scale, zero = params.scale, params.zero
    if spec.group_size == 0:  # one group for the whole tensor: store its parameters once
        scale, zero = scale[:1], zero[:1]
    asym = spec.implicit_zero is None
    return QuantizedTensor(
        codes=codes.cpu(), bits=spec.bits, scale=scale.to(SCALE_DTYPES[spec.scale_dtype]).cpu(),
        zero=zero.to(torch.int32).cpu() if asym else None,
        implicit_zero=None if asym else float(spec.implicit_zero), width=params.width, decode="affine",
        info={"method": "rtn", "scheme": spec.scheme, "group_size": spec.group_size,
              "scale_dtype": spec.scale_dtype, "mse_clip": bool(mse_clip)})


@register("quantize", "rtn", params=(
    Param("bits", int, 4, minimum=2, maximum=16, doc="code width b"),
    Param("scheme", str, "asym", choices=SCHEMES,
          doc="asym: Grid A min-max with a stored zero; sym-full: Grid S (2^b levels, s = 2A/(2^b-1)); "
              "sym-restricted: Grid R (2^b-1 levels, s = A/(2^(b-1)-1))"),
    Param("group_size", int, -1, minimum=-1,
          doc="-1 per output channel, 0 per tensor, g > 0 groups of g input columns (must divide the input size)"),
    Param("scale_dtype", str, "float16", choices=tuple(SCALE_DTYPES), doc="dtype the scales are stored in"),
    Param("mse_clip", bool, False,
          doc="GPTQ reference MSE clipping search (grid 100, maxshrink 0.8, norm 2.4) per group"),
), doc="Round-to-nearest on a uniform grid (GPTQ reference quant.py; per-channel asym = GPTQ README RTN)")
def rtn(targets: dict[str, torch.Tensor], *, context: QuantizeContext, bits: int = 4, scheme: str = "asym",
        group_size: int = -1, scale_dtype: str = "float16", mse_clip: bool = False) -> dict[str, QuantizedTensor]:
    spec = GridSpec(bits, scheme, group_size, scale_dtype)
    device = context.device if context is not None else "cpu"
    return {name: rtn_tensor(weight.to(device), spec, mse_clip, name) for name, weight in targets.items()}
