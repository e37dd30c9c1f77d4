"""Integer grids shared by every weight quantizer (spec quantization.md §0).

One representation covers the three uniform grids: integer codes ``q ∈ [0, qmax]`` per weight and,
per group, a scale ``s`` and an integer zero-point ``z``, with ``ŵ = s·(q − z)``:

- ``asym`` (Grid A, GPTQ reference ``sym=False``): range [min(0, min w), max(0, max w)],
  ``s = (xmax − xmin)/(2^b − 1)``, ``z = round(−xmin/s)``; an all-zero group gets [−1, 1] as in the
  reference. z is stored (b bits per group).
- ``sym-full`` (Grid S, GPTQ ``sym=True``, compressed-tensors, DiscQuant): ``s = 2·max|w|/(2^b − 1)``,
  implicit ``z = 2^(b−1)``; codes − z span {−2^(b−1), …, 2^(b−1) − 1}.
- ``sym-restricted`` (Grid R, int8 absmax, NUPES at exponent 1): ``s = max|w|/(2^(b−1) − 1)``,
  implicit ``z = 2^(b−1) − 1``, codes − z span {−(2^(b−1) − 1), …, 2^(b−1) − 1}.

Groups (``group_size``): ``-1`` per output row (per channel), ``0`` one group for the whole tensor,
``g > 0`` contiguous runs of g input columns of one row (g must divide the input size). Weights
are 2-D ``(out, in)``, the ``nn.Linear`` layout. Arithmetic is float32; ``torch.round`` rounds half
to even, so exact ties may differ from another implementation's rounding by one code.

``scale_dtype`` is the dtype the scale is stored in: the scale is rounded to it *before* codes are
computed, so the stored (codes, scale, zero) reproduce the dequantized weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.device import divide

SCHEMES = ("asym", "sym-full", "sym-restricted")
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class GridSpec:
    bits: int
    scheme: str = "asym"
    group_size: int = -1
    scale_dtype: str = "float16"

    def __post_init__(self):
        if not 1 <= self.bits <= 16 or (self.bits == 1 and self.scheme != "asym"):
            raise ValueError(f"bits must be in [2, 16] (1 only for asym), got {self.bits}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r} is not one of {list(SCHEMES)}")
        if self.group_size < -1:
            raise ValueError(f"group_size must be -1 (per channel), 0 (per tensor) or > 0, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype {self.scale_dtype!r} is not one of {list(SCALE_DTYPES)}")

    @property
    def qmax(self) -> int:
        """Largest integer code (codes run from 0)."""
        return 2 ** self.bits - 2 if self.scheme == "sym-restricted" else 2 ** self.bits - 1

    @property
    def implicit_zero(self) -> int | None:
        """The zero-point of the symmetric grids (not stored); None for asym (stored per group)."""
        if self.scheme == "sym-full":
            return 2 ** (self.bits - 1)
        if self.scheme == "sym-restricted":
            return 2 ** (self.bits - 1) - 1
        return None

    def groups(self, shape: torch.Size) -> tuple[int, int]:
        """(groups per row, columns per group) of a 2-D weight; per tensor counts as one group per row
        spanning the row, with the parameters shared by all rows (see ``fit``)."""
        if len(shape) != 2:
            raise ValueError(f"grids quantize 2-D (out, in) weights, got shape {tuple(shape)}")
        columns = shape[1]
        if self.group_size in (-1, 0):
            return 1, columns
        if columns % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the input size {columns}")
        return columns // self.group_size, self.group_size


@dataclass
class GridParams:
    """Per-group scale and zero-point, both float32 tensors of shape (rows, groups per row), and the
    number of input columns each group covers."""
    scale: torch.Tensor
    zero: torch.Tensor
    spec: GridSpec
    width: int

    def per_column(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) expanded to one value per weight entry."""
        return expand(self.scale, self.width), expand(self.zero, self.width)


def range_params(low: torch.Tensor, high: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups with minimum ``low`` and maximum ``high`` (float32 tensors of one shape)."""
    low, high = low.to(torch.float32), high.to(torch.float32)
    if spec.scheme == "asym":
        low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
        empty = (low == 0) & (high == 0)
        low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
        scale = _stored(divide(high - low, float(spec.qmax)), spec)
        # The stored scale may round below (high − low)/qmax; at ≥ 12 bits with a float16 scale −low/s
        # then exceeds qmax, and the zero-point would not fit in the b bits it is stored in. Clamping
        # keeps 0 exactly representable (z is an integer code) at the cost of clipping the extreme
        # weight by at most the scale's rounding error.
        zero = torch.clamp(torch.round(-low / scale), 0, spec.qmax)
        return scale, zero
    absmax = torch.maximum(low.abs(), high.abs())
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    levels = (2 ** spec.bits - 1) / 2 if spec.scheme == "sym-full" else 2 ** (spec.bits - 1) - 1
    scale = _stored(divide(absmax, float(levels)), spec)
    return scale, torch.full_like(scale, float(spec.implicit_zero))


def _stored(scale: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """The scale as it will be stored, back in float32 (never 0: a tiny range still divides)."""
    stored = scale.to(SCALE_DTYPES[spec.scale_dtype]).to(torch.float32)
    tiny = torch.finfo(SCALE_DTYPES[spec.scale_dtype]).tiny
    return torch.clamp(stored, min=tiny)


def fit(weight: torch.Tensor, spec: GridSpec) -> GridParams:
    """Min-max grid parameters of every group of a 2-D weight."""
    weight = weight.to(torch.float32)
    rows, columns = weight.shape
    per_row, width = spec.groups(weight.shape)
    grouped = weight.reshape(rows, per_row, width)
    if spec.group_size == 0:
        low = grouped.amin().expand(rows, per_row)
        high = grouped.amax().expand(rows, per_row)
    else:
        low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    scale, zero = range_params(low, high, spec)
    return GridParams(scale.contiguous(), zero.contiguous(), spec, width)


def expand(values: torch.Tensor, width: int) -> torch.Tensor:
    """Per-group values (rows, groups) repeated to per-column values (rows, groups·width)."""
    return values.repeat_interleave(width, dim=1)


def encode(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes (float32 holding integers) of weights under per-entry-broadcastable (scale, zero)."""
    return torch.clamp(torch.round(weight.to(torch.float32) / scale) + zero, 0, qmax)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def quantize(weight: torch.Tensor, params: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as int32, dequantized float32 weight) of a 2-D weight on fitted parameters."""
    scale, zero = params.per_column()
    codes = encode(weight, scale, zero, params.spec.qmax)
    return codes.to(torch.int32), decode(codes, scale, zero)


def rtn(weight: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor, GridParams]:
    """Round-to-nearest: (codes, dequantized weight, parameters)."""
    params = fit(weight, spec)
    codes, dequantized = quantize(weight, params)
    return codes, dequantized, params
