"""DARE + Task Arithmetic (spec dpp_merge.md §1.5, §3.4, §3.6): θ₀ + λ Σ_t DARE(δ_t).

Masks come from the suite's per-(seed, model name, tensor) CPU float32 generator
(``methods.prune.dare.keep_mask`` with tensor name ``"<model>/<tensor>"``), so a model's masks do
not depend on the order or number of merged models. ``"paper"`` (MergeLM) rescales survivors by
1/(1−p); ``"mergekit"`` (``dare_linear``, weights 1, normalize false) rescales each tensor's
survivors by ‖δ‖₁/‖m⊙δ‖₁ (no survivor → 0).
"""

from __future__ import annotations

from typing import Callable

from methods.merge.common import StateDict, apply_delta, ordered, stack_dare_deltas
from methods.merge.task_arithmetic import SCALE
from methods.merge.ties import DROP_RATE, SEMANTICS
from methods.registry import register


@register("merge", "dare-ta", params=(DROP_RATE, SCALE, SEMANTICS),
          doc="DARE each task vector (drop p), then task arithmetic θ0 + λ Σ (Yu et al. 2024)")
def dare_ta(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
            score_fn: Callable[[StateDict], float] | None, info: dict | None = None, drop_rate: float = 0.9,
            scale: float = 1.0, semantics: str = "paper") -> StateDict:
    names, models = ordered(models, names)
    return {k: apply_delta(base[k], stack_dare_deltas(base, models, names, k, drop_rate, seed, semantics).sum(dim=0),
                           scale) for k in base}
