"""Building blocks shared by the merge methods (one implementation each; spec dpp_merge.md §3).

Conventions: every function works in float32 and never modifies its inputs, and computes on the
device of the tensors it is given (every tensor it creates is made there; DARE masks are drawn on
the CPU and moved). A "stack" is a tensor of shape (T, *shape) holding one entry per model, in the
models' sorted-name order (see ``ordered``), so sums over models run in the same order whatever
order the caller used.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from methods.device import divide
from methods.prune.dare import dare_delta, keep_mask

StateDict = dict[str, torch.Tensor]


# --- inputs -----------------------------------------------------------------------------------

def ordered(models: list[StateDict], names: list[str]) -> tuple[list[str], list[StateDict]]:
    """Models and names sorted by name: results do not depend on the order the caller used."""
    if len(models) != len(names):
        raise ValueError(f"{len(models)} models but {len(names)} names")
    if not models:
        raise ValueError("merging needs at least one model")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [names[i] for i in order], [models[i] for i in order]


def f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32)


def scalar_like(value: float, tensor: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``tensor``'s dtype and device (for ``torch.where``)."""
    return torch.full((), value, dtype=tensor.dtype, device=tensor.device)


def stack_weights(models: list[StateDict], key: str) -> torch.Tensor:
    """Full weights θ_t of one tensor for every model, float32, shape (T, *shape)."""
    return torch.stack([f32(m[key]) for m in models])


def task_delta(base: StateDict, model: StateDict, key: str) -> torch.Tensor:
    """δ = θ_t − θ₀ for one tensor, in float32."""
    return f32(model[key]) - f32(base[key])


def stack_deltas(base: StateDict, models: list[StateDict], key: str) -> torch.Tensor:
    """Task vectors of one tensor for every model, float32, shape (T, *shape)."""
    return torch.stack([task_delta(base, m, key) for m in models])


def apply_delta(base_weight: torch.Tensor, merged_delta: torch.Tensor, scale: float) -> torch.Tensor:
    """θ₀ + λ·τ (λ = 0 gives θ₀ exactly)."""
    return f32(base_weight) + scale * merged_delta


