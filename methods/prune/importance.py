"""Importance-based delta pruning: magnitude (MP) and Wanda-style activation-weighted pruning.

DAREx (Deng et al., ICLR 2025, §2.4 of spec dpp_merge.md) finds that when delta parameters are
large (continual pre-training, long or high-lr fine-tuning) random DPP collapses already at
moderate p while importance-based DPP survives, and that MP + rescale is worse than MP alone; so
neither method rescales by default.

**Exact counts.** Both keep exactly n − ⌊p·n⌋ entries of each comparison group (n entries), the
count the official codes drop (MergeLM ``kthvalue(int(numel·p))``, Wanda ``int(cols·p)`` per row),
with p read as the decimal it is written as (``common.drop_count``). This is ⌈(1 − p)·n⌉, which
differs from the spec's ⌊(1 − p)·n⌋ (§7.16) by one when p·n is not an integer. Unlike MergeLM's
``|δ| <= kth value`` rule, ties never drop more than ⌊p·n⌋ entries: entries are ordered by a
*stable* ascending sort of the score and the first ⌊p·n⌋ are dropped, so among equal scores the
lower flat index is dropped first (Wanda's ``torch.sort(stable=True)`` rule). The order does not
depend on the device.

**Comparison groups.** ``magnitude``: the whole tensor (MergeLM's per-tensor MP). ``importance``:
each output row of a 2-D weight (Wanda's per-output group; the weight layout is nn.Linear's
[out, in]); score S_ij = |ΔW_ij|·‖X_j‖₂ with ‖X_j‖₂ the L2 norm of input feature j over the
calibration tokens (``methods.prune.calibration``), never DAREx's signed mean.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Mapping

import torch

from methods.prune.calibration import load_vectors
from methods.prune.common import RESCALE_RULES, check_drop_rate, drop_count, f32, rescale_survivors
from methods.registry import Param, register


def lowest_first_keep(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Keep mask over the last dimension: drop the ``n_drop`` lowest scores of each row (stable
    ascending order, so the lower index of a tie goes first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_drop == 0:
        return keep
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :n_drop]
    return keep.scatter(-1, order, False)


def magnitude_keep_mask(delta: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Per-tensor top-(n − ⌊p·n⌋) of |δ| (ties: lower flat index dropped first)."""
    flat = f32(delta).abs().reshape(-1)
    return lowest_first_keep(flat, drop_count(flat.numel(), drop_rate)).reshape(delta.shape)


def wanda_keep_mask(delta: torch.Tensor, norms: torch.Tensor | None, drop_rate: float,
                    tensor_name: str = "?") -> torch.Tensor:
    """Per-output-row Wanda mask for a 2-D delta [out, in] with input norms [in].

    ``norms=None`` scores by |δ| alone (Wanda with equal norms = per-row MP); a 1-D (or 0-d) delta
    is one row. Each row drops exactly ⌊p·cols⌋ entries."""
    delta = f32(delta)
    if delta.dim() <= 1:
        rows = delta.reshape(1, -1).abs()
    elif delta.dim() == 2:
        rows = delta.abs()
    else:
        rows = delta.abs().reshape(delta.shape[0], -1)
    if norms is not None:
        if delta.dim() != 2:
            raise ValueError(f"tensor {tensor_name!r}: activation norms need a 2-D [out, in] weight, "
                             f"got shape {tuple(delta.shape)}")
        norms = f32(norms).to(delta.device).reshape(-1)
        if norms.numel() != delta.shape[1]:
            raise ValueError(f"tensor {tensor_name!r}: {norms.numel()} activation norms for "
                             f"{delta.shape[1]} input features")
        rows = rows * norms.unsqueeze(0)
    keep = lowest_first_keep(rows, drop_count(rows.shape[-1], drop_rate))
    return keep.reshape(delta.shape)


@register("prune", "magnitude", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="fraction p of delta entries dropped"),
    Param("rescale", bool, False, doc="rescale survivors (the DAREx/DARE papers report MP + rescale is worse)"),
    Param("rescale_rule", str, "inverse-keep", choices=RESCALE_RULES,
          doc="inverse-keep: x 1/(1-p) (MergeLM); l1-match: x ||d||_1/||m*d||_1 (mergekit)"),
), doc="magnitude pruning of deltas: keep the n - floor(p*n) largest |delta| per tensor (ties by index)")
def magnitude(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str,
              rescale: bool = False, rescale_rule: str = "inverse-keep") -> torch.Tensor:
    """Deterministic: ``mask_seed`` is accepted for the common calling convention and unused."""
    drop_rate = check_drop_rate(drop_rate, tensor_name)
    delta = f32(delta)
    if drop_rate == 0.0:
        return delta.clone()
    keep = magnitude_keep_mask(delta, drop_rate)
    return rescale_survivors(delta, keep, drop_rate, rescale, rescale_rule, tensor_name)


