"""Structural delta pruning with the DAREx-q rescale ("DAREx-q can facilitate structural DPP",
DAREx Table 9; the exact structure in the paper is unverified, spec dpp_merge.md §2.5).

Whole rows (output neurons of an nn.Linear [out, in] weight; tokens of an embedding) or whole
columns (input features) of a delta are dropped, each independently with probability p, and the
survivors are rescaled by 1/q, q defaulting to DARE's 1 − p (so E[out] = δ). Dropped rows/columns
leave the base weights there: the pruned delta is a sparse set of full rows that can be stored as an
index plus a dense block.

Masks: a per-(mask seed, axis, tensor) CPU float32 generator (``methods.seeding.cpu_generator``), one
uniform draw per row/column, kept if ≥ p — the DARE construction one level up, so masks do not
depend on device, dtype or tensor order. With ``axis="rows"`` a ``…bias`` is seeded by its
``…weight`` name and has one entry per row, so a dropped neuron loses its weight row *and* its bias
delta. 1-D tensors (biases, norms) are treated as one entry per row; in ``columns`` mode they use their
own mask (a bias has no input axis). For tensors of more than two dimensions, rows are dim 0 and
columns dim 1.
"""

from __future__ import annotations

from typing import Mapping

import torch

from methods.device import divide
from methods.prune.common import check_drop_rate, f32, zero_like
from methods.prune.darex import lookup_q
from methods.registry import Param, register
from methods.seeding import cpu_generator

AXES = ("rows", "columns")


def mask_key(tensor_name: str, axis: str) -> str:
    """The name that seeds a tensor's structural mask (a bias shares its weight's rows)."""
    if axis == "rows" and tensor_name.endswith(".bias"):
        return tensor_name[:-len("bias")] + "weight"
    return tensor_name


def structural_keep_mask(shape: torch.Size, drop_rate: float, mask_seed: int, tensor_name: str,
                         axis: str = "rows") -> torch.Tensor:
    """Boolean keep mask broadcastable to ``shape``: [rows, 1, …] or [1, cols, 1, …] (1-D: [n])."""
    if axis not in AXES:
        raise ValueError(f"tensor {tensor_name!r}: axis must be one of {list(AXES)}, got {axis!r}")
    shape = torch.Size(shape)
    if len(shape) == 0:
        count, view = 1, ()
    elif axis == "rows" or len(shape) == 1:
        count = shape[0]
        view = (count,) + (1,) * (len(shape) - 1)
    else:
        count = shape[1]
        view = (1, count) + (1,) * (len(shape) - 2)
    generator = cpu_generator("structural-mask", axis, mask_seed, mask_key(tensor_name, axis))
    uniform = torch.rand(count, generator=generator, dtype=torch.float32, device="cpu")
    return (uniform >= drop_rate).reshape(view)


def structural_delta(delta: torch.Tensor, drop_rate: float, mask_seed: int, tensor_name: str,
                     axis: str = "rows", q: float | None = None) -> torch.Tensor:
    """Drop whole rows/columns of one delta, survivors × 1/q (q = None: 1 − p); float32 out."""
    drop_rate = check_drop_rate(drop_rate, tensor_name)
    delta = f32(delta)
    if drop_rate == 1.0:
        return torch.zeros_like(delta)
    q = 1.0 - drop_rate if q is None else q
    if not q > 0:
        raise ValueError(f"tensor {tensor_name!r}: q must be > 0, got {q}")
    keep = structural_keep_mask(delta.shape, drop_rate, mask_seed, tensor_name, axis).to(delta.device)
    return torch.where(keep, divide(delta, q), zero_like(delta))


@register("prune", "structural", params=(
    Param("drop_rate", float, 0.9, minimum=0.0, maximum=1.0, doc="probability p that a row/column is dropped"),
    Param("axis", str, "rows", choices=AXES, doc="rows: output neurons (bias follows); columns: input features"),
    Param("q", float, None, minimum=1e-6, doc="survivors x 1/q; default 1-p (DARE's unbiased rescale)"),
    Param("q_per_tensor", dict, None, doc="tensor name or full-match regex -> q, as for darex-q"),
), doc="structural DAREx-q: drop whole rows (or columns) of each delta, survivors rescaled by 1/q")
def structural(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str,
               axis: str = "rows", q: float | None = None,
               q_per_tensor: Mapping[str, float] | None = None) -> torch.Tensor:
    own = lookup_q(tensor_name, q_per_tensor)
    return structural_delta(delta, drop_rate, mask_seed, tensor_name, axis, q if own is None else own)
