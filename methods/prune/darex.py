"""DAREx (Deng et al., "DARE the Extreme", ICLR 2025; code vengdeng/DAREx @ 0873fc2).

DARE's rescale 1/(1 − p) makes the output perturbation grow like √(p/(1 − p)) (spec dpp_merge.md
§2.1); DAREx-q keeps DARE's random mask and rescales the survivors by 1/q instead, q ∈ [1 − p, 1]:

    DAREx-q(δ) = m ⊙ δ / q,   m ~ Bernoulli(1 − p)  (the very mask ``dare`` draws)

so q = 1 − p is DARE bit for bit and q = 1 is DropOnly. This module holds the two registered
methods (``drop-only``, ``darex-q``) and the rules that choose q, which need data and are therefore
library functions a workflow step calls, not registered methods:

(a) a fixed q — pass it as ``q``;
(b) ``scan_global_q``: the official coarse-to-fine scan of one global q against a score (labelled
    validation metric, or the label-free output change to minimise);
(c) ``analytic_q``: per-layer q from the concentration bound with one tuned scalar η;
(d) ``learn_layer_q``: per-layer q by gradient descent on the output change (``perlayer_opt.py``);
(e) ``mse_optimal_q``: the closed-form per-neuron MSE-optimal q (derived in the spec, not in the
    paper), a data-light baseline.

**How a per-layer q reaches ``darex-q``.** ``q_per_tensor`` maps tensor names (or regexes) to q;
``darex_q_params(layer_q)`` turns a ``{weight name: q}`` result of (c)/(d) into
``{"q": mean, "q_per_tensor": {...}}`` with the official ``rescale_q`` rule: a weight uses its own q,
the matching bias uses the weight's q, every other pruned tensor (embeddings, LayerNorm) uses the mean
of the layer q's. The classifier / lm_head are left to the pruning exclusion patterns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from methods.finetune.batching import batch_to
from methods.device import divide
from methods.prune.common import check_drop_rate, f32, zero_like
from methods.prune.dare import keep_mask
from methods.registry import Param, register

# --- the registered methods -------------------------------------------------------------------


def lookup_q(tensor_name: str, q_per_tensor: Mapping[str, float] | None) -> float | None:
    """``q_per_tensor``'s q for one tensor: an exact key, else the first key that matches the whole
    name as a regex (in the mapping's order), else None."""
    if not q_per_tensor:
        return None
    if tensor_name in q_per_tensor:
        value = q_per_tensor[tensor_name]
    else:
        value = None
        for pattern, candidate in q_per_tensor.items():
            try:
                if re.fullmatch(pattern, tensor_name):
                    value = candidate
                    break
            except re.error as error:
                raise ValueError(f"q_per_tensor key {pattern!r} is neither a tensor name nor a valid regex: "
                                 f"{error}") from None
    return None if value is None else _check_q(float(value), tensor_name)


def resolve_q(tensor_name: str, q: float | None, q_per_tensor: Mapping[str, float] | None) -> float:
    """The q for one tensor: ``lookup_q``, else the global ``q``; neither is an error."""
    own = lookup_q(tensor_name, q_per_tensor)
    if own is not None:
        return own
    if q is None:
        raise ValueError(f"tensor {tensor_name!r}: darex-q needs 'q' (a float) or a 'q_per_tensor' entry "
                         "that matches this tensor")
    return _check_q(float(q), tensor_name)


def _check_q(q: float, tensor_name: str) -> float:
    # q = inf is allowed: it is the MSE-optimal q of a neuron whose δ·x sums to 0 (drop it all)
    if not q > 0 or math.isnan(q):
        raise ValueError(f"tensor {tensor_name!r}: q must be > 0, got {q}")
    return q


def darex_q_delta(delta: torch.Tensor, drop_rate: float, mask_seed: int, tensor_name: str,
                  q: float | torch.Tensor) -> torch.Tensor:
    """DAREx-q on one tensor: DARE's mask, survivors × 1/q. ``q`` may be a tensor that broadcasts
    against δ (e.g. a per-row q of shape [out, 1]). p = 1 → zeros; no p = 0 shortcut: with q ≠ 1 the
    survivors (everything, at p = 0) are still rescaled, which is the definition."""
    drop_rate = check_drop_rate(drop_rate, tensor_name)
    delta = f32(delta)
    if drop_rate == 1.0:
        return torch.zeros_like(delta)
    if isinstance(q, torch.Tensor):
        q = f32(q).to(delta.device)
        if not bool((q > 0).all()):
            raise ValueError(f"tensor {tensor_name!r}: every q must be > 0")
    keep = keep_mask(delta.shape, drop_rate, mask_seed, tensor_name).to(delta.device)
    return torch.where(keep, divide(delta, q), zero_like(delta))


@register("prune", "drop-only", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="fraction p of delta entries dropped"),
), doc="DropOnly: DARE's random mask, survivors not rescaled (= darex-q with q = 1)")
def drop_only(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str) -> torch.Tensor:
    return darex_q_delta(delta, drop_rate, mask_seed, tensor_name, 1.0)


