"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh; ICLR 2023): second-order weight quantization.

Per layer GPTQ solves ``min_Q ‖(W − Q) X‖²_F`` with Q on an integer grid (``grids.py``), where X holds the
layer's calibration inputs. It quantizes one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian ``H = 2XXᵀ/n`` (the Optimal
Brain Surgeon update), through the upper Cholesky factor U of H⁻¹.

``gptq_layer`` is the reference ``GPTQ.fasterquant`` (IST-DASLab/gptq @2d65066, spec quantization.md §2,
steps 1–8) step for step, so that numbers are comparable with published GPTQ results:

1. per-channel / per-tensor grid parameters come from the weight *as given* (before dead columns are
   zeroed), as the reference's ``find_params`` call before the dead-column step does;
2. dead inputs (``H_jj == 0``): ``H_jj := 1`` and the weight column is set to 0;
3. ``static_groups``: every g-column group's parameters are fitted up front, in the original column order;
4. ``actorder``: columns are processed by decreasing ``H_jj`` (``argsort`` made stable so that ties are
   deterministic; with distinct diagonals this is the reference order);
5. damping ``H += percdamp·mean(diag H)·I`` (relative, so the scale of H does not matter);
6. ``U = chol(H⁻¹)`` upper, computed as chol → cholesky_inverse → chol(upper);
7. blocks of ``blocksize`` columns; inside a block each column is rounded, its error
   ``(w − q)/U_jj`` is applied to the rest of the block at once, and to the columns after the block
   lazily when the block ends. Dynamic groups (``g > 0`` without static groups) fit their parameters
   when the processing position reaches a multiple of g, from the *outer* W, i.e. with the lazy
   updates of earlier blocks but not the updates of earlier columns of the same block (the reference's
   quirk, kept for parity). With ``actorder`` these groups are formed over the permuted columns, so
   the record carries ``g_idx`` (the group of every original column);
8. the permutation is undone. ``losses`` are the reference's per-entry ``(w − q)²/(2U_jj²)`` summed
   over rows, one value per input column (original order); their sum equals
   ``½·tr((W₀ − Q) H_damped (W₀ − Q)ᵀ)`` (W₀ = W with dead columns zeroed).

All grid arithmetic is float32. Additions to the reference, each off by default except where noted:

- ``preserve_zeros`` (SparseGPT-style masking, for pruned deltas): entries that are exactly 0 in the input
  are forced to the grid's zero level (code = zero-point, so they decode to exactly 0.0), whatever the
  error feedback of earlier columns moved them to. Their full (updated) value still counts as error and is
  fed forward, so the other, unmasked columns absorb it exactly as SparseGPT does for pruned weights.
  Without it GPTQ writes non-zeros into pruned positions (spec §2 pitfalls).
