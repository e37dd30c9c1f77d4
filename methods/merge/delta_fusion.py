"""Delta-guided fusion — OUR READING of CoDiEmb's "delta-guided model fusion" (Zhang et al., arXiv
2508.11442). The paper's formula is UNCONFIRMED (spec dpp_merge.md §3.5, §10): the abstract only
says it "computes fine-grained merging weights for checkpoints by analyzing each parameter's
deviation from its pre-trained initialization"; the official repository ships no fusion code. Do
not report numbers as "CoDiEmb fusion" until the method section has been read.

Per element k and checkpoint t:  w_{t,k} = g({|δ_{s,k}|}_s)_t with Σ_t w_{t,k} = 1, and
θ_k = θ₀_k + Σ_t w_{t,k} δ_{t,k}  (= Σ_t w_{t,k} θ_{t,k}). The weighting g is pluggable
(``WEIGHTINGS``); the one provided, "magnitude-power", is w_{t,k} ∝ (|δ_{t,k}| + ε)^α:
α = 0 (or equal |δ| across checkpoints) gives the uniform soup, larger α favours the checkpoint
that moved a parameter most.
"""

from __future__ import annotations

from typing import Callable

import torch

from methods.merge.common import StateDict, apply_delta, ordered, stack_deltas
from methods.registry import Param, register


def magnitude_power(abs_deltas: torch.Tensor, *, alpha: float, eps: float) -> torch.Tensor:
    """w_{t,k} = (|δ_{t,k}| + ε)^α / Σ_s (|δ_{s,k}| + ε)^α over the leading (checkpoint) axis.

    Computed as r^α / Σ r^α with r = (|δ|+ε) / max_s(|δ_s|+ε) (the same weights, no overflow or
    underflow for large α); where every |δ_s| + ε is 0 the weights are uniform."""
    magnitude = abs_deltas + eps
    peak = magnitude.amax(dim=0, keepdim=True)
    ratio = torch.where(peak > 0, magnitude / torch.where(peak > 0, peak, 1.0), 1.0)
    powered = ratio.pow(alpha)
    return powered / powered.sum(dim=0, keepdim=True)


WEIGHTINGS: dict[str, Callable[..., torch.Tensor]] = {"magnitude-power": magnitude_power}


def fusion_weights(deltas: torch.Tensor, weighting: str, **params) -> torch.Tensor:
    """Per-element weights (T, *shape) of a stack of task vectors; they sum to 1 over checkpoints."""
    try:
        fn = WEIGHTINGS[weighting]
    except KeyError:
        raise ValueError(f"unknown delta-fusion weighting {weighting!r}; known: {sorted(WEIGHTINGS)}") from None
    return fn(deltas.abs(), **params)


@register("merge", "delta-fusion", params=(
    Param("alpha", float, 1.0, minimum=0.0, doc="exponent α of |δ| in the weights (0 = uniform soup)"),
    Param("eps", float, 1e-12, minimum=0.0, doc="ε added to |δ| before the power"),
    Param("weighting", str, "magnitude-power", choices=tuple(WEIGHTINGS), doc="per-element weighting rule"),
), doc="delta-guided fusion, our unconfirmed reading of CoDiEmb: per-element weights ∝ (|δ|+ε)^α")
def delta_fusion(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
                 score_fn: Callable[[StateDict], float] | None, info: dict | None = None, alpha: float = 1.0,
                 eps: float = 1e-12, weighting: str = "magnitude-power") -> StateDict:
    names, models = ordered(models, names)
    out = {}
    for k in base:
        deltas = stack_deltas(base, models, k)
        weights = fusion_weights(deltas, weighting, alpha=alpha, eps=eps)
        out[k] = apply_delta(base[k], (weights * deltas).sum(dim=0), 1.0)
    return out
