"""Helpers shared by the delta-pruning methods: rate checks, exact drop counts, survivor rescales.

Every function takes and returns float32 tensors; a method casts its input once with ``f32``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from methods.device import divide

# How survivors of a drop are rescaled (spec dpp_merge.md §1.1, §3.6):
#   inverse-keep  × 1/(1 − p), the DARE paper / MergeLM (unbiased in expectation);
#   l1-match      × ‖δ‖₁ / ‖m ⊙ δ‖₁, mergekit ≥ a2dda31 (data-dependent, exact in L1 per tensor).
RESCALE_RULES = ("inverse-keep", "l1-match")


def f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32)


def check_drop_rate(drop_rate: float, tensor_name: str) -> float:
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"tensor {tensor_name!r}: drop_rate must lie in [0, 1], got {drop_rate}")
    return float(drop_rate)


def drop_count(n: int, drop_rate: float) -> int:
    """⌊p·n⌋, with p read as the decimal it is written as.

    Binary floating point would make ``int(0.29 * 100)`` = 28 and ``int((1 - 0.9) * 10)`` = 0;
    ``Fraction(repr(p))`` is the shortest decimal that round-trips, so 0.29·100 is exactly 29.
    ⌊p·n⌋ entries dropped is the count MergeLM's magnitude pruning (``kthvalue(int(numel·p))``, for
    distinct magnitudes) and Wanda (``int(cols·p)`` per row) drop."""
    return math.floor(Fraction(repr(float(drop_rate))) * n)


def zero_like(delta: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=delta.device)


def l1_match(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """m ⊙ δ rescaled so that its L1 norm equals ‖δ‖₁ (mergekit ``rescale: true``).

    No non-zero survivor → all zeros (nothing to rescale). mergekit also skips the rescale when
    either norm is below 1e-7; we rescale whenever something survives, so ‖δ‖₁ is preserved exactly
    up to float32 rounding. (Same rule as ``methods.merge.common.l1_rescale``; duplicated here so
    that the prune package does not import the merge package, which imports it.)"""
    masked = torch.where(keep, delta, zero_like(delta))
    after = masked.abs().sum()
    if after == 0:
        return masked
    # float32 sums, as mergekit and methods.merge.common do, so that the two give equal tensors
    return masked * (delta.abs().sum() / after)


def rescale_survivors(delta: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: bool,
                      rescale_rule: str, tensor_name: str) -> torch.Tensor:
    """Zero the dropped entries of a float32 δ and rescale the survivors by the named rule."""
    if rescale_rule not in RESCALE_RULES:
        raise ValueError(f"tensor {tensor_name!r}: rescale_rule must be one of {list(RESCALE_RULES)}, "
                         f"got {rescale_rule!r}")
    if rescale and rescale_rule == "l1-match":
        return l1_match(delta, keep)
    # p = 1 keeps nothing; skipping the factor avoids 1/0 (and 0·inf = NaN) on the zeroed entries
    kept = divide(delta, 1.0 - drop_rate) if rescale and drop_rate < 1.0 else delta
    return torch.where(keep, kept, zero_like(delta))
