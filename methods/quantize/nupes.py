"""NUPES-style power-exponent quantization (Yvinec, Dapogny, Bailly, arXiv 2308.05600; spec quantization.md §4).

What is verified and what is reconstructed. NUPES has no public code and its method section could
not be read, so this module is a *benchmark re-implementation*, labelled "NUPES-style":

- Verified from the abstract [abs]: the quantizer is built from power functions (automorphisms of
  (R*₊, ×)); the exponent is optimised (data-free and data-driven settings); the data-driven variant
  learns "new quantized weights over the entire quantized space" rather than up/down rounding, and
  learns the exponent jointly. PowerQuant (the precursor) picks the exponent by minimising the
  per-layer reconstruction error, and for Gaussian-like weights that minimum lies at a < 1.
- Reconstructed [infer/unverified]: the exact normalisation (symmetric *restricted* grid on the
  powered weights with an absmax scale per output row, per group or per tensor), the exponent search
  (coarse grid over [0.2, 1.5] plus bounded Brent refinement), and everything about the data-driven
  optimisation (latent weights with a straight-through round, bounded exponent parameterisation,
  layer-output reconstruction loss, Adam, steps, learning rate, calibration size).

The quantizer (``power_quantize``)::

    P = sign(W)·|W|^a                      a > 0
    s = max|P| / (2^(b−1) − 1)             per group (Grid R on P, scale rounded to scale_dtype)
    q = clamp(round(P/s), ±(2^(b−1) − 1))  stored as Grid R codes q + 2^(b−1) − 1
    Ŵ = sign(P̂)·|P̂|^(1/a),  P̂ = s·q

At a = 1 this *is* Grid R round-to-nearest (``grids.rtn`` with scheme ``sym-restricted``), bit for
bit. For a < 1 the levels M·(k/L)^(1/a) are dense near 0 and sparse in the tails, which suits
bell-shaped weights. 0 maps to 0 (pruned delta entries stay zero) and the map is odd. The stored
record decodes with kind ``power`` and ``extras["exponent"]`` (a float32 scalar per layer); the
exponent is rounded to float32 *before* quantizing so the record reproduces Ŵ exactly.

Data-free mode: a* = argmin_a ||W − Ŵ_a||² per layer (or of the sum over layers for one global a).
The error curve is piecewise smooth but rugged (rounding flips make small jumps) and was seen to be
non-unimodal on heavy-tailed weights, so no convexity is assumed: a coarse grid over [0.2, 1.5]
(step 0.05, a = 1 included) first; then, around each of its 3 lowest local minima, a 5× finer scan
of the bracket and bounded Brent (golden section + parabolic steps) between the neighbours of the
best fine point. The best value ever evaluated wins, hence err(a*) ≤ err(1).

Data-driven mode ("NUPES-style", reconstructed): per layer, latent weights V (initialised to the
target W) and an exponent a = 0.1 + 1.9·sigmoid(θ) ∈ (0.1, 2) (initialised at the data-free a*)
are trained with Adam on the layer's output reconstruction error ||X Ŵᵀ − X Wᵀ||² / ||X Wᵀ||²
(relative, so that layers weigh alike under a global exponent), X being the layer's inputs in the
unquantized model on the calibration batches (tokens with attention_mask 0 excluded). The forward is

    codes  = round(P(V)/s)                  (no gradient: integers)
    Ŵ      = sign(q)·(s_a·|q|)^(1/a) + (V − V.detach())

The second term is the straight-through estimator: ∂Ŵ/∂V = I, so V can drift to *any* of the levels,
not only the two neighbours of W. Adam runs on U = V/M (M: the group absmax of W), so ``lr`` is in
units of the group's range: the same setting suits weights and fine-tuning deltas 100× smaller
(in raw-weight units, lr = 1e−3 on a tiny Llama with weights of std 0.02 left every iterate worse
than the start); θ takes the same lr. The learning rate follows a cosine decay to 0 over ``steps``,
which lets the codes settle. The exponent gets the gradient of the level positions
s_a^(1/a)·|q|^(1/a) = M·(|q|/L)^(1/a) at fixed codes (s_a = M^a/L keeps its dependence on a; M is the
detached group absmax), which is how moving a moves the grid. |x| is clamped to ≥ 1e−8 inside every
pow/log so that 0^(1/a) and ln 0 never appear. Since ||X E||² = tr(E XᵀX Eᵀ), the loss uses the
float64-accumulated Gram matrix XᵀX/N, so any number of calibration tokens costs in² memory. Pure
straight-through training keeps wandering (the gradient at the quantized point never vanishes), so
the returned state is the lowest-loss one among the data-free start and all iterates (a safeguard:
the data-driven result is never worse than the data-free one on the calibration objective).
There are no random draws: the result is deterministic for fixed inputs (CPU, float32).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from methods.finetune.batching import batch_to
from methods.quantize.common import QuantizeContext, QuantizedTensor, linear_of
from methods.quantize.grids import SCALE_DTYPES, GridParams, GridSpec, _stored, fit, quantize
from methods.quantize.rtn import check_targets
from methods.registry import Param, register

SEARCH_BOUNDS = (0.2, 1.5)      # coarse grid of the data-free search
SEARCH_STEP = 0.05
REFINE_MINIMA = 3               # refinements around the best local minima of the coarse grid
FINE_FACTOR = 5                 # a refinement first scans its bracket at step / FINE_FACTOR
A_MIN, A_MAX = 0.1, 2.0         # range of the learned exponent
EPS = 1e-8                      # |x| floor inside pow and log
MODES = ("data-free", "data-driven")
SCOPES = ("layer", "global")


# --------------------------------------------------------------------------------------------------
# The power quantizer


def power_spec(bits: int, group_size: int = -1, scale_dtype: str = "float16") -> GridSpec:
    """The Grid R spec the powered weights are coded on."""
    return GridSpec(bits, "sym-restricted", group_size, scale_dtype)


def _exponent(exponent: float | torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(exponent, dtype=torch.float32, device="cpu").detach().reshape(())
    if not bool(torch.isfinite(a)) or float(a) <= 0:
        raise ValueError(f"exponent must be a finite number > 0, got {float(a)}")
    return a


def power_quantize(weight: torch.Tensor, exponent: float | torch.Tensor, spec: GridSpec,
                   ) -> tuple[torch.Tensor, torch.Tensor, GridParams]:
    """(codes int32, dequantized float32 weight, Grid R parameters of P) of a 2-D weight at exponent a.

    The exponent is used as float32 (what the record stores); ``spec`` must be ``sym-restricted``."""
    if spec.scheme != "sym-restricted":
        raise ValueError(f"the power quantizer codes on the sym-restricted grid, got scheme {spec.scheme!r}")
    a = _exponent(exponent).to(weight.device)
    weight = weight.to(torch.float32)
    powered = torch.sign(weight) * weight.abs().pow(a)
    params = fit(powered, spec)
    codes, p_hat = quantize(powered, params)
    return codes, torch.sign(p_hat) * p_hat.abs().pow(1.0 / a), params


def power_error(weight: torch.Tensor, exponent: float | torch.Tensor, spec: GridSpec) -> float:
    """||W − Ŵ_a||² (float64 sum)."""
    _, dequantized, _ = power_quantize(weight, exponent, spec)
    return float((dequantized - weight.to(torch.float32)).to(torch.float64).pow(2).sum())


def power_record(codes: torch.Tensor, params: GridParams, exponent: float | torch.Tensor,
                 info: dict | None = None) -> QuantizedTensor:
    """The stored form: Grid R codes and scale, decode ``power`` with the float32 exponent (CPU tensors)."""
    spec = params.spec
    scale = params.scale[:1] if spec.group_size == 0 else params.scale   # per tensor: one scale, as rtn
    return QuantizedTensor(
        codes=codes.to(torch.int32).cpu(), bits=spec.bits,
        scale=scale.to(SCALE_DTYPES[spec.scale_dtype]).cpu(), zero=None,
        implicit_zero=float(spec.implicit_zero), width=params.width, decode="power",
        extras={"exponent": _exponent(exponent).clone()}, info=dict(info or {}))


# --------------------------------------------------------------------------------------------------
# Data-free exponent search


def coarse_grid(bounds: tuple[float, float] = SEARCH_BOUNDS, step: float = SEARCH_STEP) -> np.ndarray:
    count = int(round((bounds[1] - bounds[0]) / step)) + 1
    return np.round(np.linspace(bounds[0], bounds[1], count), 6)


def _local_minima(errors: np.ndarray) -> list[int]:
    """Indices of the grid's local minima (plateaus and ends included), lowest error first."""
    last = len(errors) - 1
    minima = [i for i in range(len(errors))
              if (i == 0 or errors[i] <= errors[i - 1]) and (i == last or errors[i] <= errors[i + 1])]
    return sorted(minima, key=lambda i: errors[i])


