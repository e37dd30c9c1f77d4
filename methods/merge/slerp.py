"""Spherical linear interpolation of two models' full weights (as mergekit 0.1.5 ``slerp``).

Per tensor, both weight tensors are flattened; the angle comes from normalised copies
(a norm ≤ 1e-8 counts as 1) with the cosine clamped to [−1, 1]; if |cos| > 0.9995 (nearly
colinear or antipodal — mergekit's threshold) the result is the linear interpolation
(1−t)·θ_a + t·θ_b, otherwise sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b. t = 0 gives θ_a,
t = 1 gives θ_b. θ_a is the model whose name sorts first (mergekit: the ``base_model``); the
suite's base model is not used.

Fine-tunes of one pre-trained model usually differ by a tiny fraction of the weight norm, so most
tensors are nearly colinear and SLERP reduces to LERP there; the names of the tensors that fell
back are recorded in info (``slerp_lerp_tensors``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from methods.merge.common import StateDict, f32, ordered, record, scalar_like
from methods.registry import Param, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_tensor(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(interpolated tensor, whether it fell back to lerp); float32 in, float32 out."""
    a, b = f32(a), f32(b)
    if a.numel() == 0:
        return (1 - t) * a + t * b, True
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, scalar_like(1.0, norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, scalar_like(1.0, norm_b))
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b, True
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b, False


@register("merge", "slerp", params=(
    Param("t", float, 0.5, minimum=0.0, maximum=1.0, doc="interpolation position: 0 = first model (by name), 1 = second"),
), doc="SLERP of exactly two models' full weights, per tensor (mergekit semantics; lerp when nearly colinear)",
   n_models=(2, 2))
def slerp(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
          score_fn: Callable[[StateDict], float] | None, info: dict | None = None, t: float = 0.5) -> StateDict:
    names, models = ordered(models, names)
    if len(models) != 2:
        raise ValueError(f"slerp merges exactly two models, got {len(models)}: {names}")
    out, lerped = {}, []
    for k in base:
        out[k], fell_back = slerp_tensor(t, models[0][k], models[1][k])
        if fell_back:
            lerped.append(k)
    record(info, slerp_order=names, slerp_lerp_tensors=lerped)
    return out