# --- Wanda-style importance -------------------------------------------------------------------

WITHOUT_NORMS = ("row-magnitude", "keep", "error")


@lru_cache(maxsize=4)
def _load_norms(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    return load_vectors(path)


def norms_lookup(norms: str | os.PathLike | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """A norms mapping from a mapping or a safetensors path (cached, so a whole model loads it once)."""
    if norms is None:
        raise ValueError("importance pruning needs activation norms: pass 'norms', a mapping or a "
                         "safetensors file from methods.prune.calibration (input_norms + save_vectors)")
    if isinstance(norms, Mapping):
        return norms
    path = os.fspath(norms)
    return _load_norms(path, os.stat(path).st_mtime_ns)


def importance_delta(delta: torch.Tensor, drop_rate: float, tensor_name: str,
                     norms: str | os.PathLike | Mapping[str, torch.Tensor] | None,
                     without_norms: str = "row-magnitude", rescale: bool = False,
                     rescale_rule: str = "inverse-keep") -> torch.Tensor:
    """Wanda for deltas on one tensor: per output row drop the ⌊p·cols⌋ smallest |ΔW_ij|·‖X_j‖₂.

    Tensors with no norms (biases, LayerNorm, embeddings: no nn.Linear input) follow
    ``without_norms``: ``row-magnitude`` prunes them per row by |δ| (what Wanda gives with equal
    norms; a 1-D tensor is one row), ``keep`` leaves them unpruned, ``error`` refuses."""
    drop_rate = check_drop_rate(drop_rate, tensor_name)
    if without_norms not in WITHOUT_NORMS:
        raise ValueError(f"tensor {tensor_name!r}: without_norms must be one of {list(WITHOUT_NORMS)}, "
                         f"got {without_norms!r}")
    delta = f32(delta)
    if drop_rate == 0.0:
        return delta.clone()
    table = norms_lookup(norms)
    tensor_norms = table.get(tensor_name)
    if tensor_norms is None:
        if without_norms == "error":
            raise KeyError(f"tensor {tensor_name!r}: no activation norms (the norms cover "
                           f"{len(table)} nn.Linear weights)")
        if without_norms == "keep":
            return delta.clone()
    keep = wanda_keep_mask(delta, tensor_norms, drop_rate, tensor_name)
    return rescale_survivors(delta, keep, drop_rate, rescale, rescale_rule, tensor_name)


def importance_pruner(norms: Mapping[str, torch.Tensor], **options):
    """A per-tensor callable with the registry's calling convention and the norms bound, for code
    that prunes outside ``prune_state_dict``: ``fn(delta, drop_rate=…, mask_seed=…, tensor_name=…)``."""
    def prune(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str, **params):
        return importance(delta, drop_rate=drop_rate, mask_seed=mask_seed, tensor_name=tensor_name,
                          norms=norms, **{**options, **params})
    return prune


@register("prune", "importance", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="fraction p dropped in every output row"),
    Param("norms", str, None, doc="safetensors file of per-input-feature activation L2 norms keyed "
                                  "'<linear>.weight' (methods.prune.calibration); the workflow step "
                                  "that calibrates sets it (a mapping is accepted from Python)"),
    Param("without_norms", str, "row-magnitude", choices=WITHOUT_NORMS,
          doc="tensors with no norms: prune per row by |delta|, keep them, or fail"),
    Param("rescale", bool, False, doc="rescale survivors (Wanda/DAREx: no)"),
    Param("rescale_rule", str, "inverse-keep", choices=RESCALE_RULES, doc="as for dare"),
), doc="Wanda-style delta pruning: per output row keep the largest |delta_ij|*||X_j||_2")
def importance(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str,
               norms=None, without_norms: str = "row-magnitude", rescale: bool = False,
               rescale_rule: str = "inverse-keep") -> torch.Tensor:
    """Deterministic: ``mask_seed`` is accepted for the common calling convention and unused."""
    return importance_delta(delta, drop_rate, tensor_name, norms, without_norms, rescale, rescale_rule)