@register("prune", "darex-q", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="fraction p of delta entries dropped"),
    Param("q", float, None, minimum=1e-6,
          doc="global rescale denominator (survivors x 1/q; q = 1-p is DARE, 1 is DropOnly); "
              "the fallback for tensors q_per_tensor does not cover"),
    Param("q_per_tensor", dict, None,
          doc="tensor name (exact, else a full-match regex, first wins) -> q; see darex_q_params"),
), doc="DAREx-q: DARE's random mask, survivors rescaled by 1/q instead of 1/(1-p) (Deng et al. 2025)")
def darex_q(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str,
            q: float | None = None, q_per_tensor: Mapping[str, float] | None = None) -> torch.Tensor:
    return darex_q_delta(delta, drop_rate, mask_seed, tensor_name, resolve_q(tensor_name, q, q_per_tensor))


def darex_q_params(layer_q: Mapping[str, float]) -> dict:
    """``darex-q`` parameters from per-layer q's keyed by weight name (``…weight``): the official
    ``rescale_q`` rule (a bias takes its weight's q, every other tensor the mean q)."""
    if not layer_q:
        raise ValueError("no layer q's")
    per_tensor: dict[str, float] = {}
    for name, value in layer_q.items():
        per_tensor[name] = float(value)
        if name.endswith(".weight"):
            per_tensor[name[:-len("weight")] + "bias"] = float(value)
    return {"q": float(np.mean([float(v) for v in layer_q.values()])), "q_per_tensor": per_tensor}


def dare_q(drop_rate: float) -> float:
    """Rule (a) at its DARE default: q = 1 − p (the same float DARE divides by)."""
    return 1.0 - drop_rate


# --- (b) global q by a coarse-to-fine scan ----------------------------------------------------


@dataclass
class ScanResult:
    best: float
    scores: dict[float, float] = field(default_factory=dict)   # q -> score, in evaluation order


def scan_global_q(score_fn: Callable[[float], float], lower: float, upper: float, step: float, *,
                  decay: float = 0.1, patience: int = 3, maximize: bool = True,
                  fine_floor: float | None = None) -> ScanResult:
    """The official ``find_optimal_param`` (``find_q_encoder.py`` / ``find_q_decoder.py``).

    Coarse pass over ``arange(lower, upper + step, step)``, then a fine pass with step ``step·decay``
    over ``arange(max(lower + step·decay, q̂ − step·(1 − decay)), q̂ + step)`` around the coarse best q̂;
    each pass stops after more than ``patience`` consecutive evaluations that are worse than the best of
    that pass (equal counts as an improvement). The best q over both passes wins; among equal scores
    the one evaluated first. ``maximize=False`` minimises (e.g. an output-change loss; the official
    code maximises its negative). ``fine_floor`` replaces the fine pass's lower limit
    ``lower + step·decay`` (``find_q_decoder.py`` uses 0). README settings at p = 0.99:
    lower 0.01, upper 0.1, step 0.05 (fine step 0.005). q values are rounded to 10 decimals so that
    arange's float noise does not create distinct keys; each q is scored once (score_fn is taken to be
    deterministic)."""
    if step <= 0 or not 0 < decay < 1:
        raise ValueError(f"step must be > 0 and decay in (0, 1), got step={step}, decay={decay}")
    sign = 1.0 if maximize else -1.0
    scores: dict[float, float] = {}

    def score(q: float) -> float:
        q = round(float(q), 10)
        if q not in scores:
            scores[q] = float(score_fn(q))
        return scores[q]

    def one_pass(grid: np.ndarray) -> None:
        best, worse = -math.inf, 0
        for q in grid:
            value = sign * score(q)
            if value >= best:
                best, worse = value, 0
            else:
                worse += 1
            if worse > patience:
                break

    def best_q() -> float:
        return max(scores, key=lambda k: sign * scores[k])   # max() keeps the first of equal keys

    one_pass(np.arange(lower, upper + step, step))
    coarse = best_q()
    floor = lower + step * decay if fine_floor is None else fine_floor
    one_pass(np.arange(max(floor, coarse - step * (1 - decay)), coarse + step, step * decay))
    return ScanResult(best_q(), scores)


