"""DiscQuant rounding (Chee et al., arXiv 2501.06417, COLT 2025; spec quantization.md §5).

DiscQuant does not choose a grid, only how each weight is *rounded* onto a fixed one. Every weight w
lies between two neighbouring grid points, down(w) and up(w) (Δ = up − down, one grid step, or 0
where w is on the grid or clipped beyond its range). A variable x ∈ [0, 1] per weight interpolates,
W(x) = down + x·Δ, and y = (w − down)/Δ is the x that reproduces w (y = ½ where Δ = 0: those
weights are fixed and get no gradient). All targets are trained *jointly on the full model*, as in
the official ``discq.py``:

    F(x) = ρ·KL(p_orig ‖ p_x)/δ² − ⟨2y − 1, x⟩,     δ² = mean over layers of 12·mean((RTN(W) − W)²)
    x.grad ← −(2y − 1) + clamp(ρ·∇ₓ[KL/δ²], −c, c)       (per-coordinate clip of the KL part only)
    AdamW step, cosine schedule, then x ← clamp(x, 0, 1)   (projection onto the cube)
    final x̂ = round(x) (half to even), codes = code(down) + x̂·(code(up) − code(down))

On vertices ⟨1 − 2y, x⟩ + ||y||² = ||x − y||², so the linear term is the squared rounding error in
grid-step units: alone it drives x to round(y) (RTN), while the KL term keeps the rounded model's
output distribution close to the original's. δ² ≈ the mean squared grid step (12·Var of a uniform
rounding error), which makes ρ comparable across models and bit widths.

Reproduced from the official code (jerry-chee/DiscQuant @b1db18b, ``linearutils.py``, ``discq.py``):
the Grid S default (GPTQ ``Quantizer`` with ``sym=True``: s = 2·max|w|/(2^b − 1), z = 2^(b−1));
y = ½ where up == down; δ² from the greedy (RTN) rounding of each wrapped layer; the gradient
rule above; ``torch.optim.AdamW(lr, betas=(0.9, 0.999))`` with torch's default weight_decay = 0.01
left active (it pulls x slightly toward 0, i.e. round-down; replicated for parity);
``transformers.get_cosine_schedule_with_warmup``; projection after every step; the KL(orig ‖ quant)
of the next-token distributions averaged over tokens; the final (not best) iterate; ``init=rand``
(x ~ U[0,1], the official default) and ``init=orig`` (x = y). Defaults: ρ = 200 and clamp 1.0 / lr
0.05 as in the README tables; ``warmup_steps`` 0 because our step counts are small (official: 128
warm-up steps of 1024).

Adaptations (deliberate, documented):
- Any uniform grid of ``grids.py`` may be chosen (``scheme``); the grid is fitted to the *target*
  (the weight, or the delta when ``context.offsets`` is set, whose model weight is offset + W(x)).
  The original model is the one with the unquantized targets substituted (offset + target), so
  x = y reproduces it exactly and KL = 0 there.
- y is computed in code units, y = w/s − ⌊w/s⌋, not as (w − down)/Δ in weight units: the two are
  equal in exact arithmetic, and the code-unit form makes round(y) agree with ``grids.rtn`` on every
  entry except exact ties (RTN rounds half to even, x̂ = round(½) = 0 rounds them down).
- ``init=rtn`` (x = round(y)) is an extra start; rand draws come from a CPU generator seeded by
  (seed, tensor name), so the start does not depend on the device or on the other targets.
- x and all arithmetic are float32 (official: the model dtype, bf16 by default); log-probabilities
  come from ``log_softmax`` instead of log(p + 1e−10) (identical up to that 1e−10 floor).
- One optimizer step uses one calibration batch (official: ``grad_accum`` windows of 2048 tokens);
  batches are cycled in order. Tokens with attention_mask 0 are left out of the token average.
- Encoder classifiers have no next-token distribution: their KL is over the classifier's label
  distribution, averaged over examples (any model whose logits are (batch, classes)). Models with
  (batch, sequence, vocabulary) logits use every non-padding position.
- Reference distributions are computed under no_grad once per batch and cached while batches are
  reused (steps > number of batches).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from torch.func import functional_call
from tqdm.auto import tqdm

from methods.finetune.batching import batch_to
from methods.quantize.common import QuantizeContext, QuantizedTensor, linear_of
from methods.quantize.grids import SCALE_DTYPES, SCHEMES, GridParams, GridSpec, fit, quantize
from methods.quantize.rtn import check_targets
from methods.registry import Param, register
from methods.seeding import cpu_generator

INITS = ("rand", "orig", "rtn")
WEIGHT_DECAY = 0.01   # torch.optim.AdamW's default, left active by the official code
BETAS = (0.9, 0.999)


@dataclass
class RoundingTarget:
    """The two grid neighbours of one target tensor (all float32, shape of the target, one device)."""
    name: str
    params: GridParams
    scale: torch.Tensor      # per entry
    zero: torch.Tensor       # per entry
    down: torch.Tensor       # integer code of down(w)
    step: torch.Tensor       # code(up) − code(down) ∈ {0, 1}
    y: torch.Tensor          # x that reproduces w; ½ where step == 0
    target: torch.Tensor     # the unquantized target
    offset: torch.Tensor | None

    @classmethod
    def build(cls, name: str, target: torch.Tensor, spec: GridSpec, offset: torch.Tensor | None) -> "RoundingTarget":
        target = target.to(torch.float32)
        params = fit(target, spec)
        scale, zero = params.per_column()
        units = target / scale
        floor = torch.floor(units)
        down = torch.clamp(floor + zero, 0, spec.qmax)
        up = torch.clamp(torch.ceil(units) + zero, 0, spec.qmax)
        step = up - down                       # 1 in range, 0 on the grid or clipped beyond it
        y = torch.where(step > 0, units - floor, torch.full_like(units, 0.5))
        return cls(name, params, scale, zero, down, step, y, target, offset)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """W(x) = down + x·Δ (the target, not yet offset)."""
        return self.scale * (self.down - self.zero + x * self.step)

    def effective(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.offset is None else self.offset + value

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x rounded half to even."""
        return self.down + torch.round(x) * self.step

    def rtn_codes(self) -> torch.Tensor:
        """The greedy rounding round(y) of the official code (``grids.rtn`` but for exact ties)."""
        return self.codes(self.y)


