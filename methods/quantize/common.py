"""What every quantizer returns and receives (the contract between methods, artifacts and the workflow).

A quantizer maps *targets* (float32 2-D weights, or deltas θ_ft − θ_base of them) to
``QuantizedTensor`` records: integer codes plus the per-group tensors needed to decode them. The
record, not the dequantized float, is the source of truth: the artifact stores it, exact bits per
parameter are counted from it, and evaluation decodes it. ``decode`` kinds:

- ``affine``: ŵ = s·(q − z), the uniform grids of ``grids.py`` (RTN, GPTQ, DiscQuant);
- ``power``: P̂ = s·(q − z) then ŵ = sign(P̂)·|P̂|^(1/a) (NUPES), exponent a in ``extras``;
- ``midrise``: ŵ = s·(q − n + ½)/n with n = 2^(b−1) (StatsQ; no zero level).

``g_idx`` (in ``extras``) maps each input column to its group when GPTQ's act-order forms groups
over permuted columns; otherwise column j belongs to group j // width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECODE_KINDS = ("affine", "power", "midrise")


@dataclass
class QuantizedTensor:
    codes: torch.Tensor                      # int32 (rows, cols), values in [0, 2^bits)
    bits: int
    scale: torch.Tensor                      # (rows, groups) in the stored dtype
    zero: torch.Tensor | None                # (rows, groups) integer zero-points, None when implicit
    implicit_zero: float | None              # the grid's fixed zero-point when ``zero`` is None
    width: int                               # input columns per group
    decode: str = "affine"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)   # g_idx, exponent, ...
    info: dict = field(default_factory=dict)                          # method record for the manifest

    def cpu(self) -> "QuantizedTensor":
        """The record with every tensor on the CPU (artifacts are written from there)."""
        move = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return QuantizedTensor(move(self.codes), self.bits, move(self.scale), move(self.zero), self.implicit_zero,
                               self.width, self.decode, {k: move(v) for k, v in self.extras.items()}, self.info)

    def group_index(self) -> torch.Tensor:
        """The group of every input column, on the codes' device."""
        if "g_idx" in self.extras:
            return self.extras["g_idx"].to(torch.long)
        return torch.arange(self.codes.shape[1], device=self.codes.device) // self.width

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (or delta) the codes stand for, on the codes' device."""
        index = self.group_index()
        scale = self.scale.to(torch.float32)[:, index]
        codes = self.codes.to(torch.float32)
        if self.decode == "midrise":
            half = 2 ** (self.bits - 1)
            return scale * (codes - half + 0.5) / half
        zero = (self.zero.to(torch.float32)[:, index] if self.zero is not None
                else torch.full_like(codes, float(self.implicit_zero)))
        value = scale * (codes - zero)
        if self.decode == "power":
            exponent = self.extras["exponent"].to(torch.float32)
            value = torch.sign(value) * value.abs() ** (1.0 / exponent)
        return value


@dataclass
class QuantizeContext:
    """What a quantizer may use besides the targets.

    ``model``: the fine-tuned task model (float32, eval mode) whose Linear weights the targets are,
    for data-driven methods; ``batches``: calibration inputs (dicts of model keyword arguments);
    ``offsets``: for delta quantization, the base tensor of each target (the model's effective weight
    is offset + dequantized target); ``seed``: for random initialisations; ``device``: where to compute."""
    model: torch.nn.Module | None = None
    batches: list[dict] | None = None
    offsets: dict[str, torch.Tensor] | None = None
    seed: int = 0
    device: str = "cpu"
    is_encoder: bool = True

    def effective(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The model weight for a target value (adds the base when quantizing deltas)."""
        if self.offsets is None:
            return value
        return self.offsets[name].to(value.device, torch.float32) + value

    def require_data(self, method: str) -> None:
        if self.model is None or not self.batches:
            raise ValueError(f"quantize method {method!r} needs the model and calibration batches")


def linear_of(model: torch.nn.Module, name: str, method: str) -> torch.nn.Linear:
    """The ``nn.Linear`` whose weight a target name (``<module>.weight``) denotes; errors name the method."""
    if not name.endswith(".weight"):
        raise ValueError(f"{method}: target {name!r} is not a '<module>.weight' name")
    try:
        module = model.get_submodule(name[: -len(".weight")])
    except AttributeError:
        raise ValueError(f"{method}: target {name!r}: the model has no module {name[:-len('.weight')]!r}") from None
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{method}: target {name!r} is not the weight of an nn.Linear ({type(module).__name__})")
    return module
