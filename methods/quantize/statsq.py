"""StatsQ and CGA from "Oscillation-free Quantization for Low-bit Vision Transformers" (Liu, Liu, Cheng;
ICML 2023; official code nbasyl/OFQ), spec quantization.md §3.

**StatsQ grid (§3.1, ``statsq.py::StatsQuantizer.forward``).** Per output row r of a 2-D (out, in) weight

    s_r = 2·mean_j |W_rj|                      (statistical, recomputed from W; no gradient through s)
    u   = clip(W / s, −1, 1 − 1e−6)            (clip at ±2·mean|w| whatever the bit width)
    k   = round(u·n − ½) ∈ {−n, …, n − 1},     n = 2^(b−1)
    ŵ   = s·(k + ½)/n

2^b symmetric mid-rise levels and **no zero level**: zeros (pruned entries) become ±s/2^b. Because the
clip is fixed, StatsQ is not the identity even at 16 bits (≈3.5% relative MSE on Gaussian weights,
≈11% of them clipped): expected behaviour of the grid, not a bug. It is a 2–3-bit QAT grid and a poor
≥ 4-bit PTQ grid (§3.5).

- ``statsq`` (quantize family) is the grid as post-training RTN: a ``QuantizedTensor`` with decode
  ``midrise``, codes k + n ∈ [0, 2^b) and one scale per row stored in ``scale_dtype`` (rounded before the
  codes are computed, so the record reproduces ŵ exactly; ``float32`` reproduces the official values).
- ``statsq_fake_quant`` is the straight-through estimator used in QAT: forward ŵ, backward the identity
  (every entry, clipped ones included; s is computed from the detached weight, so nothing reaches it).
  The official code writes ŵ.detach() − W.detach() + W, whose forward value can differ from ŵ by a
  rounding; a custom autograd function returns ŵ exactly with the same gradient.
- ``statsq-qat`` (finetune family) fine-tunes with StatsQ fake-quantized weights: ``prepare_model``
  parametrizes every ``nn.Linear`` inside the transformer blocks (module names containing
  ``.layer.N.`` (BERT) or ``.layers.N.`` (Llama), the same ``apply.BLOCK_PATH`` rule that picks the PTQ
  targets); embeddings, heads, poolers and norms stay float, the spec's convention for language models
  (OFQ keeps its ViT patch embedding and head at 8 bits instead).
  ``finalize_model`` removes the parametrization, so the saved checkpoint holds the latent float
  weights; a later ``statsq`` PTQ step quantizes them to exactly the forward ŵ (float32 scale).
  Activations are not quantized (weight-only benchmark; OFQ's LSQ activation quantizers are out of scope).

**CGA (§3.3, ``cga.py``).** With ``cga_steps`` = T > 0 the last T optimizer steps anneal: before each of
them, per quantized weight, the pre-round value v = clip(W/s)·n − ½ is computed and the weight stays
trainable only if v − i ∈ [½ − BR, ½ + BR] for an integer i with min(round v) ≤ i < max(round v) (the
official loop over ``np.arange(min, max)`` of the tensor's rounded values); all other entries are frozen:
their gradient is zeroed as soon as it is accumulated (before gradient clipping, as in the official loop)
and again before the step, and their values are copied back after ``AdamW.step`` so that decoupled weight
decay and momentum cannot move them. The mask is recomputed every step. The official recipe runs CGA as
a separate phase after QAT at the cool-down learning rate; here it is the tail of one run, under the
training loop's own schedule.

**QKR** (query–key reparameterization, §3.4) is out of scope: Llama-family decoders apply RoPE between
W_q and W_k, so no position-independent W_qk exists (§3.5), and the weight-only benchmark does not
quantize attention products.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils import parametrize

from methods.finetune.loop import param_groups
from methods.quantize.apply import BLOCK_PATH
from methods.quantize.common import QuantizeContext, QuantizedTensor
from methods.quantize.grids import SCALE_DTYPES
from methods.quantize.rtn import check_target
from methods.registry import Param, register
from methods.tasks import TaskSpec

CLIP_LOW, CLIP_HIGH = -1.0, 1.0 - 1e-6   # clip_val = 2 (fixed) ⇒ [−clip/2, clip/2 − 1e−6]


def _check_bits(bits: int, where: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{where} must be an integer in [2, 16] for StatsQ, got {bits!r}")
    return bits


def statsq_scale(weight: torch.Tensor) -> torch.Tensor:
    """s_r = 2·mean_j |W_rj| of a 2-D weight, float32 (rows, 1), detached."""
    if weight.dim() != 2:
        raise ValueError(f"StatsQ quantizes 2-D (out, in) weights, got shape {tuple(weight.shape)}")
    return 2 * torch.mean(weight.detach().to(torch.float32).abs(), dim=1, keepdim=True)


def _clipped(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """u = clip(W/s, −1, 1 − 1e−6) in float32; an all-zero row (s = 0) gives u = 0 instead of 0/0."""
    weight = weight.detach().to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.where(scale > 0, weight / safe, torch.zeros_like(weight))
    return torch.clamp(u, min=CLIP_LOW, max=CLIP_HIGH)


def statsq_levels(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """k = round(u·n − ½) ∈ [−n, n − 1] (float32 holding integers). The clamp is a no-op for b ≥ 2
    (round half to even sends u = −1 to −n); it guards the grid's bounds anyway."""
    n = float(2 ** (_check_bits(bits) - 1))
    k = torch.round(_clipped(weight, scale) * n - 0.5)
    return torch.clamp(k, -n, n - 1)


