"""Apply a registered delta-pruning method to a whole fine-tuned model.

Tensor by tensor: δ = θ_ft − θ_base in float32, prune δ, write θ_base + pruned δ back in the
fine-tuned tensor's dtype (cast once). Tensors are left at their fine-tuned value when they
match an exclude pattern (the classifier head by default, as in the papers' GLUE code) or have
no counterpart in the base (a new head). Per-tensor statistics are returned for the manifest.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from methods import registry

# Which tensors each official code prunes (spec dpp_merge.md §1.2, §2.2); named and logged.
DEFAULT_EXCLUDE = {
    "encoder": [r"(^|\.)classifier\."],   # MergeLM/DAREx GLUE: everything but the classifier
    "decoder": [],                        # MergeLM LLM code: every parameter
}


# `tensors:` presets of a prune variant. attention-mlp keeps only the transformer blocks' attention
# and MLP tensors (BERT: encoder.layer.N.{attention,intermediate,output} minus LayerNorm; Llama:
# layers.N.{self_attn,mlp}), the common restriction of LLM delta-compression work.
TENSOR_PRESETS = {
    "all": {"encoder": [], "decoder": []},
    "paper": DEFAULT_EXCLUDE,
    "attention-mlp": {"encoder": [r"^(?!.*\.layer\.\d+\.(attention|intermediate|output)\.)", r"LayerNorm"],
                      "decoder": [r"^(?!.*\.layers\.\d+\.(self_attn|mlp)\.)"]},
}


def exclusion(variant: dict, arch: str) -> list[str]:
    """The exclude patterns of a config variant: its explicit ``exclude``, else its ``tensors`` preset."""
    if "exclude" in variant:
        return list(variant["exclude"])
    return list(TENSOR_PRESETS[variant.get("tensors", "paper")][arch])


def excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def prune_state_dict(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                     method: str, params: dict, mask_seed: int, exclude: list[str],
                     pruner: Callable | None = None, *, device: str | torch.device | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Return the pruned state dict and per-tensor stats (or the reason a tensor was kept).
    ``pruner`` replaces the registered function of ``method`` (same calling convention), for
    settings a config cannot hold, such as a q per neuron.

    One tensor at a time is moved to ``device`` (None: the fine-tuned tensor's device), pruned there
    in float32 and brought back: pruned tensors are returned on the CPU, kept ones as given. Random
    masks are drawn on the CPU whatever the device (``methods.prune.dare.keep_mask``) and divisions
    are correctly rounded (``methods.device.divide``), so the element-wise methods give the
    same bits on every device."""
    prune = pruner or registry.get("prune", method).fn
    out: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for name, weight in finetuned.items():
        reason = None
        if not weight.is_floating_point():
            reason = "not floating point"
        elif excluded(name, exclude):
            reason = "excluded by pattern"
        elif name not in base:
            reason = "absent from base (new head)"
        elif base[name].shape != weight.shape:
            raise ValueError(f"tensor {name!r}: base shape {tuple(base[name].shape)} differs from "
                             f"fine-tuned shape {tuple(weight.shape)}; these models cannot share a delta")
        if reason:
            out[name] = weight
            stats[name] = {"pruned": False, "reason": reason}
            continue
        where = weight.device if device is None else device
        base_weight, ft_weight = base[name].to(where, torch.float32), weight.to(where, torch.float32)
        delta = ft_weight - base_weight
        pruned = prune(delta, mask_seed=mask_seed, tensor_name=name, **params)
        # base + (ft - base) can differ from ft in the last bit: entries the method left unchanged
        # take the fine-tuned value itself, so p = 0 (and unscaled survivors) are exact.
        out[name] = torch.where(pruned == delta, ft_weight, base_weight + pruned).to("cpu", weight.dtype)
        nonzero = delta != 0
        stats[name] = {
            "pruned": True,
            "numel": delta.numel(),
            "delta_max_abs": float(delta.abs().max()) if delta.numel() else 0.0,
            "delta_norm": float(delta.norm()),
            "pruned_delta_norm": float(pruned.norm()),
            "kept_fraction": float((pruned[nonzero] != 0).float().mean()) if nonzero.any() else 0.0,
        }
    return out, stats
