"""Task Arithmetic (Ilharco et al., ICLR 2023; spec dpp_merge.md §3.1): θ₀ + λ Σ_t δ_t."""

from __future__ import annotations

from typing import Callable

from methods.merge.common import StateDict, apply_delta, ordered, stack_deltas
from methods.registry import Param, register

SCALE = Param("scale", float, 1.0, minimum=0.0, doc="λ, the coefficient of the summed task vectors")


@register("merge", "task-arithmetic", params=(SCALE,),
          doc="task arithmetic: θ0 + λ Σ_t (θ_t − θ0) (Ilharco et al. 2023)")
def task_arithmetic(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
                    score_fn: Callable[[StateDict], float] | None, info: dict | None = None,
                    scale: float = 1.0) -> StateDict:
    """Same as mergekit ``task_arithmetic`` with every weight 1 and ``lambda`` = λ."""
    names, models = ordered(models, names)
    return {k: apply_delta(base[k], stack_deltas(base, models, k).sum(dim=0), scale) for k in base}