def statsq_decode(levels: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """ŵ = s·((k + ½)/n): the official operation order. Dividing by n = 2^(b−1) is exact, so this equals
    ``QuantizedTensor.dequantize``'s s·(k + ½)/n bit for bit."""
    n = float(2 ** (bits - 1))
    return scale * ((levels + 0.5) / n)


def statsq_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The StatsQ dequantized weight ŵ (float32), scale from the weight itself (float32, not rounded)."""
    scale = statsq_scale(weight)
    return statsq_decode(statsq_levels(weight, scale, bits), scale, bits)


class _StatsQSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:
        return statsq_quantize(weight, bits).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None   # ∂ŵ/∂W = I everywhere (clipped entries too); s gets nothing


def statsq_fake_quant(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """StatsQ straight-through fake quantization: forward ŵ, backward identity."""
    return _StatsQSTE.apply(weight, _check_bits(bits))


class StatsQWeight(torch.nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: the module's weight reads as ŵ = StatsQ(W)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = _check_bits(bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_fake_quant(weight, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


# ----------------------------------------------------------------------------------------- PTQ method

def statsq_tensor(weight: torch.Tensor, bits: int, scale_dtype: str = "float16",
                  name: str = "tensor") -> QuantizedTensor:
    """StatsQ of one 2-D weight as a ``QuantizedTensor`` (decode ``midrise``, codes k + n, int32)."""
    check_target(name, weight, "statsq")
    bits = _check_bits(bits, f"statsq: bits (target {name!r})")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"statsq: scale_dtype {scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
    weight = weight.detach().to(torch.float32)
    stored = statsq_scale(weight).to(SCALE_DTYPES[scale_dtype])
    if not torch.isfinite(stored).all():
        raise ValueError(f"statsq: target {name!r}: 2·mean|w| of some row overflows scale_dtype {scale_dtype}")
    scale = stored.to(torch.float32)   # codes from the stored scale, so (codes, scale) reproduce ŵ exactly
    n = 2 ** (bits - 1)
    codes = (statsq_levels(weight, scale, bits) + n).to(torch.int32)
    return QuantizedTensor(codes=codes.cpu(), bits=bits, scale=stored.cpu(), zero=None, implicit_zero=None,
                           width=weight.shape[1], decode="midrise",
                           info={"method": "statsq", "scale_dtype": scale_dtype})


@register("quantize", "statsq", params=(
    Param("bits", int, 4, minimum=2, maximum=16, doc="code width b (2^b mid-rise levels, no zero level)"),
    Param("scale_dtype", str, "float16", choices=tuple(SCALE_DTYPES), doc="dtype of the per-row scale 2*mean|w|"),
), doc="StatsQ grid as PTQ (OFQ, Liu et al. 2023): per-row s = 2*mean|w|, clip [-1, 1), levels s(k+1/2)/2^(b-1)")
def statsq(targets: dict[str, torch.Tensor], *, context: QuantizeContext, bits: int = 4,
           scale_dtype: str = "float16") -> dict[str, QuantizedTensor]:
    device = context.device if context is not None else "cpu"
    return {name: statsq_tensor(weight.to(device), bits, scale_dtype, name) for name, weight in targets.items()}


# ----------------------------------------------------------------------------------------- CGA

def cga_trainable_mask(weight: torch.Tensor, bits: int, boundary_range: float) -> torch.Tensor:
    """Boolean mask of the low-confidence entries CGA keeps trainable (``cga.py::
    freeze_outside_boundary_weight_idx`` negated): v − i ∈ [½ − BR, ½ + BR] for an integer i with
    min(round v) ≤ i < max(round v), v = clip(W/s)·n − ½. All-zero rows (s = 0) are frozen, as the
    official 0/0 = NaN comparisons make them."""
    bits = _check_bits(bits)
    if not 0.0 <= boundary_range < 0.5:
        raise ValueError(f"boundary_range must be in [0, 0.5), got {boundary_range!r}")
    scale = statsq_scale(weight)
    n = float(2 ** (bits - 1))
    pre = _clipped(weight, scale) * n - 0.5
    rounded = torch.round(pre)
    lowest, highest = rounded.min(), rounded.max()
    boundary = torch.round(pre - 0.5)    # the i whose boundary i + ½ is nearest to v
    offset = pre - boundary
    return ((offset <= 0.5 + boundary_range) & (offset >= 0.5 - boundary_range)
            & (boundary >= lowest) & (boundary < highest) & (scale > 0))


class CGAAdamW(torch.optim.AdamW):
    """AdamW whose steps from ``cga_start`` on apply confidence-guided annealing to the StatsQ latent
    weights in ``quantized`` (pairs of parameter and bit width): frozen entries get a zero gradient (a
    post-accumulate-grad hook, so gradient clipping already sees the zeros; and again in ``step``) and
    their exact values back after the AdamW update. ``cga_start=None`` is plain AdamW."""

    def __init__(self, params, *, quantized: list[tuple[torch.nn.Parameter, int]], boundary_range: float,
                 cga_start: int | None, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        if not 0.0 <= boundary_range < 0.5:
            raise ValueError(f"boundary_range must be in [0, 0.5), got {boundary_range!r}")
        self.quantized = [(p, _check_bits(bits)) for p, bits in quantized]
        self.boundary_range = boundary_range
        self.cga_start = cga_start
        self.steps_done = 0
        self._hooks = []
        if cga_start is not None:
            ref = weakref.ref(self)
            for p, bits in self.quantized:
                self._hooks.append(p.register_post_accumulate_grad_hook(_zero_frozen_grad_hook(ref, bits)))

    def cga_active(self) -> bool:
        """Whether the next step anneals."""
        return self.cga_start is not None and self.steps_done >= self.cga_start

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen = []
        if self.cga_active():
            with torch.no_grad():
                for p, bits in self.quantized:
                    if p.grad is None:
                        continue
                    mask = ~cga_trainable_mask(p, bits, self.boundary_range)
                    p.grad.masked_fill_(mask, 0.0)
                    frozen.append((p, mask, p.detach().clone()))
        super().step()
        with torch.no_grad():
            for p, mask, before in frozen:
                p.copy_(torch.where(mask, before, p))
        self.steps_done += 1
        return loss


def _zero_frozen_grad_hook(optimizer_ref, bits: int):
    def hook(param: torch.Tensor) -> None:
        optimizer = optimizer_ref()   # weak: a finished optimizer leaves a no-op hook behind
        if optimizer is not None and optimizer.cga_active() and param.grad is not None:
            with torch.no_grad():
                param.grad.masked_fill_(~cga_trainable_mask(param, bits, optimizer.boundary_range), 0.0)
    return hook


# ----------------------------------------------------------------------------------------- QAT method

def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside transformer blocks (never embeddings, heads, norms)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and BLOCK_PATH.search(name)]


def statsq_parametrized(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, bits) of every module whose weight carries a StatsQ parametrization."""
    found = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, StatsQWeight):
                    found.append((name, module, p.bits))
    return found