def search_exponent(weights: list[torch.Tensor], spec: GridSpec,
                    bounds: tuple[float, float] = SEARCH_BOUNDS, step: float = SEARCH_STEP,
                    refine: int = REFINE_MINIMA) -> tuple[float, dict]:
    """a* = argmin_a Σ_layers ||W − Ŵ_a||² over ``bounds`` (one a for all the given weights).

    Coarse grid first, then bounded Brent (golden section + parabolic steps) inside the bracket of
    each of the ``refine`` lowest local minima of the grid; no unimodality is assumed beyond a grid
    cell. Returns (a* as a float32-representable float, {"error": err(a*), "error_at_1": err(1),
    "evaluations": n})."""
    if not weights:
        raise ValueError("search_exponent needs at least one weight")
    cache: dict[float, float] = {}

    def objective(a: float) -> float:
        a32 = float(np.float32(a))
        if a32 not in cache:
            cache[a32] = math.fsum(power_error(w, a32, spec) for w in weights)
        return cache[a32]

    grid = coarse_grid(bounds, step)
    errors = np.array([objective(a) for a in grid])
    for i in _local_minima(errors)[:refine]:
        # the curve is rugged at the scale of a grid cell: a 5× finer grid inside the bracket first,
        # then Brent between the neighbours of its best point
        lo, hi = max(i - 1, 0), min(i + 1, len(grid) - 1)
        fine = np.round(np.linspace(grid[lo], grid[hi], FINE_FACTOR * (hi - lo) + 1), 6)
        fine_errors = np.array([objective(a) for a in fine])
        j = int(np.argmin(fine_errors))
        low, high = fine[max(j - 1, 0)], fine[min(j + 1, len(fine) - 1)]
        if high > low:
            from scipy.optimize import minimize_scalar  # imported here: keeps scipy off every job's start-up

            minimize_scalar(objective, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    best = min(cache, key=lambda a: (cache[a], abs(a - 1.0)))
    return best, {"error": cache[best], "error_at_1": objective(1.0), "evaluations": len(cache)}


# --------------------------------------------------------------------------------------------------
# Data-driven refinement


def _on(batch: dict, device: torch.device) -> dict:
    return batch_to({k: v for k, v in batch.items() if k != "labels"}, device)


@torch.no_grad()
def capture_input_grams(targets: dict[str, torch.Tensor], context: QuantizeContext, max_tokens: int = 0,
                        ) -> dict[str, tuple[torch.Tensor, int]]:
    """XᵀX/N (float32, from a float64 sum) and N of every target layer's calibration inputs.

    X are the inputs of ``<name minus .weight>`` on ``context.batches`` in the *unquantized* model,
    i.e. ``context.model`` with every target's effective weight (offset + target) substituted, so
    the reference is exactly the tensors being quantized. Tokens whose attention_mask is 0 are left
    out when the input is laid out (batch, sequence, features); 2-D inputs (pooled classifier heads)
    count every row. ``max_tokens`` > 0 keeps the first max_tokens tokens per layer."""
    context.require_data("nupes")
    model = context.model
    device = next(model.parameters()).device
    modules = {name: linear_of(model, name, "nupes") for name in targets}
    for name, module in modules.items():
        if tuple(module.weight.shape) != tuple(targets[name].shape):
            raise ValueError(f"nupes: target {name!r} has shape {tuple(targets[name].shape)}, "
                             f"the module weight {tuple(module.weight.shape)}")
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
            for n, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0].detach()
            mask = mask_holder["mask"]
            if x.dim() >= 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(torch.bool)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            if max_tokens > 0:
                x = x[: max(max_tokens - counts[name], 0)]
            sums[name] += x.T @ x
            counts[name] += x.shape[0]
        return record

    weights = {n: context.effective(n, t.to(device, torch.float32)) for n, t in targets.items()}
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in context.batches:
            batch = _on(batch, device)
            mask_holder["mask"] = batch.get("attention_mask")
            functional_call(model, weights, args=(), kwargs=batch, strict=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    grams = {}
    for name in targets:
        if counts[name] == 0:
            raise ValueError(f"nupes: target {name!r}: no calibration token reached the layer")
        grams[name] = ((sums[name] / counts[name]).to(torch.float32), counts[name])
    return grams


def reconstruction_loss(weight: torch.Tensor, dequantized: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||X Ŵᵀ − X Wᵀ||² / ||X Wᵀ||² (means over tokens), from the Gram matrix XᵀX/N."""
    error = dequantized - weight
    reference = ((weight @ gram) * weight).sum()
    reference = torch.where(reference > 0, reference, torch.ones_like(reference))
    return ((error @ gram) * error).sum() / reference.detach()


def _theta(a: float) -> float:
    fraction = min(max((a - A_MIN) / (A_MAX - A_MIN), 1e-6), 1 - 1e-6)
    return math.log(fraction / (1 - fraction))


def _learned_a(theta: torch.Tensor) -> torch.Tensor:
    return A_MIN + (A_MAX - A_MIN) * torch.sigmoid(theta)


def _group_absmax(weight: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """max|W| of every group, shape (rows, groups per row); 1 for an all-zero group, as Grid R."""
    rows, _ = weight.shape
    per_row, width = spec.groups(weight.shape)
    grouped = weight.detach().abs().reshape(rows, per_row, width)
    absmax = grouped.amax().expand(rows, per_row) if spec.group_size == 0 else grouped.amax(dim=2)
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


def power_ste(latent: torch.Tensor, a: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Ŵ of the latent weights at exponent ``a`` (a 0-dim tensor), differentiable as described in the
    module docstring: straight-through in V, level positions in a. Its value equals
    ``power_quantize(latent, a, spec)[1]`` bit for bit (same codes, same stored scale): every
    straight-through term is added as ``x − x.detach()``, which is exactly 0."""
    fixed = latent.detach()
    _, width = spec.groups(fixed.shape)
    levels = 2 ** (spec.bits - 1) - 1
    # max|P| = (max|V|)^a since the power is monotone; M is detached, a is not
    scale = _group_absmax(fixed, spec).clamp_min(EPS).pow(a) / levels
    scale = _stored(scale.detach(), spec) + (scale - scale.detach())   # value: stored; gradient: d(M^a/L)/da
    scale = scale.repeat_interleave(width, dim=1)
    with torch.no_grad():
        powered = torch.sign(fixed) * fixed.abs().pow(a)
        codes = torch.clamp(torch.round(powered / scale), -levels, levels)
    level = (scale * codes.abs()).clamp_min(EPS).pow(1.0 / a)
    return torch.sign(codes) * level + (latent - fixed)


def _learn(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], start: dict[str, float],
           spec: GridSpec, steps: int, lr: float, shared: bool, desc: str | None,
           ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """Adam on latent weights and exponent(s) of the given layers; returns the lowest-loss state
    (latent weights, float32 exponents) among the data-free start and every iterate."""
    names = list(weights)
    # V = M·U with U the trained tensor and M the group absmax of W: Adam's steps on U are lr·M in
    # weight units, so ``lr`` means the same for weights and for 100× smaller fine-tuning deltas
    ranges = {n: _group_absmax(weights[n], spec).repeat_interleave(spec.groups(weights[n].shape)[1], dim=1)
              for n in names}
    units = {n: (weights[n] / ranges[n]).requires_grad_(True) for n in names}
    if shared:
        theta = torch.tensor(_theta(start[names[0]]), dtype=torch.float32, device=weights[names[0]].device,
                             requires_grad=True)
        thetas = dict.fromkeys(names, theta)
        parameters = [*units.values(), theta]
    else:
        thetas = {n: torch.tensor(_theta(start[n]), dtype=torch.float32, device=weights[n].device,
                                  requires_grad=True) for n in names}
        parameters = [*units.values(), *thetas.values()]

    def data_free_loss() -> float:
        return float(sum(reconstruction_loss(weights[n], power_quantize(weights[n], start[n], spec)[1], grams[n])
                         for n in names))

    best_loss = data_free_loss()
    best = ({n: weights[n].clone() for n in names}, dict(start), -1)
    history = [best_loss]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))

    def current_loss() -> torch.Tensor:
        return sum(reconstruction_loss(weights[n], power_ste(units[n] * ranges[n], _learned_a(thetas[n]), spec),
                                       grams[n]) for n in names)

    for step in tqdm(range(steps + 1), desc=desc, mininterval=2.0, disable=desc is None):
        loss = current_loss()       # the loss of the state before this step (the forward is exact)
        value = loss.item()
        if step > 0:
            history.append(value)
        if math.isfinite(value) and value < best_loss and step > 0:
            best_loss = value
            best = ({n: (units[n] * ranges[n]).detach() for n in names},
                    {n: float(_learned_a(thetas[n]).detach()) for n in names}, step)
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    state, exponents, best_step = best
    return state, exponents, {"objective_data_free": history[0], "objective_best": best_loss,
                              "best_step": best_step, "objective_last": history[-1]}


