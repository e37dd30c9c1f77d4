"""Per-input-feature activation statistics of every ``nn.Linear``, from calibration batches.

Two statistics feed two different methods, and they must not be mixed up (spec dpp_merge.md §2.4):

- the **L2 norm** ‖X_j‖₂ of input feature j over all calibration tokens: Wanda's importance score
  |ΔW_ij|·‖X_j‖₂ (``importance`` prune method);
- the **signed mean** x̄_j over all tokens: DAREx's c_ij = ΔW_ij·x̄_j (analytic per-layer q,
  MSE-optimal q, the DAREx variance diagnostic), as ``utils/getwx.py`` computes it.

Statistics are keyed by the Linear's weight name (``<module name>.weight``), i.e. by the tensor name
the pruning methods see, so calibrate the same model class whose state dict is pruned (the fine-tuned
model, as Wanda and DAREx do). Sums are accumulated in float64, so the order and size of the batches
do not change the result beyond rounding. Every token a Linear sees counts, padding included: feed
unpadded windows (the official codes use fixed-length windows) or accept the padding's share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from methods.finetune.batching import batch_to


@dataclass
class InputStats:
    """Running sums over the tokens one Linear layer saw."""
    total: torch.Tensor      # Σ_tokens x_j, float64
    sq_total: torch.Tensor   # Σ_tokens x_j², float64
    tokens: int

    @property
    def mean(self) -> torch.Tensor:
        """Signed mean x̄_j (DAREx getwx), float32."""
        return (self.total / max(self.tokens, 1)).to(torch.float32)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens (Wanda's ‖X_j‖₂), float32."""
        return self.sq_total.sqrt().to(torch.float32)


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def forward_batch(model: torch.nn.Module, batch) -> None:
    """Run ``model`` on a batch given as keyword arguments (dict), positional arguments or one tensor."""
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def collect_input_stats(model: torch.nn.Module, batches: Iterable, modules: Iterable[str] | None = None,
                        ) -> dict[str, InputStats]:
    """Run ``model`` on every batch (a dict of keyword arguments, a tuple of positional ones, or one
    tensor) under ``no_grad`` in eval mode and return per-input-feature sums for each Linear,
    keyed ``<module name>.weight``. ``modules`` restricts the layers (module names).

    The model computes where it is: batches are moved to its device, sums accumulate on each layer's
    device, and the returned statistics are on the CPU."""
    layers = linear_modules(model)
    if modules is not None:
        wanted = list(modules)
        missing = [m for m in wanted if m not in layers]
        if missing:
            raise KeyError(f"no nn.Linear named {missing[0]!r} in the model")
        layers = {m: layers[m] for m in wanted}
    stats = {}
    for name, layer in layers.items():
        sums = {"dtype": torch.float64, "device": layer.weight.device}
        stats[f"{name}.weight"] = InputStats(torch.zeros(layer.in_features, **sums),
                                             torch.zeros(layer.in_features, **sums), 0)

    def hook(key: str):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            entry = stats[key]
            entry.total += x.sum(0)
            entry.sq_total += x.pow(2).sum(0)
            entry.tokens += x.shape[0]
        return record

    handles = [layer.register_forward_hook(hook(f"{name}.weight")) for name, layer in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n = 0
            for batch in batches:
                forward_batch(model, batch_to(batch, device))
                n += 1
        if n == 0:
            raise ValueError("no calibration batches")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {key: InputStats(s.total.cpu(), s.sq_total.cpu(), s.tokens) for key, s in stats.items()}


def input_norms(stats: Mapping[str, InputStats]) -> dict[str, torch.Tensor]:
    """Wanda's per-input-feature ‖X_j‖₂, keyed by weight name."""
    return {name: s.norm for name, s in stats.items()}


def input_means(stats: Mapping[str, InputStats]) -> dict[str, torch.Tensor]:
    """DAREx's signed per-input-feature mean x̄_j, keyed by weight name."""
    return {name: s.mean for name, s in stats.items()}


def save_vectors(vectors: Mapping[str, torch.Tensor], path) -> None:
    """Write per-tensor vectors (norms or means) to a safetensors file, e.g. for a workflow step."""
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in vectors.items()}, str(path))


def load_vectors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