def prepare_statsq_model(model: torch.nn.Module, spec: TaskSpec | None, params: dict) -> torch.nn.Module:
    """Make every block Linear weight read as its StatsQ fake-quantized value at ``params['bits']``."""
    bits = _check_bits(params["bits"], "statsq-qat: bits")
    names = block_linear_names(model)
    if not names:
        raise ValueError("statsq-qat: the model has no nn.Linear inside transformer blocks "
                         f"(module paths matching {BLOCK_PATH.pattern!r})")
    if statsq_parametrized(model):
        raise ValueError("statsq-qat: the model already carries StatsQ parametrizations")
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", StatsQWeight(bits))
    return model


def finalize_statsq_model(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the StatsQ parametrizations: each weight becomes its latent float tensor again (same
    parameter names as before ``prepare``)."""
    for _, module, _ in statsq_parametrized(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model


@register("finetune", "statsq-qat", params=(
    Param("bits", int, 4, minimum=2, maximum=16, doc="StatsQ weight bits in the forward pass"),
    Param("cga_steps", int, 0, minimum=0,
          doc="confidence-guided annealing for the last cga_steps optimizer steps (0 = off)"),
    Param("boundary_range", float, 0.005, minimum=0.0, maximum=0.5,
          doc="CGA boundary range BR (< 0.5): entries within BR of a rounding boundary stay trainable"),
    Param("beta1", float, 0.9, minimum=0.0, maximum=1.0),
    Param("beta2", float, 0.999, minimum=0.0, maximum=1.0),
    Param("eps", float, 1e-8, minimum=0.0),
), doc="StatsQ quantization-aware fine-tuning (OFQ, Liu et al. 2023) with AdamW and optional CGA; "
       "saves the latent float weights (quantize them with the statsq method)",
    hooks={"prepare_model": prepare_statsq_model, "finalize_model": finalize_statsq_model})
def statsq_qat(model: torch.nn.Module, *, lr: float, weight_decay: float, bits: int = 4, cga_steps: int = 0,
               boundary_range: float = 0.005, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               total_steps: int | None = None) -> CGAAdamW:
    """The optimizer of a StatsQ QAT run (the model must have been through ``prepare_model``).
    ``total_steps`` (passed by the fine-tuning driver) places the CGA phase at the end of training."""
    quantized = [(module.parametrizations["weight"].original, qbits) for _, module, qbits in statsq_parametrized(model)]
    if not quantized:
        raise ValueError("statsq-qat: the model has no StatsQ-parametrized weights; run its prepare_model hook first")
    if any(qbits != bits for _, qbits in quantized):
        raise ValueError(f"statsq-qat: bits={bits} differs from the bits the model was prepared with")
    if not 0.0 <= boundary_range < 0.5:
        raise ValueError(f"statsq-qat: boundary_range must be in [0, 0.5), got {boundary_range!r}")
    cga_start = None
    if cga_steps:
        if total_steps is None:
            raise ValueError("statsq-qat: cga_steps > 0 needs total_steps (the number of training steps)")
        if cga_steps > total_steps:
            raise ValueError(f"statsq-qat: cga_steps={cga_steps} exceeds the {total_steps} training steps")
        cga_start = total_steps - cga_steps
    return CGAAdamW(param_groups(model, weight_decay), quantized=quantized, boundary_range=boundary_range,
                    cga_start=cga_start, lr=lr, betas=(beta1, beta2), eps=eps)
