"""TIES-Merging (Yadav et al., NeurIPS 2023) and DARE+TIES (spec dpp_merge.md §3.2, §3.4, §3.6).

Two semantics, never mixed inside one table (spec §8):

* ``"paper"`` — the official TIES code (prateeky2806/ties-merging ``merge_utils.py``) and MergeLM:
  trim each task vector to its top-``density`` entries by magnitude (``granularity="model"``: over
  the whole flattened task vector of a model, as the official code; ``"tensor"``: per tensor),
  elect γ = sign(Σ_t τ̂_t), give entries with γ = 0 the majority sign sign(Σ_k γ_k) (over the
  whole model or per tensor, following ``granularity``; +1 if that sum is 0), average the
  agreeing non-zero entries (÷ their count, clamped ≥ 1) and add λ·τ_m to θ₀.
  Trim ties: entries whose magnitude equals the threshold (the ⌊density·n⌋-th largest, at least
  one entry) are all kept, so ties may keep a few more entries; with distinct magnitudes exactly
  max(1, ⌊density·n⌋) survive (the official code keeps one more). peft's ``ties`` equals this with
  ``granularity="tensor"`` except that it breaks γ = 0 with +1.
* ``"mergekit"`` — mergekit 0.1.5 ``ties`` / ``dare_ties`` with every weight 1: always per tensor
  (``granularity`` is ignored), keep exactly max(1, ⌊density·n⌋) entries (lower flat index first
  among equal magnitudes), majority sign = sign of Σ_t τ̂_t with 0 → +1, sum the agreeing entries,
  ``ties`` divides by their count (normalize: true; 0 → 1), ``dare_ties`` does not (sum), × λ.
"""

from __future__ import annotations

from typing import Callable

import torch

from methods.merge.common import (StateDict, apply_delta, ordered, record, sign_consensus, stack_dare_deltas,
                                  stack_deltas, ties_paper, trim_top_exact)
from methods.merge.task_arithmetic import SCALE
from methods.registry import Param, register

DENSITY = Param("density", float, 0.2, minimum=0.0, maximum=1.0,
                doc="fraction of each task vector KEPT by magnitude (TIES k; 0.2 = the paper's top-20%; "
                    "at least one entry per trimmed vector unless 0, which keeps nothing)")
DARE_TIES_DENSITY = Param("density", float, 0.2, minimum=0.0, maximum=1.0,
                          doc="paper semantics: TIES trim kept fraction applied after DARE (double sparsification); "
                              "ignored with semantics 'mergekit'")
GRANULARITY = Param("granularity", str, "model", choices=("model", "tensor"),
                    doc="paper semantics: trim over each model's whole task vector (official code) or per tensor")
SEMANTICS = Param("semantics", str, "paper", choices=("paper", "mergekit"),
                  doc="'paper' = official TIES/MergeLM code; 'mergekit' = mergekit 0.1.5 with weights 1")
DROP_RATE = Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0,
                  doc="DARE drop rate p (mergekit density = 1 − p)")


def _merge(base: StateDict, stacks: Callable[[str], torch.Tensor], n_models: int, *, density: float,
           scale: float, granularity: str, semantics: str, normalize: bool, trim: bool) -> StateDict:
    if semantics == "paper":
        merged = ties_paper(base.keys(), stacks, n_models, density, granularity)
        return {k: apply_delta(base[k], merged[k], scale) for k in base}
    if semantics != "mergekit":
        raise ValueError(f"semantics must be 'paper' or 'mergekit', got {semantics!r}")
    out = {}
    for k in base:
        deltas = stacks(k)
        if trim:
            deltas = torch.stack([trim_top_exact(d, density) for d in deltas])
        out[k] = apply_delta(base[k], sign_consensus(deltas, normalize=normalize), scale)
    return out


@register("merge", "ties", params=(DENSITY, SCALE, GRANULARITY, SEMANTICS),
          doc="TIES: trim to top-density by magnitude, elect sign, disjoint mean, θ0 + λ·τ (Yadav et al. 2023)")
def ties(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
         score_fn: Callable[[StateDict], float] | None, info: dict | None = None, density: float = 0.2,
         scale: float = 1.0, granularity: str = "model", semantics: str = "paper") -> StateDict:
    names, models = ordered(models, names)
    if semantics == "mergekit":
        record(info, notes=["semantics 'mergekit' trims per tensor; granularity is ignored"])
    return _merge(base, lambda k: stack_deltas(base, models, k), len(models), density=density, scale=scale,
                  granularity=granularity, semantics=semantics, normalize=True, trim=True)


@register("merge", "dare-ties", params=(DROP_RATE, DARE_TIES_DENSITY, SCALE, GRANULARITY, SEMANTICS),
          doc="DARE then TIES: paper = MergeLM (÷(1−p), then full TIES); mergekit = dare_ties (L1 rescale, signed sum)")
def dare_ties(base: StateDict, models: list[StateDict], *, names: list[str], seed: int,
              score_fn: Callable[[StateDict], float] | None, info: dict | None = None, drop_rate: float = 0.9,
              density: float = 0.2, scale: float = 1.0, granularity: str = "model",
              semantics: str = "paper") -> StateDict:
    """``"paper"`` (MergeLM ``mask_merging`` + ``ties_merging``): each δ_t is DARE'd (survivors
    ÷(1−p)), then TIES trims again to ``density`` (double sparsification), elects signs and takes
    the disjoint mean; × λ. ``"mergekit"`` (``dare_ties``): DARE mask with L1-norm rescale, sign
    consensus on the sum, the agreeing entries are SUMMED (normalize false), × λ; ``density`` and
    ``granularity`` are not used (noted in info). Masks: see ``common.dare``."""
    names, models = ordered(models, names)
    if semantics == "mergekit":
        record(info, notes=["semantics 'mergekit': density and granularity are ignored "
                            "(mergekit dare_ties' density is our 1 − drop_rate)"])
    return _merge(base, lambda k: stack_dare_deltas(base, models, names, k, drop_rate, seed, semantics),
                  len(models), density=density, scale=scale, granularity=granularity, semantics=semantics,
                  normalize=False, trim=False)
