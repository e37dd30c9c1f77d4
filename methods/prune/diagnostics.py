"""Delta diagnostics: how large, how spread and how pruneable a fine-tune's deltas are.

DAREx's analysis (spec dpp_merge.md §2.1) says DARE's output perturbation on neuron i has variance
p/(1 − p)·Σ_j c_ij², c_ij = ΔW_ij·x_j, so it fails when p is large *or* when the deltas have a large
mean/variance; the DARE paper says it works when max|δ| ≲ 0.002–0.005 and not at ~0.03. These
functions measure exactly those quantities, per tensor and per layer, plus DONOD's two norms
(§5): **Delta of Norm** ‖θ_ft‖_F − ‖θ₀‖_F (signed norm drift; positive when fine-tuning grew the
weights — DONOD writes it before-minus-after, the opposite sign) and **Norm of Delta** ‖δ‖_F
(task-vector size). |DON| ≤ NOD always (triangle inequality). Run them on (base, pruned) to log
NOD after DPP (DARE inflates it: E NOD² = ‖δ‖²/(1 − p)).

``recommend`` implements the DPP-method decision procedure reconstructed from DAREx's Fig. 4
flowchart (spec §2.6; the figure itself is unverified): large deltas → importance-based DPP;
small deltas at low p → DARE; small deltas and control over fine-tuning → AdamR-L2 + DARE
(DAREx-L2); small deltas post hoc → DAREx-q with the q rule the available data allows.

All rows are flat dicts of Python scalars, ready for ``pandas.DataFrame(rows)``. Statistics are
computed in float64 from the float32 delta; variances are population variances.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import torch

from methods.prune.apply import excluded

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, from ``layers.3.`` / ``layer.3.`` (BERT) /
    ``h.3.`` (GPT-2) / ``blocks.3.``; None for embeddings, heads and other tensors."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _contribution_stats(delta: torch.Tensor, mean_input: torch.Tensor | None) -> dict:
    """DAREx terms of one tensor, with c_ij = δ_ij·x̄_j (x̄ = 1 without calibration means).

    A 2-D tensor is read as an nn.Linear [out, in] weight; any other tensor as one entry per row
    (a bias or norm: input 1). ``c_sq_row_sum`` is the mean over rows of Σ_j c_ij², the p-free factor
    of DARE's output variance p/(1 − p)·Σ_j c_ij²."""
    d = delta.to(torch.float64)
    c = d.reshape(d.shape[0], -1) if d.dim() >= 2 else d.reshape(-1, 1)
    if mean_input is not None and d.dim() == 2:
        c = c * mean_input.to(device=c.device, dtype=torch.float64).reshape(1, -1)
    return {"c_mean": float(c.mean()), "c_var": float(c.var(correction=0)) if c.numel() else 0.0,
            "c_sq_row_sum": float(c.pow(2).sum(1).mean()), "c_rows": int(c.shape[0])}


def dare_output_std(c_sq_row_sum: float, drop_rate: float) -> float:
    """sqrt(p/(1 − p)·Σ_j c_ij²): the standard deviation of DARE's output change on a typical
    neuron (inf at p = 1)."""
    if drop_rate >= 1.0:
        return math.inf
    return math.sqrt(drop_rate / (1.0 - drop_rate) * c_sq_row_sum)


def tensor_diagnostics(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *,
                       exclude: Iterable[str] = (), input_means: Mapping[str, torch.Tensor] | None = None,
                       drop_rate: float | None = None, device: str | torch.device | None = None) -> list[dict]:
    """One row per floating tensor that both models have and no ``exclude`` regex matches, computed
    one tensor at a time on ``device`` (None: the fine-tuned tensor's device). The float64 sums may
    differ between devices in the last bits (their order of summation does).

    Columns: tensor, layer, numel, mean, var, max_abs (of δ), norm_base, norm_finetuned,
    delta_of_norm (‖θ_ft‖ − ‖θ₀‖), norm_of_delta (‖δ‖_F), the DAREx terms c_mean, c_var,
    c_sq_row_sum, c_rows and c_inputs ("mean activation" with ``input_means`` for that tensor, else
    "ones"), and with ``drop_rate`` the predicted ``dare_output_std``."""
    patterns = list(exclude)
    rows = []
    for name, weight in finetuned.items():
        if not weight.is_floating_point() or name not in base or excluded(name, patterns):
            continue
        if base[name].shape != weight.shape:
            raise ValueError(f"tensor {name!r}: base shape {tuple(base[name].shape)} differs from "
                             f"fine-tuned shape {tuple(weight.shape)}")
        where = weight.device if device is None else device
        theta0 = base[name].to(where, torch.float32)
        theta = weight.to(where, torch.float32)
        delta = (theta - theta0).to(torch.float64)
        mean_input = input_means.get(name) if input_means is not None else None
        norm_base, norm_ft = float(theta0.to(torch.float64).norm()), float(theta.to(torch.float64).norm())
        row = {
            "tensor": name, "layer": layer_index(name), "numel": delta.numel(),
            "mean": float(delta.mean()) if delta.numel() else 0.0,
            "var": float(delta.var(correction=0)) if delta.numel() else 0.0,
            "max_abs": float(delta.abs().max()) if delta.numel() else 0.0,
            "norm_base": norm_base, "norm_finetuned": norm_ft,
            "delta_of_norm": norm_ft - norm_base, "norm_of_delta": float(delta.norm()),
            **_contribution_stats(delta, mean_input),
            "c_inputs": "mean activation" if mean_input is not None and delta.dim() == 2 else "ones",
        }
        if drop_rate is not None:
            row["dare_output_std"] = dare_output_std(row["c_sq_row_sum"], drop_rate)
        rows.append(row)
    return rows