def mean_without_outlier(values: Iterable[float]) -> float:
    """Mean after removing the single value farthest from the mean when there are ≥ 3 (the official
    label-free objective averages mask seeds 0–3 this way: ``remove_one_outlier``)."""
    values = [float(v) for v in values]
    if len(values) >= 3:
        centre = float(np.mean(values))
        values.remove(max(values, key=lambda v: abs(v - centre)))
    return float(np.mean(values))


def mean_abs_change(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Encoder label-free objective: mean |H_ft − H_pruned| over tokens and dims (``get_outpuchage``)."""
    return (f32(output) - f32(reference)).abs().mean()


def top_k_mse(logits: torch.Tensor, reference_logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Decoder objective: MSE on the reference's top-k logits per position (``top_k_mse_loss``, K = 5)."""
    reference_logits = f32(reference_logits).detach()
    index = torch.topk(reference_logits, k, dim=-1).indices
    return torch.nn.functional.mse_loss(torch.gather(f32(logits), -1, index),
                                        torch.gather(reference_logits, -1, index))


# --- (c) analytic per-layer q -----------------------------------------------------------------

# Tensors the official optimal_q_calculation gives no own q (they take the mean q).
ANALYTIC_SKIP = ("lm_head", "classifier", "bias", "LayerNorm", "embeddings")


def phi(drop_rate: float) -> float:
    """φ(p) = (1 − 2p)/log((1 − p)/p), the Bernoulli sub-Gaussian constant in the DAREx bound;
    its limit 1/2 at p = 1/2 (0/0 in the official code) and 0 at p ∈ {0, 1}."""
    if drop_rate in (0.0, 1.0):
        return 0.0
    if abs(drop_rate - 0.5) < 1e-9:
        return 0.5
    return (1 - 2 * drop_rate) / math.log((1 - drop_rate) / drop_rate)


def analytic_q_grid(drop_rate: float, step: Fraction = Fraction(1, 1000), top: float = 0.998) -> torch.Tensor:
    """q ∈ {q₀, q₀ + 0.001, …, 0.998}. q₀ = ⌈(1 − p)·1000⌉/1000 with p read as written, so the scan
    never starts below 1 − p (the official ``int((1 − p)·1000)`` starts at 0.099 for p = 0.9). A
    CPU tensor."""
    keep = 1 - Fraction(repr(float(drop_rate)))
    first = math.ceil(keep / step)
    last = math.floor(Fraction(repr(top)) / step)
    return torch.tensor([float(k * step) for k in range(first, last + 1)] or [float(keep)], dtype=torch.float64,
                        device="cpu")


def analytic_row_q(c: torch.Tensor, drop_rate: float, eta: float, gamma: float = 0.95,
                   stop_fraction: float = 0.8) -> torch.Tensor:
    """Per-row q of ``analytical_resolve_new`` for c [rows, cols] (c_ij = ΔW_ij·x̄_j, bias appended).

    For each row minimise f_i(q) = |η(1 − (1−p)/q)·Σ_j c_ij + η²φ(p)·Σ_j c_ij²/(4q²) + log(2/(1−γ))|
    over the grid, scanning upwards: a row's q moves to every grid point whose f is ≤ its best so far
    (ties go to the larger q); the scan stops after the step at which ≥ ``stop_fraction`` of the rows
    have had a non-improving (≥) step. Computed in float64 (the official fp16 drops c² ≲ 1e-8 to 0)."""
    check_drop_rate(drop_rate, "analytic q")
    c = c.to(torch.float64).reshape(c.shape[0], -1)
    keep = 1.0 - drop_rate
    grid = analytic_q_grid(drop_rate).to(c.device)
    s1, s2 = c.sum(1, keepdim=True), c.pow(2).sum(1, keepdim=True)
    f = (eta * (1 - keep / grid) * s1 + eta ** 2 * phi(drop_rate) * s2 / (4 * grid ** 2)
         + math.log(2 / (1 - gamma))).abs()                                   # [rows, K]
    initial = torch.full((c.shape[0], 1), 10000.0, dtype=torch.float64, device=c.device)
    previous_best = torch.cat([initial, torch.cummin(f, dim=1).values[:, :-1].minimum(initial)], dim=1)
    improving, not_improving = f <= previous_best, f >= previous_best
    stopped = torch.cummax(not_improving.to(torch.int8), dim=1).values.to(torch.float64).mean(0)
    reached = torch.nonzero(stopped >= stop_fraction)
    last = int(reached[0]) if len(reached) else grid.numel() - 1
    steps = torch.arange(1, last + 2, device=c.device)
    chosen = (improving[:, :last + 1] * steps).max(1).values - 1             # last improving step, −1: none
    q = torch.where(chosen >= 0, grid[chosen.clamp(min=0)], torch.full_like(chosen, keep, dtype=torch.float64))
    return q.to(torch.float32)


def contributions(delta_weight: torch.Tensor, input_mean: torch.Tensor,
                  delta_bias: torch.Tensor | None = None, tensor_name: str = "?") -> torch.Tensor:
    """c_ij = ΔW_ij·x̄_j for a [out, in] weight delta; a bias delta is appended as a column (input 1)."""
    delta_weight, input_mean = f32(delta_weight), f32(input_mean).to(delta_weight.device).reshape(-1)
    if delta_weight.dim() != 2 or delta_weight.shape[1] != input_mean.numel():
        raise ValueError(f"tensor {tensor_name!r}: weight delta {tuple(delta_weight.shape)} does not match "
                         f"{input_mean.numel()} input means")
    c = delta_weight * input_mean.unsqueeze(0)
    if delta_bias is not None:
        c = torch.cat([c, f32(delta_bias).to(c.device).reshape(-1, 1)], dim=1)
    return c


def analytic_q(deltas: Mapping[str, torch.Tensor], input_means: Mapping[str, torch.Tensor],
               drop_rate: float, eta: float, *, skip: Iterable[str] = ANALYTIC_SKIP, gamma: float = 0.95,
               stop_fraction: float = 0.8) -> dict[str, float]:
    """Rule (c), ``optimal_q_calculation``: q per Linear weight = mean of its rows' analytic q.

    ``input_means`` are DAREx's signed per-feature means (``calibration.input_means``) keyed by weight
    name; weights without them, or whose name contains a ``skip`` substring, get no own q. η is the one
    tuned scalar (README, BERT: CoLA 0.37, SST-2 1.01, MRPC 0.27, STS-B 0.36); choose it with
    ``scan_global_q(lambda eta: score(darex_q_params(analytic_q(..., eta=eta))), …)``."""
    skip = tuple(skip)
    out: dict[str, float] = {}
    for name, delta in deltas.items():
        if any(s in name for s in skip) or name not in input_means:
            continue
        bias_name = name[:-len("weight")] + "bias" if name.endswith("weight") else None
        c = contributions(delta, input_means[name], deltas.get(bias_name), name)
        out[name] = float(analytic_row_q(c, drop_rate, eta, gamma, stop_fraction).mean())
    return out


# --- (e) closed-form MSE-optimal q -----------------------------------------------------------


def mse_optimal_q(delta_weight: torch.Tensor, inputs: torch.Tensor, drop_rate: float,
                  delta_bias: torch.Tensor | None = None, per_row: bool = True,
                  tensor_name: str = "?") -> torch.Tensor:
    """q minimising E_m‖h_pruned − h_ft‖² of a linear layer over the given inputs (spec §2.1).

    With S1_ni = Σ_j ΔW_ij x_nj and S2_ni = Σ_j ΔW_ij² x_nj² (bias: input 1), the mask expectation of
    the squared output change is (1 − (1−p)/q)²·S1² + p(1−p)/q²·S2, minimised at

        q* = (1 − p) + p·Σ_n S2_ni / Σ_n S1_ni²                  (one input: the spec's formula)

    per output row (``per_row=True``, a [out] tensor) or for the whole layer (sums over rows too, a
    0-d tensor). q* ≥ 1 − p; a row whose S1 is 0 for every input gets q* = inf (dropping its delta is
    optimal). ``inputs`` is [n, in] (or [in] for one input such as the mean activation x̄)."""
    check_drop_rate(drop_rate, tensor_name)
    w = delta_weight.to(torch.float64)
    x = inputs.to(device=w.device, dtype=torch.float64).reshape(-1, w.shape[1])
    s1, s2 = x @ w.T, x.pow(2) @ w.pow(2).T                                     # [n, out]
    if delta_bias is not None:
        b = delta_bias.to(device=w.device, dtype=torch.float64).reshape(1, -1)
        s1, s2 = s1 + b, s2 + b.pow(2)
    a, b2 = s1.pow(2).sum(0), s2.sum(0)
    if not per_row:
        a, b2 = a.sum(), b2.sum()
    keep = 1.0 - drop_rate
    q = torch.where(a > 0, keep + drop_rate * b2 / a.clamp(min=torch.finfo(torch.float64).tiny),
                    torch.full_like(a, math.inf))
    return q.to(torch.float32)


# --- (d) per-layer q learned by gradient descent ----------------------------------------------


@dataclass
class LearnedQ:
    layer_q: dict[str, float]              # weight name -> q
    train_losses: list[float]
    val_losses: list[tuple[int, float]]    # (step, loss)
    initial_loss: float                    # output change with every q = 1 − p (DARE), on the first batch


LOSSES = ("mse", "mean-abs", "top5-mse")


def _target(outputs, target):
    if callable(target):
        return target(outputs)
    if isinstance(outputs, torch.Tensor):
        return outputs
    if target == "logits":
        return outputs.logits
    if target == "last_hidden_state":
        value = getattr(outputs, "last_hidden_state", None)
        if value is None and getattr(outputs, "hidden_states", None) is not None:
            value = outputs.hidden_states[-1]
        if value is None:
            raise ValueError("the model returned no last_hidden_state or hidden_states; pass "
                             "output_hidden_states=True in the batches or a callable target")
        return value
    raise ValueError(f"target must be 'logits', 'last_hidden_state' or a callable, got {target!r}")


def _output_loss(kind: str, output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return torch.nn.functional.mse_loss(f32(output), f32(reference))
    if kind == "mean-abs":
        return mean_abs_change(output, reference)
    if kind == "top5-mse":
        return top_k_mse(output, reference, 5)
    raise ValueError(f"loss must be one of {list(LOSSES)}, got {kind!r}")


def _call(model, params, batch):
    from torch.func import functional_call
    if isinstance(batch, Mapping):
        return functional_call(model, params, args=(), kwargs=dict(batch))
    if isinstance(batch, (tuple, list)):
        return functional_call(model, params, args=tuple(batch))
    return functional_call(model, params, args=(batch,))


def learn_layer_q(model: torch.nn.Module, base: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor], batches: Iterable, *, drop_rate: float,
                  layers: Iterable[str] | None = None, target="last_hidden_state", loss: str = "mse",
                  lr: float = 1e-2, t_max: int = 200, init: float = 1e-4, epochs: int = 1,
                  max_steps: int | None = None, val_batches: Iterable | None = None, eval_every: int = 10,
                  patience: int = 5) -> LearnedQ:
    """Rule (d), after ``perlayer_opt.py``: one learnable q per layer, q_l = (1 − p) + |c_l| with
    c_l = ``init`` (so q_l ≥ 1 − p), trained by AdamW (lr 1e-2, cosine schedule over ``t_max`` steps)
    to minimise the output change between the pruned and the fine-tuned model.

    The model is evaluated with ``torch.func.functional_call`` on parameters
    θ = base + m ⊙ δ / q(name) for every tensor in ``masks`` (bool keep masks, e.g. ``keep_mask``)
    and θ = base + δ (fine-tuned) for the other tensors of ``deltas``; tensors in neither keep the
    module's own values (frozen meanwhile, so no gradient reaches them). q(name): a layer's weight
    and its bias use the layer's q, every other masked tensor the mean of the layer q's (the
    ``rescale_q`` rule ``darex-q`` applies, so the q's are learned under the rule they are used
    with). ``layers`` (weight names) defaults to every masked ``nn.Linear`` weight. ``target``: ``"last_hidden_state"`` (encoders; the official encoder
    objective), ``"logits"`` (decoders) or a callable on the model output; ``loss``: ``"mse"``,
    ``"mean-abs"`` (``get_outpuchage``) or ``"top5-mse"`` (``perlayer_opt.py``). The reference is the
    fine-tuned model run with the same inputs. Batches are dicts of keyword arguments, tuples of
    positional ones, or one tensor. With ``val_batches`` the mean validation loss is checked every
    ``eval_every`` steps (and at step 0) and training stops after ``patience`` checks without
    improvement; unlike the official code, the q's of the best check are returned. Deterministic:
    no randomness beyond the masks and batches given. Computes where the model is: the tensors and
    batches given are moved there."""
    check_drop_rate(drop_rate, "learn_layer_q")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    keep = 1.0 - drop_rate
    modules = dict(model.named_modules())
    if layers is None:
        layers = [name for name in masks if name.endswith(".weight")
                  and isinstance(modules.get(name[:-len(".weight")]), torch.nn.Linear)]
    layers = list(layers)
    if not layers:
        raise ValueError("no layers to learn a q for: no masked nn.Linear weight")
    for name in layers:
        if name not in masks:
            raise KeyError(f"layer {name!r} has no keep mask")
    for name in masks:
        if name not in deltas or name not in base:
            raise KeyError(f"masked tensor {name!r} needs a base tensor and a delta")
        if not deltas[name].is_floating_point():
            raise TypeError(f"masked tensor {name!r} is not floating point")
    owner = {name: name for name in layers}
    for name in layers:
        bias = name[:-len("weight")] + "bias"
        if bias in masks:
            owner[bias] = name
    index = {name: i for i, name in enumerate(layers)}

    device = next(model.parameters()).device

    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, torch.float32)

    # integer buffers (position ids) keep the module's own values
    fixed = {name: on_device(base[name]) + on_device(delta) for name, delta in deltas.items()
             if name not in masks and delta.is_floating_point() and name in base}
    masked = {}
    for name in masks:
        delta = on_device(deltas[name])
        masked[name] = torch.where(masks[name].to(device), delta, zero_like(delta))
    base32 = {name: on_device(base[name]) for name in masks}
    finetuned = {**fixed, **{name: base32[name] + on_device(deltas[name]) for name in masks}}
    coeff = torch.nn.Parameter(torch.full((len(layers),), init, dtype=torch.float32, device=device))

    def pruned_params(q: torch.Tensor) -> dict[str, torch.Tensor]:
        mean_q = q.mean()
        params = dict(fixed)
        for name, md in masked.items():
            qn = q[index[owner[name]]] if name in owner else mean_q
            params[name] = base32[name] + md / qn
        return params

    def batch_loss(batch, q: torch.Tensor | None = None) -> torch.Tensor:
        batch = batch_to(batch, device)
        with torch.no_grad():
            reference = _target(_call(model, finetuned, batch), target).detach()
        q = keep + coeff.abs() if q is None else q
        return _output_loss(loss, _target(_call(model, pruned_params(q), batch), target), reference)

    def validation_loss() -> float:
        with torch.no_grad():
            values = [float(batch_loss(b)) for b in val_batches]
        return float(np.mean(values))

    optimizer = torch.optim.AdamW([coeff], lr=lr)   # torch defaults otherwise, as perlayer_opt.py
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    train_losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    best_val, best_coeff, bad_checks = math.inf, coeff.detach().clone(), 0
    initial_loss = None
    val_batches = list(val_batches) if val_batches is not None else None
    step = 0
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()   # no dropout: the objective compares two deterministic forwards
        for p, _ in frozen:
            p.requires_grad_(False)
        for _ in range(epochs):
            for batch in batches:
                if max_steps is not None and step >= max_steps:
                    break
                if val_batches is not None and step % eval_every == 0:
                    value = validation_loss()
                    val_losses.append((step, value))
                    if value < best_val:
                        best_val, best_coeff, bad_checks = value, coeff.detach().clone(), 0
                    else:
                        bad_checks += 1
                    if bad_checks >= patience:
                        break
                if initial_loss is None:
                    with torch.no_grad():
                        initial_loss = float(batch_loss(batch, torch.full_like(coeff, keep)))
                value = batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                scheduler.step()
                train_losses.append(float(value.detach()))
                step += 1
            else:
                continue
            break
        if step == 0:
            raise ValueError("no training batches")
        if val_batches is not None:
            value = validation_loss()
            val_losses.append((step, value))
            if value < best_val:
                best_val, best_coeff = value, coeff.detach().clone()
            final = best_coeff
        else:
            final = coeff.detach()
    finally:
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    q = (keep + final.abs()).tolist()
    return LearnedQ({name: q[i] for i, name in enumerate(layers)}, train_losses, val_losses, initial_loss)
