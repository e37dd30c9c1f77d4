"""AdamR: Adam with a decoupled decay of the *delta* θ − θ₀ toward the pre-trained weights.

DAREx-L2 = fine-tune with AdamR-L2, then ordinary DARE (Deng et al., ICLR 2025; spec
dpp_merge.md §2.3): small deltas with small mean and variance are exactly what DARE tolerates at
p = 0.99. AdamR-L1 drives deltas sparse, for magnitude/importance pruning afterwards.

The update follows the released ``AdamR.py`` (AdamS-style "stable" decay): at step t, with the new
second moments v_t and v̂ = v_t/(1 − β₂ᵗ),

    s_t = sqrt( Σ_all params v̂ / N )         (one scalar over every parameter with a gradient; 0 → 1)
    L2:  θ ← θ − λ·η_t/s_t · (θ − θ₀)
    L1:  θ ← θ − λ·η_t/s_t · sign(θ − θ₀)
    θ ← Adam step (torch's own implementation)

so the decay is optimizer-side (not a loss term) and scaled by the gradient RMS. θ₀ is a snapshot of
the parameters when the optimizer is built (the fine-tuning code builds it right after loading the
base checkpoint, so θ₀ = base weights; a freshly initialised head decays toward its own initial
value, whereas the official reference is a separately loaded base model whose head has another
random initialisation). Only parameters with a
gradient are decayed or counted in N. Unlike the official code θ₀ stays on the parameter's device
and is not deep-copied every step. θ₀ is not part of ``state_dict()``: to resume, build the
optimizer while the model holds the base weights, then load the model checkpoint and the optimizer
state.

``strength`` is the official ``weight_decay`` λ. The budget's ``weight_decay`` (decay toward 0) is
*not* part of AdamR and is ignored unless ``decay_to_zero`` is set, in which case it is applied
exactly as AdamW applies it (same parameter groups: no decay on biases and norms); so
``strength = 0`` gives torch Adam (``decay_to_zero`` false) or the registered ``adamw``
(``decay_to_zero`` true), step for step.
"""

from __future__ import annotations

import math

import torch

from methods.finetune.loop import param_groups
from methods.registry import Param, register


class AdamR(torch.optim.AdamW):
    """torch AdamW plus the AdamR delta decay (``l1=False``: L2, ``True``: L1) toward ``theta0``.

    The decay is applied before AdamW's own step, from the second moments that step is about to
    store, as the official code orders it; with ``strength == 0`` this class *is* AdamW."""

    def __init__(self, params, *, lr: float, strength: float, l1: bool = False, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not strength >= 0:
            raise ValueError(f"AdamR strength must be >= 0, got {strength}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.strength, self.l1 = float(strength), bool(l1)
        # θ₀: kept outside ``self.state`` so that AdamW's lazy state initialisation is unaffected
        self.theta0 = {p: p.detach().clone() for group in self.param_groups for p in group["params"]}

    def _gradient_rms(self) -> float:
        """s_t of the official code: sqrt of the mean bias-corrected second moment after this step's
        update, over every parameter with a gradient (summed on the device, one sync per step)."""
        total, count = None, 0
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                step = float(state["step"]) + 1 if "step" in state else 1.0
                v = p.grad * p.grad * (1 - beta2)
                if "exp_avg_sq" in state:
                    v = state["exp_avg_sq"] * beta2 + v
                part = v.sum(dtype=torch.float64) / (1 - beta2 ** step)
                total = part if total is None else total + part.to(total.device)
                count += p.numel()
        rms = math.sqrt(float(total) / count) if count else 0.0
        return rms if rms != 0 else 1.0

    @torch.no_grad()
    def step(self, closure=None):
        if self.strength != 0:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
                closure = None
            else:
                loss = None
            scale = self.strength / self._gradient_rms()
            for group in self.param_groups:
                lr = float(group["lr"])
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    drift = p - self.theta0[p]
                    p.sub_(drift.sign() if self.l1 else drift, alpha=lr * scale)
            super().step()
            return loss
        return super().step(closure)


def _adamr(model: torch.nn.Module, l1: bool, lr: float, weight_decay: float, beta1: float, beta2: float,
           eps: float, strength: float, decay_to_zero: bool) -> AdamR:
    groups = param_groups(model, weight_decay if decay_to_zero else 0.0)
    return AdamR(groups, lr=lr, strength=strength, l1=l1, betas=(beta1, beta2), eps=eps)


_PARAMS = (
    Param("beta1", float, 0.9, minimum=0.0, maximum=1.0),
    Param("beta2", float, 0.999, minimum=0.0, maximum=1.0),
    Param("eps", float, 1e-8, minimum=0.0),
    Param("strength", float, 1e-4, minimum=0.0,
          doc="lambda of the decay toward the pre-trained weights (official default 1e-4; 0 = Adam/AdamW)"),
    Param("decay_to_zero", bool, False,
          doc="also apply the budget's weight_decay toward 0 as AdamW does (not in the official AdamR)"),
)


@register("finetune", "adamr-l2", params=_PARAMS,
          doc="AdamR-L2 (DAREx): Adam + decoupled decay of theta - theta0, scaled by 1/sqrt(mean v-hat)")
def adamr_l2(model: torch.nn.Module, *, lr: float, weight_decay: float, beta1: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8, strength: float = 1e-4,
             decay_to_zero: bool = False) -> torch.optim.Optimizer:
    return _adamr(model, False, lr, weight_decay, beta1, beta2, eps, strength, decay_to_zero)


@register("finetune", "adamr-l1", params=_PARAMS,
          doc="AdamR-L1 (DAREx): Adam + decoupled sign(theta - theta0) decay, for sparse deltas")
def adamr_l1(model: torch.nn.Module, *, lr: float, weight_decay: float, beta1: float = 0.9,
             beta2: float = 0.999, eps: float = 1e-8, strength: float = 1e-4,
             decay_to_zero: bool = False) -> torch.optim.Optimizer:
    return _adamr(model, True, lr, weight_decay, beta1, beta2, eps, strength, decay_to_zero)