def _pool(rows: list[dict], key_mean: str, key_var: str, weight: str) -> tuple[float, float]:
    """Pooled population mean and variance of several groups from their (n, mean, var)."""
    n = sum(r[weight] for r in rows)
    if n == 0:
        return 0.0, 0.0
    mean = sum(r[weight] * r[key_mean] for r in rows) / n
    second = sum(r[weight] * (r[key_var] + r[key_mean] ** 2) for r in rows) / n
    return mean, max(0.0, second - mean ** 2)


def _aggregate(group: str, rows: list[dict]) -> dict:
    mean, var = _pool(rows, "mean", "var", "numel")
    c_mean, c_var = _pool(rows, "c_mean", "c_var", "numel")   # c has one entry per delta entry
    total_rows = sum(r["c_rows"] for r in rows)
    out = {
        "layer": group, "tensors": len(rows), "numel": sum(r["numel"] for r in rows),
        "mean": mean, "var": var, "max_abs": max((r["max_abs"] for r in rows), default=0.0),
        "delta_of_norm": sum(r["delta_of_norm"] for r in rows),           # DON_l: Σ over tensors
        "norm_of_delta": sum(r["norm_of_delta"] for r in rows),           # NOD_l: Σ over tensors
        "delta_norm": math.sqrt(sum(r["norm_of_delta"] ** 2 for r in rows)),  # ‖concatenated δ_l‖_F
        "c_mean": c_mean, "c_var": c_var,
        "c_sq_row_sum": sum(r["c_sq_row_sum"] * r["c_rows"] for r in rows) / total_rows if total_rows else 0.0,
    }
    if rows and all("dare_output_std" in r for r in rows):
        out["dare_output_std_max"] = max(r["dare_output_std"] for r in rows)
    return out


def layer_diagnostics(tensor_rows: Iterable[Mapping]) -> list[dict]:
    """Aggregate ``tensor_diagnostics`` rows per transformer block (``layer`` = its index), one row
    ``"other"`` for tensors outside blocks (embeddings, pooler, final norm, head) and one ``"model"``
    row over everything. DON and NOD of a group are sums over its tensors (DONOD sums over weight
    matrices); ``delta_norm`` is the Frobenius norm of the group's concatenated delta; mean and var are
    pooled over all entries; ``c_sq_row_sum`` is averaged over all rows."""
    rows = [dict(r) for r in _records(tensor_rows)]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["layer"] if r["layer"] is not None else "other", []).append(r)
    ordered = sorted((k for k in groups if k != "other"), key=int) + (["other"] if "other" in groups else [])
    out = [_aggregate(k, groups[k]) for k in ordered]
    if rows:
        out.append(_aggregate("model", rows))
    return out


def _records(diagnostics) -> list[Mapping]:
    if hasattr(diagnostics, "to_dict"):      # a pandas DataFrame
        return diagnostics.to_dict("records")
    return list(diagnostics)


# --- the DAREx decision procedure --------------------------------------------------------------