class DiscQuantRounding:
    """The DiscQuant problem on ``context.model``: targets, their grids, δ², the KL objective.

    The model is called as it is (device, mode); ``discquant`` prepares it (eval, no parameter
    gradients, ``context.device``)."""

    def __init__(self, targets: dict[str, torch.Tensor], context: QuantizeContext, spec: GridSpec):
        context.require_data("discquant")
        self.context, self.spec, self.model = context, spec, context.model
        self.device = next(self.model.parameters()).device
        self.targets: dict[str, RoundingTarget] = {}
        for name, target in targets.items():
            module = linear_of(self.model, name, "discquant")
            if tuple(target.shape) != tuple(module.weight.shape):
                raise ValueError(f"discquant: target {name!r} has shape {tuple(target.shape)}, the module weight "
                                 f"{tuple(module.weight.shape)}")
            if context.offsets is not None and name not in context.offsets:
                raise ValueError(f"discquant: target {name!r} has no offset (context.offsets is set)")
            offset = None if context.offsets is None else context.offsets[name].to(self.device, torch.float32)
            self.targets[name] = RoundingTarget.build(name, target.detach().to(self.device), spec, offset)
        # δ² = mean over layers of 12·mean((RTN(W) − W)²), the official avg_delta2
        per_layer = [12 * (t.value(torch.round(t.y)) - t.target).double().pow(2).mean()
                     for t in self.targets.values()]
        self.delta2 = float(torch.stack(per_layer).mean()) if per_layer else 0.0

    # -- variables ----------------------------------------------------------------------------------

    def init_x(self, init: str, seed: int) -> dict[str, torch.Tensor]:
        if init not in INITS:
            raise ValueError(f"discquant: init {init!r} is not one of {list(INITS)}")
        xs = {}
        for name, t in self.targets.items():
            if init == "rand":
                draw = torch.rand(t.y.shape, generator=cpu_generator("discquant-init", seed, name),
                                  dtype=torch.float32, device="cpu")
                xs[name] = draw.to(self.device)
            elif init == "orig":
                xs[name] = t.y.clone()
            else:
                xs[name] = torch.round(t.y)
        return xs

    def weights(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Effective module weights offset + W(x) of every target."""
        return {n: t.effective(t.value(xs[n])) for n, t in self.targets.items()}

    def original_weights(self) -> dict[str, torch.Tensor]:
        return {n: t.effective(t.target) for n, t in self.targets.items()}

    # -- objective ----------------------------------------------------------------------------------

    def log_probs(self, weights: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Log-probabilities (rows, classes) of the counted rows: non-padding positions of
        (batch, sequence, vocabulary) logits, every example of (batch, classes) logits."""
        batch = batch_to({k: v for k, v in batch.items() if k != "labels"}, self.device)
        output = functional_call(self.model, weights, args=(), kwargs=batch, strict=False)
        logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
        logits = logits.to(torch.float32)
        if logits.dim() == 3:
            mask = batch.get("attention_mask")
            logits = logits[mask.to(torch.bool)] if mask is not None else logits.reshape(-1, logits.shape[-1])
        elif logits.dim() != 2:
            raise ValueError(f"discquant: model logits of shape {tuple(logits.shape)} are neither "
                             "(batch, classes) nor (batch, sequence, vocabulary)")
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def reference(self, batch: dict) -> torch.Tensor:
        return self.log_probs(self.original_weights(), batch)

    def kl(self, xs: dict[str, torch.Tensor], batch: dict, reference: torch.Tensor | None = None) -> torch.Tensor:
        """KL(p_orig ‖ p_x), mean over counted rows (tokens or examples) of Σ_classes."""
        if reference is None:
            reference = self.reference(batch)
        current = self.log_probs(self.weights(xs), batch)
        return (reference.exp() * (reference - current)).sum(-1).mean()

    def calibration_kl(self, weights: dict[str, torch.Tensor]) -> float:
        """Mean over the calibration batches of KL(p_orig ‖ p_W) for given target values (not offset)."""
        effective = {n: t.effective(weights[n].to(self.device, torch.float32)) for n, t in self.targets.items()}
        with torch.no_grad():
            values = []
            for batch in self.context.batches:
                reference = self.reference(batch)
                values.append(float((reference.exp() * (reference - self.log_probs(effective, batch))).sum(-1).mean()))
        return sum(values) / len(values)

    def gradient(self, xs: dict[str, torch.Tensor], kl_grads: dict[str, torch.Tensor], rho: float,
                 clamp: float) -> dict[str, torch.Tensor]:
        """The official applied gradient −(2y − 1) + clamp(ρ·∇ₓ[KL/δ²], −c, c)."""
        return {n: -(2 * t.y - 1) + torch.clamp(rho * kl_grads[n], -clamp, clamp) for n, t in self.targets.items()}

    # -- optimisation -------------------------------------------------------------------------------

    def optimize(self, xs: dict[str, torch.Tensor], *, steps: int, lr: float, rho: float, clamp: float,
                 warmup_steps: int = 0, callback: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Projected AdamW on x; returns the final x and the KL of each step (before its update).
        ``callback(step, xs)`` runs after every projection. ρ = 0 skips the model passes."""
        names = list(self.targets)
        xs = {n: xs[n].detach().clone().to(self.device, torch.float32).requires_grad_(True) for n in names}
        if steps == 0 or not names:
            return {n: x.detach() for n, x in xs.items()}, []
        if self.delta2 == 0:
            # every target is on its grid: Δ = 0 everywhere, x has no effect
            return {n: x.detach() for n, x in xs.items()}, []
        optimizer = torch.optim.AdamW([xs[n] for n in names], lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                                 num_training_steps=steps)
        batches = self.context.batches
        cache: dict[int, torch.Tensor] | None = {} if steps > len(batches) else None
        history: list[float] = []
        with tqdm(range(steps), desc="discquant", mininterval=2.0) as bar:
            for step in bar:
                index = step % len(batches)
                if rho == 0:
                    kl_grads = {n: torch.zeros_like(xs[n]) for n in names}
                else:
                    reference = cache.get(index) if cache is not None else None
                    if reference is None:
                        reference = self.reference(batches[index])
                        if cache is not None:
                            cache[index] = reference
                    kl = self.kl(xs, batches[index], reference)
                    grads = torch.autograd.grad(kl / self.delta2, [xs[n] for n in names], allow_unused=True)
                    kl_grads = {n: g if g is not None else torch.zeros_like(xs[n]) for n, g in zip(names, grads)}
                    history.append(float(kl.detach()))
                    bar.set_postfix(kl=f"{history[-1]:.3g}", refresh=False)
                applied = self.gradient(xs, kl_grads, rho, clamp)
                for n in names:
                    xs[n].grad = applied[n]
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    for n in names:
                        xs[n].clamp_(0, 1)
                if callback is not None:
                    callback(step, {n: x.detach() for n, x in xs.items()})
        return {n: x.detach() for n, x in xs.items()}, history

    def records(self, xs: dict[str, torch.Tensor], info: dict) -> dict[str, QuantizedTensor]:
        """Round x half to even and store the codes on the same grid (affine decode, CPU tensors)."""
        spec = self.spec
        out = {}
        for name, t in self.targets.items():
            codes = t.codes(xs[name])
            if not bool(((codes == t.down) | (codes == t.down + t.step)).all()):
                raise AssertionError(f"discquant: a code of {name!r} is neither down(w) nor up(w)")
            if not bool(((codes >= 0) & (codes <= spec.qmax)).all()):
                raise AssertionError(f"discquant: a code of {name!r} lies outside [0, {spec.qmax}]")
            rtn_codes, _ = quantize(t.target, t.params)
            movable = t.step > 0
            fractional = ((xs[name] > 1e-2) & (xs[name] < 1 - 1e-2) & movable).sum()
            record = {**info, "agreement_with_rtn": float((codes.to(torch.int32) == rtn_codes).float().mean()),
                      "fractional_before_rounding": float(fractional) / max(int(movable.sum()), 1)}
            scale, zero = t.params.scale, t.params.zero
            if spec.group_size == 0:   # one group for the whole tensor: its parameters once, as rtn
                scale, zero = scale[:1], zero[:1]
            out[name] = QuantizedTensor(
                codes=codes.to(torch.int32).cpu(), bits=spec.bits,
                scale=scale.to(SCALE_DTYPES[spec.scale_dtype]).cpu(),
                zero=zero.to(torch.int32).cpu() if spec.implicit_zero is None else None,
                implicit_zero=None if spec.implicit_zero is None else float(spec.implicit_zero),
                width=t.params.width, decode="affine", info=record)
        return out


@contextlib.contextmanager
def prepared(model: torch.nn.Module, device: str | torch.device):
    """The model in eval mode (dropout off, as the official code), without parameter gradients, on
    ``device``; its device, mode and requires_grad flags are restored afterwards."""
    device = torch.device(device)
    first = next(model.parameters())
    original_device, was_training = first.device, model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    moved = original_device != device
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to(original_device)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _check(steps: int, lr: float, rho: float, clamp: float, warmup_steps: int, init: str) -> None:
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"discquant: steps must be an integer ≥ 0, got {steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= max(steps, 0):
        raise ValueError(f"discquant: warmup_steps must be an integer in [0, steps={steps}], got {warmup_steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"discquant: lr must be > 0, got {lr!r}")
    if not (isinstance(rho, (int, float)) and rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"discquant: rho must be ≥ 0, got {rho!r}")
    if not (isinstance(clamp, (int, float)) and clamp > 0 and math.isfinite(clamp)):
        raise ValueError(f"discquant: clamp must be > 0, got {clamp!r}")
    if init not in INITS:
        raise ValueError(f"discquant: init {init!r} is not one of {list(INITS)}")


@register("quantize", "discquant", params=(
    Param("bits", int, 4, minimum=1, maximum=16, doc="code bits b"),
    Param("scheme", str, "sym-full", choices=SCHEMES, doc="grid; sym-full (Grid S) is the official one"),
    Param("group_size", int, -1, minimum=-1, doc="-1 per output row, 0 per tensor, g > 0 per group of g inputs"),
    Param("scale_dtype", str, "float16", choices=tuple(SCALE_DTYPES), doc="dtype the scale is stored in"),
    Param("steps", int, 64, minimum=0, doc="optimizer steps (one calibration batch each, cycled)"),
    Param("lr", float, 0.05, minimum=0.0, doc="AdamW peak learning rate (README tables: 0.01-0.1)"),
    Param("rho", float, 200.0, minimum=0.0, doc="weight ρ of the KL term (official runs: 200)"),
    Param("clamp", float, 1.0, minimum=0.0, doc="per-coordinate clip c of the scaled KL gradient"),
    Param("warmup_steps", int, 0, minimum=0, doc="cosine-schedule warm-up steps (official: 128 of 1024)"),
    Param("init", str, "rand", choices=INITS, doc="rand: x ~ U[0,1] (official default); orig: x = y; rtn: round(y)"),
), doc="DiscQuant: KL-guided rounding on a fixed grid (Chee et al. 2025)")
def discquant(targets: dict[str, torch.Tensor], *, context: QuantizeContext, bits: int = 4,
              scheme: str = "sym-full", group_size: int = -1, scale_dtype: str = "float16", steps: int = 64,
              lr: float = 0.05, rho: float = 200.0, clamp: float = 1.0, warmup_steps: int = 0,
              init: str = "rand") -> dict[str, QuantizedTensor]:
    """Round every target onto its grid with DiscQuant; see the module docstring."""
    spec = GridSpec(bits, scheme, group_size, scale_dtype)
    _check(steps, lr, rho, clamp, warmup_steps, init)
    context.require_data("discquant")
    check_targets(targets, spec, "discquant")
    if not targets:
        return {}
    with prepared(context.model, context.device):
        problem = DiscQuantRounding(targets, context, spec)
        start = problem.init_x(init, context.seed)
        xs, history = problem.optimize(start, steps=steps, lr=lr, rho=rho, clamp=clamp, warmup_steps=warmup_steps)
        info = {"method": "discquant", "scheme": scheme, "init": init, "steps": steps, "lr": lr, "rho": rho,
                "clamp": clamp, "warmup_steps": warmup_steps, "weight_decay": WEIGHT_DECAY,
                "delta2": problem.delta2, "kl_first": history[0] if history else None,
                "kl_last": history[-1] if history else None}
        return problem.records(xs, info)