def uniform_mean(weights: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i x_i over the leading axis: sum first, then divide (as mergekit's ``linear``)."""
    return divide(weights.sum(dim=0), float(weights.shape[0]))


# --- magnitude trim ---------------------------------------------------------------------------

def keep_count(numel: int, density: float) -> int:
    """How many entries a top-``density`` trim keeps: max(1, ⌊density·n⌋) for density in (0, 1),
    n for density ≥ 1 and 0 for density ≤ 0 or an empty tensor (the rule of mergekit's
    ``magnitude``; the official TIES code has no floor and crashes when ⌊density·n⌋ rounds to n)."""
    if numel == 0 or density <= 0:
        return 0
    if density >= 1:
        return numel
    return max(1, int(density * numel))


def magnitude_threshold(abs_values: torch.Tensor, density: float) -> float | None:
    """The ⌊density·n⌋-th largest magnitude of a flat tensor (``keep_count``); None = keep all,
    +inf = keep none. Used with ``|δ| >= threshold``: entries tied with the threshold are all
    kept (as the official TIES code's ``kthvalue`` rule), so ties can keep a few more than
    ``keep_count``; with distinct magnitudes exactly ``keep_count`` entries survive. The official
    code keeps one entry more (it compares with the (n−⌊kn⌋)-th smallest value), which is
    immaterial at model scale and is not reproduced."""
    n = abs_values.numel()
    k = keep_count(n, density)
    if k >= n:
        return None
    if k == 0:
        return float("inf")
    return float(torch.kthvalue(abs_values.reshape(-1), n - k + 1).values)


def trim_to_threshold(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries with |δ| below the threshold (None keeps everything)."""
    if threshold is None:
        return delta.clone()
    return torch.where(delta.abs() >= threshold, delta, scalar_like(0.0, delta))


def trim_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Paper TIES trim of one tensor: keep |δ| ≥ the ``keep_count``-th largest |δ| (ties kept)."""
    return trim_to_threshold(delta, magnitude_threshold(delta.abs(), density))


def trim_top_exact(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit ``magnitude`` trim of one tensor: keep exactly ``keep_count`` entries, the largest
    |δ|. Among equal magnitudes at the boundary the entry with the lower flat index is kept (stable
    sort); mergekit uses an unstable ``argsort``, so it may keep a different one of the tied
    entries (only exact ties can differ)."""
    n = delta.numel()
    k = keep_count(n, density)
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k:
        keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
    return torch.where(keep, flat, scalar_like(0.0, delta)).reshape(delta.shape)


# --- sign election and disjoint merge ---------------------------------------------------------

def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES "mass" election γ = sign(Σ_t τ̂_t) over the leading (model) axis; 0 where the sum is 0."""
    return torch.sign(trimmed.sum(dim=0))


def majority_sign(elected_sign_sum: int) -> float:
    """Sign of Σ_k γ_k (the more frequent elected sign); +1 when that sum is 0 (the official code
    then leaves γ = 0, which its disjoint merge treats as negative; we take +1)."""
    return -1.0 if elected_sign_sum < 0 else 1.0


def resolve_zero_signs(gamma: torch.Tensor, majority: float) -> torch.Tensor:
    """Entries with γ = 0 take the majority sign (official ``resolve_zero_signs``, "majority")."""
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


def agreeing(trimmed: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Boolean (T, *shape): τ̂_t is non-zero and has the elected sign."""
    return torch.where(gamma > 0, trimmed > 0, trimmed < 0)


def disjoint_mean(trimmed: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Σ_{t agreeing} τ̂_t / #{agreeing t}, the count clamped to ≥ 1 (TIES "dis-mean")."""
    agree = agreeing(trimmed, gamma)
    total = torch.where(agree, trimmed, scalar_like(0.0, trimmed)).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1).to(trimmed.dtype)


def sign_consensus(deltas: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mergekit's consensus (``sum`` method, all weights 1): majority = sign(Σ_t δ_t) with 0 → +1;
    keep entries whose sign equals it (zeros never do); Σ kept, divided by the number kept (0 → 1)
    when ``normalize``."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    agree = torch.sign(deltas) == majority
    mixed = torch.where(agree, deltas, scalar_like(0.0, deltas)).sum(dim=0)
    if not normalize:
        return mixed
    divisor = agree.sum(dim=0).to(deltas.dtype)
    return mixed / torch.where(divisor == 0, scalar_like(1.0, deltas), divisor)


def ties_paper(keys: Iterable[str], deltas: Callable[[str], torch.Tensor], n_models: int,
               density: float, granularity: str) -> dict[str, torch.Tensor]:
    """The official TIES algorithm (spec §3.2) on given task vectors; returns τ_m per tensor.

    ``deltas(key)`` is the (T, *shape) stack of task vectors. ``granularity="model"`` trims each
    model's task vector as one flattened vector over all ``keys`` (official code) and resolves
    γ = 0 with the majority sign over all keys; ``"tensor"`` does both per tensor."""
    if granularity not in ("model", "tensor"):
        raise ValueError(f"granularity must be 'model' or 'tensor', got {granularity!r}")
    keys = list(keys)
    trimmed = {}
    if granularity == "model":
        stacks = {key: deltas(key) for key in keys}
        thresholds = [magnitude_threshold(torch.cat([stacks[k][t].abs().reshape(-1) for k in keys]), density)
                      for t in range(n_models)] if keys else []
        for k in keys:  # release each task-vector stack once it is trimmed
            stack = stacks.pop(k)
            trimmed[k] = torch.stack([trim_to_threshold(stack[t], thresholds[t]) for t in range(n_models)])
    else:
        for k in keys:
            trimmed[k] = torch.stack([trim_top_magnitude(d, density) for d in deltas(k)])
    gammas = {k: elect_sign(trimmed[k]) for k in keys}
    if granularity == "model":
        total = sum(int(g.to(torch.int64).sum()) for g in gammas.values())
        majorities = dict.fromkeys(keys, majority_sign(total))
    else:
        majorities = {k: majority_sign(int(g.to(torch.int64).sum())) for k, g in gammas.items()}
    return {k: disjoint_mean(trimmed.pop(k), resolve_zero_signs(gammas.pop(k), majorities[k])) for k in keys}


# --- DARE -------------------------------------------------------------------------------------

def mask_name(model_name: str, key: str) -> str:
    """Name that seeds the DARE mask of one model's tensor: masks depend on (seed, model, tensor)
    only, never on the order or number of models."""
    return f"{model_name}/{key}"


def l1_rescale(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """m ⊙ δ rescaled so that its L1 norm equals ‖δ‖₁ (mergekit ``rescale: true``, RescaleNorm.l1).

    No survivor (or only zero survivors) → all zeros. mergekit also skips the rescale when either
    norm is below 1e-7; here any non-zero survivor is rescaled, so ‖δ‖₁ is preserved whenever
    something survives."""
    masked = torch.where(keep, delta, scalar_like(0.0, delta))
    after = masked.abs().sum()
    if after == 0:
        return masked
    return masked * (delta.abs().sum() / after)


def dare(delta: torch.Tensor, drop_rate: float, seed: int, model_name: str, key: str,
         semantics: str) -> torch.Tensor:
    """DARE one task-vector tensor with the suite's seeded mask (methods.prune.dare.keep_mask).

    ``semantics="paper"``: survivors ×1/(1−p) (MergeLM). ``"mergekit"``: same keep mask
    (Bernoulli(1−p), i.e. mergekit density = 1−p), survivors rescaled by ‖δ‖₁/‖m⊙δ‖₁."""
    name = mask_name(model_name, key)
    if semantics == "paper":
        return dare_delta(delta, drop_rate, seed, name)
    if semantics != "mergekit":
        raise ValueError(f"semantics must be 'paper' or 'mergekit', got {semantics!r}")
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must lie in [0, 1], got {drop_rate}")
    delta = f32(delta)
    if drop_rate == 0.0:
        return delta.clone()
    return l1_rescale(delta, keep_mask(delta.shape, drop_rate, seed, name).to(delta.device))


def stack_dare_deltas(base: StateDict, models: list[StateDict], names: list[str], key: str,
                      drop_rate: float, seed: int, semantics: str) -> torch.Tensor:
    return torch.stack([dare(task_delta(base, m, key), drop_rate, seed, n, key, semantics)
                        for n, m in zip(names, models)])


def record(info: dict | None, **items) -> None:
    """Method-specific details for apply.py's info dict (``info`` is None when nobody asks)."""
    if info is not None:
        info.update(items)