- ``on_cholesky_failure``: ``"raise"`` (the reference; a ``CholeskyError`` names the layer and the
  damping), or ``"rtn"``: log a warning and use ``U = I`` (no error feedback, llm-compressor's fallback):
  the result is round-to-nearest on the same grid and the losses are then ½‖W₀ − Q‖² per column.
- The grid is ``grids.GridSpec``: the scale is rounded to ``scale_dtype`` before codes are computed
  (``float32`` reproduces the reference exactly). Grid S differs from the reference ``sym=True`` only for a
  group with no negative entry: the reference then uses ``s = max/maxq`` (half the usual step), grids.py
  uses ``2·max/maxq`` like every other symmetric group.

``Hessian`` accumulates ``H ← H·n/(n+t) + (2/(n+t))·XXᵀ`` (t = sequences in the batch) in float32 like the
reference ``add_batch``. Deviation: tokens whose attention-mask entry is 0 (padding) are left out of XXᵀ.
The reference feeds unpadded fixed-length windows and never has padding; our calibration batches are padded
task examples, and padding positions do not influence any real output, so counting them would bias H.
t still counts every sequence of the batch (it only scales H, which the relative damping makes irrelevant).

``gptq_model`` is the sequential driver (reference ``llama_sequential``): blocks in order, each calibrated
with all earlier blocks already quantized so that their error propagates forward (see its docstring).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from methods.finetune.batching import batch_to
from methods.prune.calibration import forward_batch
from methods.quantize.common import QuantizeContext, QuantizedTensor
from methods.quantize.grids import SCALE_DTYPES, SCHEMES, GridSpec, decode, encode, range_params
from methods.registry import Param, register

log = logging.getLogger(__name__)

CHOLESKY_FAILURE = ("raise", "rtn")


class CholeskyError(RuntimeError):
    """The damped Hessian of a layer is not positive definite (GPTQ's Cholesky steps failed)."""


# ---------------------------------------------------------------------------------------------------
# Hessian accumulation


class Hessian:
    """Running ``H = (2/n)·Σ x xᵀ`` over the calibration tokens one Linear layer saw (float32).

    ``n`` counts sequences (the leading dimension of a 3-D input, 1 for a 2-D input), as the reference
    ``GPTQ.add_batch``: ``H ← H·n/(n+t)``, then ``H += (√(2/(n+t))·X)(√(2/(n+t))·X)ᵀ``. With ``mask`` (the
    batch's attention mask, shaped like the input without its feature dimension) only tokens whose mask
    is non-zero enter XXᵀ; a mask of another shape cannot be aligned with the tokens and is ignored."""

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0
        self.tokens = 0

    def add(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = inputs.detach()
        if x.shape[-1] != self.matrix.shape[0]:
            raise ValueError(f"input has {x.shape[-1]} features, the Hessian {self.matrix.shape[0]}")
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        sequences = x.shape[0]
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            x = x[mask.to(x.device) != 0]
        x = x.reshape(-1, x.shape[-1])
        self.matrix *= self.samples / (self.samples + sequences)
        self.samples += sequences
        self.tokens += x.shape[0]
        scaled = (math.sqrt(2 / self.samples) * x.to(device=self.matrix.device, dtype=torch.float32)).t()
        self.matrix += scaled.matmul(scaled.t())


# ---------------------------------------------------------------------------------------------------
# One layer


def _range(columns: torch.Tensor, spec: GridSpec, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), one per row, of the min–max grid over some columns of W (``whole``: one range over
    all of them, shared by every row: the per-tensor grid)."""
    if whole:
        low = columns.amin().expand(columns.shape[0])
        high = columns.amax().expand(columns.shape[0])
    else:
        low, high = columns.amin(dim=1), columns.amax(dim=1)
    return range_params(low, high, spec)


def _upper_inverse_cholesky(hessian: torch.Tensor, name: str, percdamp: float, on_failure: str,
                            ) -> tuple[torch.Tensor, bool]:
    """(``U`` with ``UᵀU = H⁻¹``, False) by the reference's three steps, or (identity, True) when they fail
    and ``on_failure`` is ``"rtn"``."""
    try:
        lower = torch.linalg.cholesky(hessian)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True), False
    except torch.linalg.LinAlgError as error:
        message = (f"{name}: the damped Hessian is not positive definite (percdamp={percdamp}): {error}. "
                   f"Raise percdamp, give more calibration tokens, or set on_cholesky_failure='rtn'")
        if on_failure == "raise":
            raise CholeskyError(message) from error
        log.warning("%s; falling back to round-to-nearest on the same grid (no error feedback)", message)
        return torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device), True


def _check_layer_options(spec: GridSpec, blocksize: int, percdamp: float, on_cholesky_failure: str) -> None:
    if not isinstance(spec, GridSpec):
        raise TypeError(f"spec must be a grids.GridSpec, got {type(spec).__name__}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if on_cholesky_failure not in CHOLESKY_FAILURE:
        raise ValueError(f"on_cholesky_failure must be one of {list(CHOLESKY_FAILURE)}, got {on_cholesky_failure!r}")


def gptq_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, blocksize: int = 128,
               percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
               preserve_zeros: bool = False, on_cholesky_failure: str = "raise", name: str = "layer",
               ) -> tuple[QuantizedTensor, torch.Tensor]:
    """GPTQ of one (out, in) weight given the Hessian of its inputs (see the module docstring).

    Returns the record (codes in the original column order; ``g_idx`` in ``extras`` when act-order forms
    dynamic groups over permuted columns) and the per-input-column losses (float32, original order).
    ``static_groups`` only matters for ``group_size > 0`` (per-channel and per-tensor grids are fitted once
    anyway). ``name`` labels errors and the record. Computes on ``weight``'s device."""
    _check_layer_options(spec, blocksize, percdamp, on_cholesky_failure)
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"{name}: hessian must be ({columns}, {columns}) for a weight with {columns} inputs, "
                         f"got {tuple(hessian.shape)}")
    per_row, width = spec.groups(weight.shape)  # checks that group_size divides the input size
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: weight has non-finite entries")
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: hessian has non-finite entries")
    g = spec.group_size
    grouped = g > 0
    qmax = spec.qmax
    keep_zero = (W == 0) if preserve_zeros else None

    # 1. one grid for all columns (per channel / per tensor), from W as given
    if not grouped:
        scale, zero = _range(W, spec, whole=(g == 0))
        table_scale, table_zero = scale.unsqueeze(1), zero.unsqueeze(1)

    # 2. dead inputs
    dead = torch.diag(H) == 0
    dead_index = dead.nonzero().flatten()
    H[dead_index, dead_index] = 1
    W[:, dead] = 0

    # 3. static groups, in original column order
    if grouped and static_groups:
        blocks = W.reshape(rows, per_row, g)
        table_scale, table_zero = range_params(blocks.amin(dim=2), blocks.amax(dim=2), spec)
    elif grouped:
        table_scale = torch.zeros(rows, per_row, dtype=torch.float32, device=W.device)
        table_zero = torch.zeros_like(table_scale)

    # 4. act-order
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if keep_zero is not None:
            keep_zero = keep_zero[:, perm]

    # 5.–6. damping and the upper Cholesky factor of the inverse
    damp = percdamp * torch.mean(torch.diag(H))
    diagonal = torch.arange(columns, device=W.device)
    H[diagonal, diagonal] += damp
    U, fallback = _upper_inverse_cholesky(H, name, percdamp, on_cholesky_failure)
    # torch returns the factor column-major (strides (1, n)); row-major makes each row U[j, j:] that the
    # column loop reads contiguous. Same values, so the same result.
    U = U.contiguous()

    codes = torch.zeros(rows, columns, dtype=torch.float32, device=W.device)
    losses = torch.zeros_like(W)
    if not grouped:
        scale, zero = table_scale[:, 0], table_zero[:, 0]
    # 7. blocks with lazy updates
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]
            d = U1[i, i]
            if grouped:
                if static_groups:
                    group = int(perm[j]) // g if perm is not None else j // g
                    scale, zero = table_scale[:, group], table_zero[:, group]
                elif j % g == 0:
                    # the quirk: the outer W, without this block's earlier in-block updates
                    scale, zero = _range(W[:, j:j + g], spec)
                    table_scale[:, j // g], table_zero[:, j // g] = scale, zero
            c = encode(w, scale, zero, qmax)
            if keep_zero is not None:
                c = torch.where(keep_zero[:, j], zero, c)
            q = decode(c, scale, zero)
            codes[:, j] = c
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err = (w - q) / d
            # rank-1 update as a broadcast product: the same single rounded product per entry as the
            # (rows × 1)·(1 × k) matmul, without a GEMM call per column
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])

    # 8. back to the original column order
    extras: dict[str, torch.Tensor] = {}
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        losses = losses[:, inverse]
        if grouped and not static_groups:
            extras["g_idx"] = (inverse // g).to(torch.int32)   # original column -> processing group
    column_losses = losses.sum(dim=0)
    if g == 0:  # one grid for the whole tensor: stored once, as rtn does
        table_scale, table_zero = table_scale[:1], table_zero[:1]
    record = QuantizedTensor(
        codes=codes.to(torch.int32),
        bits=spec.bits,
        scale=table_scale.to(SCALE_DTYPES[spec.scale_dtype]),
        zero=table_zero.to(torch.int32) if spec.implicit_zero is None else None,
        implicit_zero=None if spec.implicit_zero is None else float(spec.implicit_zero),
        width=width,
        extras=extras,
        info={"method": "gptq", "loss": float(column_losses.sum()), "dead_columns": int(dead.sum()),
              "cholesky_fallback": fallback, "bits": spec.bits, "scheme": spec.scheme,
              "group_size": spec.group_size, "scale_dtype": spec.scale_dtype, "blocksize": blocksize,
              "percdamp": percdamp, "actorder": actorder, "static_groups": static_groups,
              "preserve_zeros": preserve_zeros},
    )
    return record, column_losses



# ---------------------------------------------------------------------------------------------------
# The sequential model driver


class _StopForward(Exception):
    """Raised by a forward hook on the block being calibrated: nothing after it is needed."""


def find_blocks(model: torch.nn.Module, module_names: Iterable[str]) -> tuple[str | None, list[str]]:
    """The transformer blocks: (name of the ``nn.ModuleList`` of layers, module names of its blocks).

    Chosen generically as the ModuleList whose children hold the most of ``module_names`` (ties go to the
    shallowest list), e.g. ``bert.encoder.layer`` or ``model.layers``; (None, []) when no ModuleList holds
    any of them."""
    wanted = set(module_names)
    best: tuple[int, int, str] | None = None
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{list_name}." if list_name else ""
        count = sum(1 for name in wanted if name.startswith(prefix) and name != list_name)
        if count == 0:
            continue
        key = (-count, list_name.count("."), list_name)
        if best is None or key < best:
            best = key
    if best is None:
        return None, []
    list_name = best[2]
    prefix = f"{list_name}." if list_name else ""
    return list_name, [f"{prefix}{child}" for child, _ in model.get_submodule(list_name).named_children()]


def _attention_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    return None


def _calibrate(model: torch.nn.Module, batches: list, layers: Mapping[str, torch.nn.Linear],
               stop_after: torch.nn.Module | None, device: torch.device) -> dict[str, Hessian]:
    """Hessians of ``layers`` (module names) over all batches; each forward is cut short right after
    ``stop_after`` (a block) runs, by an exception from its forward hook."""
    hessians = {name: Hessian(layer.in_features, device) for name, layer in layers.items()}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def accumulate(name: str):
        def hook(_module, inputs, _output):
            hessians[name].add(inputs[0], current["mask"])
        return hook

    for batch in batches:
        batch = batch_to(batch, device)
        current["mask"] = _attention_mask(batch)
        _forward_until(model, batch, {name: accumulate(name) for name in layers}, layers, stop_after)
    return hessians


def _forward_until(model: torch.nn.Module, batch: Any, hooks: Mapping[str, Any],
                   layers: Mapping[str, torch.nn.Module], stop_after: torch.nn.Module | None) -> None:
    """One forward with ``hooks`` on ``layers``, cut short right after ``stop_after`` runs (the later
    blocks' work would be thrown away); the hooks are removed whatever happens."""
    def stop(_module, _inputs, _output):
        raise _StopForward

    handles = [layers[name].register_forward_hook(hook) for name, hook in hooks.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        forward_batch(model, batch)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def execution_groups(model: torch.nn.Module, batch: Any, layers: Mapping[str, torch.nn.Linear],
                     stop_after: torch.nn.Module | None, device: torch.device) -> list[list[str]]:
    """``layers`` in the order of their first call on one batch, split into true-sequential groups: a run
    of consecutive calls on the very same input tensor is one group (q/k/v of attention, up/gate of a
    gated MLP), anything else starts a new group. This gives the reference's Llama groups
    [k, v, q] → [o] → [up, gate] → [down] and BERT's [query, key, value] → [attention.output.dense] →
    [intermediate.dense] → [output.dense] without model-specific names. Layers not called come last, as
    one group (their calibration then finds that they received no input)."""
    order: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()

    def record(name: str):
        def hook(_module, inputs, _output):
            if name not in seen:
                seen.add(name)
                order.append((name, inputs[0]))
        return hook

    _forward_until(model, batch_to(batch, device), {name: record(name) for name in layers}, layers, stop_after)
    groups: list[list[str]] = []
    previous = None
    for name, inputs in order:
        if groups and inputs is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = inputs
    missing = [name for name in layers if name not in seen]
    if missing:
        groups.append(missing)
    return groups


def gptq_model(model: torch.nn.Module, targets: Mapping[str, torch.Tensor], batches: list, spec: GridSpec, *,
               offsets: Mapping[str, torch.Tensor] | None = None, blocksize: int = 128, percdamp: float = 0.01,
               actorder: bool = False, static_groups: bool = False, true_sequential: bool = True,
               preserve_zeros: bool = False, on_cholesky_failure: str = "raise",
               device: str | torch.device | None = None, progress: bool = True) -> dict[str, QuantizedTensor]:
    """Quantize every target (``<Linear name>.weight`` → float32 (out, in) weight, or delta with
    ``offsets``) block by block, as the reference ``llama_sequential`` does.

    - First every target Linear is set to its unquantized effective weight (offset + target), so the
      calibration sees the model the targets describe (e.g. a pruned delta, not the dense fine-tuned one).
    - Blocks (``find_blocks``) in order: forward hooks on the block's targets accumulate ``Hessian``s over
      all calibration batches, with every earlier block already quantized: the reference's error
      propagation. Each forward stops right after the current block (an exception from a hook on the
      block), so a calibration pass for block i costs the embeddings and i + 1 blocks rather than a full
      forward (the head included), and no block inputs (attention masks, rotary embeddings, ...) have
      to be captured and replayed as the reference's ``Catcher`` does.
    - ``true_sequential``: within a block, groups of Linears (``execution_groups``) are calibrated and
      quantized one after the other, the block re-run after each group so that later groups see the
      outputs of already quantized ones. Otherwise one pass per block, all its targets at once.
    - Each target is quantized by ``gptq_layer`` and offset + ŵ is written into the module before moving on.
    - Targets outside every block are quantized last, with Hessians from full forwards of the model with
      every block quantized (all of them at once).

    Runs under ``no_grad`` in eval mode, on ``device`` (default: where the model is; the model is moved
    there for the run). The model is left as it was on return (weights, device, training mode). Records
    are on the CPU; ``info`` holds the layer's summed loss, its block and its calibration counts."""
    if not targets:
        return {}
    if not batches:
        raise ValueError("gptq needs calibration batches")
    _check_layer_options(spec, blocksize, percdamp, on_cholesky_failure)
    modules = dict(model.named_modules())
    layers: dict[str, torch.nn.Linear] = {}
    for key, value in targets.items():
        module_name = key[:-len(".weight")] if key.endswith(".weight") else None
        layer = modules.get(module_name) if module_name else None
        if not isinstance(layer, torch.nn.Linear):
            raise KeyError(f"target {key!r} is not the weight of an nn.Linear of the model "
                           f"(expected '<module name>.weight')")
        if tuple(value.shape) != tuple(layer.weight.shape):
            raise ValueError(f"target {key!r} has shape {tuple(value.shape)}, the module's weight "
                             f"{tuple(layer.weight.shape)}")
        if offsets is not None and key not in offsets:
            raise KeyError(f"target {key!r} has no offset (delta quantization needs one per target)")
        layers[module_name] = layer
    list_name, blocks = find_blocks(model, layers)
    plan: list[tuple[str | None, list[str]]] = []
    assigned: set[str] = set()
    for block in blocks:
        inside = [name for name in layers if name.startswith(f"{block}.")]
        if inside:
            plan.append((block, inside))
            assigned.update(inside)
    outside = [name for name in layers if name not in assigned]
    if outside:
        plan.append((None, outside))

    original_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else original_device
    originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    was_training = model.training

    def effective(name: str, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(device=device, dtype=torch.float32)
        if offsets is not None:
            value = offsets[f"{name}.weight"].detach().to(device=device, dtype=torch.float32) + value
        return value

    results: dict[str, QuantizedTensor] = {}
    try:
        model.to(device)
        model.eval()
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.data.copy_(effective(name, targets[f"{name}.weight"]).to(layer.weight.dtype))
            bar = tqdm(plan, desc="gptq blocks", mininterval=2.0, disable=not progress)
            for index, (block, names) in enumerate(bar):
                stop = modules[block] if block is not None else None
                subset = {name: layers[name] for name in names}
                if true_sequential and block is not None:
                    groups = execution_groups(model, batches[0], subset, stop, device)
                else:
                    groups = [names]
                for group_index, group in enumerate(groups):
                    hessians = _calibrate(model, batches, {name: layers[name] for name in group}, stop, device)
                    for name in group:
                        key = f"{name}.weight"
                        if hessians[name].tokens == 0:
                            raise ValueError(f"target {key!r} received no calibration input; GPTQ would zero it "
                                             f"(every input column dead)")
                        record, _ = gptq_layer(
                            targets[key].detach().to(device=device, dtype=torch.float32), hessians[name].matrix,
                            spec, blocksize=blocksize, percdamp=percdamp, actorder=actorder,
                            static_groups=static_groups, preserve_zeros=preserve_zeros,
                            on_cholesky_failure=on_cholesky_failure, name=key)
                        dequantized = record.dequantize()
                        layers[name].weight.data.copy_(effective(name, dequantized).to(layers[name].weight.dtype))
                        record.info.update({"block": block, "block_index": index if block is not None else None,
                                            "sequential_group": group_index,
                                            "calibration_sequences": hessians[name].samples,
                                            "calibration_tokens": hessians[name].tokens})
                        results[key] = _to_cpu(record)
                    del hessians
    finally:
        model.to(original_device)
        with torch.no_grad():
            for name, layer in layers.items():   # in place, so tied parameters stay tied
                layer.weight.copy_(originals[name])
        model.train(was_training)
    return {key: results[key] for key in targets}


def _to_cpu(record: QuantizedTensor) -> QuantizedTensor:
    record.codes = record.codes.cpu()
    record.scale = record.scale.cpu()
    record.zero = record.zero.cpu() if record.zero is not None else None
    record.extras = {key: value.cpu() for key, value in record.extras.items()}
    return record


# ---------------------------------------------------------------------------------------------------
# Registered method


@register("quantize", "gptq", params=(
    Param("bits", int, 4, minimum=2, maximum=16, doc="bits per weight code"),
    Param("scheme", str, "asym", choices=SCHEMES,
          doc="asym = Grid A (reference default), sym-full = Grid S (reference --sym), sym-restricted = Grid R"),
    Param("group_size", int, -1, minimum=-1,
          doc="-1 per output channel, 0 per tensor, g > 0 groups of g input columns (must divide in_features)"),
    Param("scale_dtype", str, "float16", choices=tuple(SCALE_DTYPES),
          doc="dtype the scales are stored in (rounded to it before coding)"),
    Param("blocksize", int, 128, minimum=1, doc="columns per lazy-update block (speed only, same result)"),
    Param("percdamp", float, 0.01, minimum=0.0, doc="damping as a fraction of mean(diag H)"),
    Param("actorder", bool, False, doc="process columns by decreasing diag H (act-order)"),
    Param("static_groups", bool, False,
          doc="fit all group grids up front on contiguous columns (keeps contiguous groups under act-order)"),
    Param("true_sequential", bool, True,
          doc="within a block, quantize q/k/v -> o -> up/gate -> down in turn, re-running the block between"),
    Param("preserve_zeros", bool, False,
          doc="entries exactly 0 in the target stay 0 (SparseGPT-style masking, for pruned deltas)"),
    Param("on_cholesky_failure", str, "raise", choices=CHOLESKY_FAILURE,
          doc="raise, or fall back to RTN on the same grid with a warning"),
), doc="GPTQ (Frantar et al. 2023): Hessian-aware sequential rounding with error feedback, block by block")
def gptq(targets: dict[str, torch.Tensor], *, context: QuantizeContext, bits: int = 4, scheme: str = "asym",
         group_size: int = -1, scale_dtype: str = "float16", blocksize: int = 128, percdamp: float = 0.01,
         actorder: bool = False, static_groups: bool = False, true_sequential: bool = True,
         preserve_zeros: bool = False, on_cholesky_failure: str = "raise") -> dict[str, QuantizedTensor]:
    context.require_data("gptq")
    spec = GridSpec(bits=bits, scheme=scheme, group_size=group_size, scale_dtype=scale_dtype)
    return gptq_model(context.model, targets, context.batches, spec, offsets=context.offsets,
                      blocksize=blocksize, percdamp=percdamp, actorder=actorder, static_groups=static_groups,
                      true_sequential=true_sequential, preserve_zeros=preserve_zeros,
                      on_cholesky_failure=on_cholesky_failure, device=context.device)