def recommend(diagnostics, *, drop_rate: float, arch: str = "encoder", can_finetune: bool = False,
              labelled_data: bool = False, unlabelled_data: bool = False, lora: bool = False,
              structured: bool = False, large_delta: float = 0.03, small_delta: float = 0.005,
              low_rate: float = 0.5) -> dict:
    """Which DPP method to use, and why (spec §2.6, DAREx Fig. 4 as reconstructed).

    ``diagnostics``: rows of ``tensor_diagnostics`` or ``layer_diagnostics`` (or a DataFrame of
    them); pass only the tensors that will be pruned (``exclude``), since one outlier tensor sets
    max|δ|. Delta regime from max|δ|: ``large`` above ``large_delta`` (0.03, where the DARE paper
    calls DARE impractical: continually pre-trained models), ``small`` up to ``small_delta`` (0.005,
    DARE's stated range), ``moderate`` between. Then, in order:

    1. large → importance-based DPP: AdamR-L1 then magnitude if you control fine-tuning, else
       ``importance`` (Wanda) when any calibration text exists, else ``magnitude``;
    2. small and p ≤ ``low_rate`` → plain ``dare`` (q ≈ 1 − p is already near-optimal);
    3. you control fine-tuning → AdamR-L2 then ``dare`` (DAREx-L2);
    4. post hoc → ``darex-q``, q from labelled validation data (encoders: per-layer analytic q with
       η tuned on validation; decoders: one global q, which DAREx finds better for decoders), else
       from unlabelled text (global q minimising the output change / top-5 logit MSE), else a fixed q.

    ``structured`` swaps the pruning method for ``structural`` (same q rule); ``lora`` notes that
    the delta to prune is the LoRA product (α/r)·B·A. Returns one flat row."""
    rows = _records(diagnostics)
    if not rows:
        raise ValueError("no diagnostics rows: nothing would be pruned")
    if arch not in ("encoder", "decoder"):
        raise ValueError(f"arch must be 'encoder' or 'decoder', got {arch!r}")
    max_abs = max(float(r["max_abs"]) for r in rows)
    regime = "large" if max_abs > large_delta else "small" if max_abs <= small_delta else "moderate"
    size = f"max|delta| = {max_abs:.3g} ({regime}: small <= {small_delta:g}, large > {large_delta:g})"
    finetune, q_rule = None, None
    if regime == "large":
        if can_finetune:
            finetune, method = "adamr-l1", "magnitude"
            reason = f"{size}: random DPP fails on large deltas; AdamR-L1 makes deltas sparse for magnitude pruning"
        elif labelled_data or unlabelled_data:
            method = "importance"
            reason = f"{size}: random DPP fails on large deltas; Wanda-style importance with calibration activations"
        else:
            method = "magnitude"
            reason = f"{size}: random DPP fails on large deltas; no calibration data, so magnitude pruning"
    elif regime == "small" and drop_rate <= low_rate:
        method, q_rule = "dare", "q = 1 - p"
        reason = f"{size} and p = {drop_rate:g} <= {low_rate:g}: plain DARE is already near-optimal"
    elif can_finetune:
        finetune, method, q_rule = "adamr-l2", "dare", "q = 1 - p (optionally tune q as for darex-q)"
        reason = f"{size}, p = {drop_rate:g}: AdamR-L2 keeps delta mean/variance small, then DARE (DAREx-L2)"
    else:
        method = "darex-q"
        if labelled_data and arch == "encoder":
            q_rule = "per-layer analytic q (analytic_q), eta scanned on labelled validation (scan_global_q)"
        elif labelled_data:
            q_rule = "global q scanned on labelled validation (scan_global_q); global q is better for decoders"
        elif unlabelled_data:
            q_rule = ("global q minimising the output change on unlabelled text (scan_global_q, "
                      f"maximize=False, {'mean |last hidden state| change' if arch == 'encoder' else 'top-5 logit MSE'})")
        else:
            q_rule = "fixed q (no data to tune it; q = 1 - p reproduces DARE)"
        reason = (f"{size}, p = {drop_rate:g}, post hoc: DARE's 1/(1-p) rescale over-amplifies at high p; "
                  "DAREx-q rescales by 1/q")
    if structured and method in ("dare", "darex-q"):
        method = "structural"
        reason += "; structured sparsity requested: whole rows dropped, survivors x 1/q"
    if lora:
        reason += "; LoRA fine-tune: prune the product (alpha/r)*B*A of each adapted matrix"
    return {"method": method, "finetune": finetune, "q_rule": q_rule, "delta_regime": regime,
            "max_abs_delta": max_abs, "drop_rate": drop_rate, "arch": arch, "reason": reason}


def diagnose(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *, exclude: Iterable[str],
             input_means: Mapping[str, torch.Tensor] | None, drop_rates: Iterable[float], arch: str,
             device: str | torch.device | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(tensor rows, layer rows, recommendations) for one fine-tuned model: the workflow's report
    of its delta. Recommendations are given per drop rate for the two situations of the DAREx
    flowchart: post hoc (the model is given; labelled and unlabelled data exist) and with control
    of fine-tuning. The statistics are computed on ``device`` (``tensor_diagnostics``)."""
    rates = sorted(set(drop_rates)) or [0.9]
    tensors = tensor_diagnostics(base, finetuned, exclude=exclude, input_means=input_means, drop_rate=max(rates),
                                 device=device)
    layers = layer_diagnostics(tensors)
    recommendations = [
        {"situation": situation, **recommend(tensors, drop_rate=rate, arch=arch, can_finetune=can_finetune,
                                             labelled_data=True, unlabelled_data=True)}
        for can_finetune, situation in ((False, "post hoc"), (True, "fine-tuning under our control"))
        for rate in rates]
    return tensors, layers, recommendations