# --------------------------------------------------------------------------------------------------
# Registered method


def _check(bits: int, group_size: int, scale_dtype: str, mode: str, exponent_scope: str, steps: int,
           lr: float, max_tokens: int) -> GridSpec:
    if mode not in MODES:
        raise ValueError(f"nupes: mode {mode!r} is not one of {list(MODES)}")
    if exponent_scope not in SCOPES:
        raise ValueError(f"nupes: exponent_scope {exponent_scope!r} is not one of {list(SCOPES)}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"nupes: steps must be an integer ≥ 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"nupes: lr must be > 0, got {lr!r}")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"nupes: max_tokens must be an integer ≥ 0 (0: all tokens), got {max_tokens!r}")
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"nupes: bits must be an integer in [2, 16], got {bits!r}")
    return power_spec(bits, group_size, scale_dtype)


@register("quantize", "nupes", params=(
    Param("bits", int, 4, minimum=2, maximum=16, doc="code bits b (2^b − 1 levels, Grid R on |W|^a)"),
    Param("scheme", str, "sym-restricted", choices=("sym-restricted",),
          doc="fixed: the power quantizer codes on the sym-restricted grid"),
    Param("group_size", int, -1, minimum=-1, doc="-1 per output row, 0 per tensor, g > 0 per group of g inputs"),
    Param("scale_dtype", str, "float16", choices=tuple(SCALE_DTYPES), doc="dtype the scale is stored in"),
    Param("mode", str, "data-free", choices=MODES,
          doc="data-free: exponent search only; data-driven: then learn latent weights and exponent"),
    Param("exponent_scope", str, "layer", choices=SCOPES, doc="one exponent per layer or one for all layers"),
    Param("steps", int, 200, minimum=0, doc="Adam steps of the data-driven mode"),
    Param("lr", float, 1e-3, minimum=0.0,
          doc="Adam learning rate of the data-driven mode, in units of each group's max|W| (cosine decay)"),
    Param("max_tokens", int, 0, minimum=0, doc="calibration tokens per layer, data-driven mode (0: all)"),
), doc="NUPES-style power-exponent quantization (Yvinec et al. 2023): Grid R on sign(W)|W|^a")
def nupes(targets: dict[str, torch.Tensor], *, context: QuantizeContext, bits: int = 4,
          scheme: str = "sym-restricted", group_size: int = -1, scale_dtype: str = "float16",
          mode: str = "data-free", exponent_scope: str = "layer", steps: int = 200, lr: float = 1e-3,
          max_tokens: int = 0) -> dict[str, QuantizedTensor]:
    """Quantize every target with the power quantizer; see the module docstring."""
    if scheme != "sym-restricted":
        raise ValueError(f"nupes: scheme must be 'sym-restricted' (the power quantizer's grid), got {scheme!r}")
    spec = _check(bits, group_size, scale_dtype, mode, exponent_scope, steps, lr, max_tokens)
    if not targets:
        return {}
    device = torch.device(context.device)
    weights = {n: t.detach().to(device, torch.float32) for n, t in targets.items()}
    check_targets(weights, spec, "nupes")

    if exponent_scope == "global":
        a, stats = search_exponent(list(weights.values()), spec)
        searched = {n: (a, stats) for n in weights}
    else:
        searched = {n: search_exponent([w], spec) for n, w in weights.items()}
    exponents = {n: a for n, (a, _) in searched.items()}
    latents = weights
    learned: dict[str, dict] = {}
    if mode == "data-driven":
        grams = {n: g.to(device) for n, (g, _) in capture_input_grams(weights, context, max_tokens).items()}
        if exponent_scope == "global":
            latents, exponents, record = _learn(weights, grams, exponents, spec, steps, lr, True, "nupes (global)")
            learned = dict.fromkeys(weights, record)
        else:
            latents, exponents = {}, {}
            for name in tqdm(weights, desc="nupes layers", mininterval=2.0):
                state, a, record = _learn({name: weights[name]}, {name: grams[name]},
                                          {name: searched[name][0]}, spec, steps, lr, False, None)
                latents[name], exponents[name], learned[name] = state[name], a[name], record

    out = {}
    for name, weight in weights.items():
        codes, dequantized, params = power_quantize(latents[name], exponents[name], spec)
        a, stats = searched[name]
        # error / error_at_1: this layer's ||W − Ŵ||² and that of Grid R RTN (a = 1); search_objective:
        # the minimised data-free objective (this layer's, or the sum over layers under a global a)
        info = {"method": "nupes", "label": "NUPES-style", "mode": mode, "exponent_scope": exponent_scope,
                "exponent": float(np.float32(exponents[name])), "searched_exponent": a,
                "search_objective": stats["error"], "search_evaluations": stats["evaluations"],
                "error": float((dequantized - weight).double().pow(2).sum()),
                "error_at_1": stats["error_at_1"] if exponent_scope == "layer" else power_error(weight, 1.0, spec)}
        if name in learned:
            # per layer: ||XŴᵀ − XWᵀ||²/||XWᵀ||² of the data-free start and of the result; the
            # objective_* values are the trained sum (this layer's, or all layers' under a global a)
            data_free = power_quantize(weight, a, spec)[1]
            info.update(learned[name],
                        reconstruction_data_free=float(reconstruction_loss(weight, data_free, grams[name])),
                        reconstruction=float(reconstruction_loss(weight, dequantized, grams[name])))
        out[name] = power_record(codes, params, exponents[name], info)
    return out
