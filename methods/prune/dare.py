"""DARE: Drop And REscale (Yu et al., ICML 2024, "Language Models are Super Mario").

For a delta tensor δ = θ_ft − θ_base and drop rate p, every entry is kept with probability 1 − p
and kept entries are rescaled by 1/(1 − p):  DARE(δ)_k = m_k · δ_k / (1 − p),  m_k ~ Bernoulli(1 − p).

Masks come from a CPU float32 generator seeded by (mask seed, tensor name), so a tensor's mask
does not depend on the device, the weight dtype, the order in which tensors are visited or how
many other tensors (or models) are processed. The official code draws ``bernoulli(full_like(δ, p))``
in the weight's dtype on one global stream; in bf16 that turns p = 0.99 into 0.98828 and inflates
the expected delta by 17% (spec dpp_merge.md §1.6), which this construction avoids.

Rescale rules (``rescale_rule``): ``inverse-keep`` is the paper's 1/(1 − p); ``l1-match`` is
mergekit's ``dare_linear`` rescale ‖δ‖₁/‖m ⊙ δ‖₁ on the same mask. ``rescale=False`` is DropOnly
whatever the rule. The other members of the family (``drop-only``, ``darex-q``) live in
``methods/prune/darex.py`` and draw the same mask.
"""

from __future__ import annotations

import torch

from methods.prune.common import RESCALE_RULES, check_drop_rate, f32, rescale_survivors
from methods.registry import Param, register
from methods.seeding import cpu_generator


def keep_mask(shape: torch.Size, drop_rate: float, mask_seed: int, tensor_name: str) -> torch.Tensor:
    """Boolean keep mask, True with probability 1 − drop_rate, from a per-tensor CPU generator."""
    uniform = torch.rand(shape, generator=cpu_generator("dare-mask", mask_seed, tensor_name),
                         dtype=torch.float32, device="cpu")
    return uniform >= drop_rate


def dare_delta(delta: torch.Tensor, drop_rate: float, mask_seed: int, tensor_name: str,
               rescale: bool = True, rescale_rule: str = "inverse-keep") -> torch.Tensor:
    """DARE applied to one delta tensor; returns float32 on the delta's device.

    ``rescale=False`` is the paper's DropOnly ablation (kept entries unscaled);
    ``rescale_rule="l1-match"`` is mergekit's L1-norm rescale (see the module docstring)."""
    drop_rate = check_drop_rate(drop_rate, tensor_name)
    delta = f32(delta)
    if drop_rate == 0.0:
        return delta.clone()
    if drop_rate == 1.0:
        return torch.zeros_like(delta)  # nothing survives; no 1/0 rescale
    keep = keep_mask(delta.shape, drop_rate, mask_seed, tensor_name).to(delta.device)
    return rescale_survivors(delta, keep, drop_rate, rescale, rescale_rule, tensor_name)


@register("prune", "dare", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="fraction p of delta entries dropped"),
    Param("rescale", bool, True, doc="rescale the survivors (False = DropOnly)"),
    Param("rescale_rule", str, "inverse-keep", choices=RESCALE_RULES,
          doc="inverse-keep: x 1/(1-p) (paper); l1-match: x ||d||_1/||m*d||_1 per tensor (mergekit)"),
), doc="DARE: random drop with rate p, survivors rescaled by 1/(1-p) (Yu et al. 2024)")
def dare(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str,
         rescale: bool = True, rescale_rule: str = "inverse-keep") -> torch.Tensor:
    return dare_delta(delta, drop_rate, mask_seed, tensor_name, rescale=rescale, rescale_rule=rescale_rule)
