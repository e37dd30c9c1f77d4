"""Merge whole models with a registered merge method; the entry point the workflow calls.

``merge_state_dicts(method, base, models, params, seed=, exclude=, vocab_rule=, score_fn=)``
returns ``(merged, info)``. ``merged`` holds only the merged tensors, each cast back to the base
tensor's dtype; the caller keeps each task's own value of every other tensor. Tensors merged:
present in the base and in every model, floating point, not matching an ``exclude`` regex. The
others are listed in ``info["skipped"]`` with the reason. A tensor that some models (or the base)
have and others lack is an error, as is a shape mismatch — except along the vocabulary axis of
embedding / LM-head tensors (``VOCAB_TENSORS``): with ``vocab_rule="base"`` every model's rows are
sliced to the base's row count (rows of tokens the base lacks are dropped; logged in
``info["vocab_aligned"]``); a model with fewer rows than the base is an error. Models are
processed in sorted-name order, so the result does not depend on the order of ``models``; all
arithmetic is in float32 and cast once at the end.

Device: ``device`` names where the arithmetic runs (None: where the tensors are). The float32
copies of the merged tensors of the base and of every model are made there at once, because some
methods need all of them together (TIES with ``granularity: model`` trims over each whole task
vector); the merged tensors come back on the CPU. DARE masks are drawn on the CPU and moved (see 1.
below) and divisions are correctly rounded on every device (``methods.device.divide``), so a
merge is the same bit for bit on every device except where it sums over a tensor or over three or
more models (the L1 rescale of ``semantics: mergekit``, SLERP's cosine, such sums of task vectors),
whose order a GPU may change, or raises to a power (``delta-fusion``).

Method-specific details: every registered merge function accepts an optional ``info`` dict; this
module passes one and copies what the method recorded into the returned info (soup-greedy:
``ingredients``, ``scores``, ``candidate_scores``, ``soup_score``; slerp: ``slerp_order``,
``slerp_lerp_tensors``; notes about ignored parameters under ``notes``).

Intended differences from mergekit 0.1.5 (arcee-ai/mergekit; spec dpp_merge.md §3.6)
-------------------------------------------------------------------------------------
Matched element-wise by tests/test_merge_mergekit.py (float32, weights 1): ``task-arithmetic`` ↔
``task_arithmetic`` (scale = ``lambda``), ``average`` ↔ ``linear`` (normalize true), ``ties``
with ``semantics: mergekit`` ↔ ``ties`` (normalize true), ``slerp`` ↔ ``slerp``, and — with our
masks injected into mergekit — ``dare-ta``/``dare-ties`` with ``semantics: mergekit`` ↔
``dare_linear``/``dare_ties``. The differences:

1. DARE masks. Ours: keep entry iff u ≥ p with u ~ U[0,1) drawn in float32 on the CPU from a
   generator seeded by (mask seed, model name, tensor name) (``methods.prune.dare.keep_mask``), so
   masks do not depend on device, dtype, tensor order or the number/order of merged models.
   mergekit: ``torch.bernoulli(full_like(δ, density))`` on the global torch RNG, in the tensor's
   dtype (bf16 on CPU/GPU) on the execution device, in task-execution order; reproducible only
   via ``random_seed`` and only on the same device and schedule. The two cannot draw equal masks;
   DARE variants are compared with injected masks (or statistically).
2. Parameterisation. Our ``drop_rate`` p is mergekit's ``density`` 1 − p for DARE; our TIES
   ``density`` is mergekit's ``ties`` ``density`` (fraction kept). Every model has weight 1 (no
   per-model weights); our ``scale`` is mergekit's ``lambda``.
3. Defaults follow the papers, not mergekit: ``ties`` and ``dare-ties`` default to
   ``semantics: paper`` — official TIES code: trim over each model's whole flattened task vector
   (``granularity: model``), sign elected on the unweighted trimmed task vectors, γ = 0 resolved
   with the model-wide majority sign (mergekit: +1), disjoint mean ÷ count of agreeing entries;
   default density 0.2 (TIES top-20 %; mergekit's default density 1.0 trims nothing). MergeLM's
   DARE+TIES is DARE (÷(1−p)) followed by the full TIES trim and disjoint MEAN; mergekit's
   ``dare_ties`` SUMS the agreeing entries and does no magnitude trim.
4. DARE rescale. ``semantics: paper``: survivors × 1/(1−p) (MergeLM, DARE paper).
   ``semantics: mergekit``: survivors × ‖δ‖₁/‖m⊙δ‖₁ per tensor (mergekit since a2dda31). When
   nothing survives the tensor's delta is 0 in both. mergekit also skips the rescale when either
   L1 norm is below 1e-7; we rescale whenever a non-zero entry survives (‖δ‖₁ is then preserved).
5. Magnitude trim ties. mergekit keeps exactly max(1, ⌊density·n⌋) entries chosen by an unstable
   argsort; ``semantics: mergekit`` keeps the same count, breaking exact magnitude ties by lower
   flat index. ``semantics: paper`` keeps every entry tied with the threshold (official rule).
6. Vocabulary. mergekit slices embeddings of different sizes to the base shape (or builds a
   tokenizer union when configured); we slice to the base's rows (``vocab_rule: base``) and
   refuse models with fewer rows than the base. mergekit skips other shape mismatches; we raise.
7. Which tensors. mergekit merges every tensor it knows from the architecture definition; we merge
   what base and all models share, minus ``exclude`` regexes (per-arch defaults in the workflow),
   and leave the rest to the caller (each task keeps its own head).
8. SLERP uses mergekit's rule (threshold |cos| > 0.9995 → lerp, norms ≤ 1e-8 → 1) with a scalar
   ``t`` only (no per-layer gradients); the first model by name plays mergekit's ``base_model``.
9. ``soup-greedy`` and ``delta-fusion`` have no mergekit counterpart; ``delta-fusion`` is our
   unconfirmed reading of CoDiEmb's fusion (see methods/merge/delta_fusion.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from methods import registry
from methods.io.checkpoint import load_tensors
from methods.io.delta_artifact import is_delta_checkpoint, materialize_delta
from methods.prune.apply import excluded

VOCAB_TENSORS = re.compile(r"embed_tokens|word_embeddings|wte|lm_head|embed_out")
VOCAB_RULES = ("base",)

# Keys the method-specific info must not overwrite.
_RESERVED = {"method", "params", "seed", "models", "merged_tensors", "skipped", "vocab_aligned"}


MERGED_WEIGHTS = "merged.safetensors"  # the merged tensors of a full (variant_storage: full) merge


def load_merged(directory: str | Path) -> dict[str, torch.Tensor]:
    """The merged tensors a merge job wrote: a delta checkpoint rebuilt over its base, or the plain file."""
    if is_delta_checkpoint(directory):
        return materialize_delta(directory)
    return load_tensors(Path(directory) / MERGED_WEIGHTS)


def _select(base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]], names: list[str],
            exclude: Iterable[str], vocab_rule: str) -> tuple[list[str], dict[str, str], dict[str, dict]]:
    """Which tensors to merge, which to skip (with reasons), and the vocabulary slicing to apply."""
    exclude = list(exclude)
    all_keys = list(base)
    for name in names:
        all_keys += [k for k in models[name] if k not in base]
    all_keys = list(dict.fromkeys(all_keys))
    keys, skipped, vocab = [], {}, {}
    for key in all_keys:
        holders = {"base": base.get(key), **{n: models[n].get(key) for n in names}}
        present = {who: t for who, t in holders.items() if t is not None}
        if excluded(key, exclude):
            skipped[key] = "excluded by pattern"
            continue
        if not all(t.is_floating_point() for t in present.values()):
            skipped[key] = "not floating point"
            continue
        if key not in base:
            skipped[key] = "absent from base (new head)"
            continue
        missing = [n for n in names if n not in present]
        if len(missing) == len(names):
            skipped[key] = "absent from every model (a pre-training head)"
            continue
        if missing:
            raise ValueError(f"tensor {key!r} is in the base and models {[n for n in names if n in present]} "
                             f"but missing from models {missing}; cannot merge it (exclude it to keep each "
                             "model's own value)")
        base_shape = tuple(base[key].shape)
        for name in names:
            shape = tuple(models[name][key].shape)
            if shape == base_shape:
                continue
            if (VOCAB_TENSORS.search(key) and len(shape) == len(base_shape) and len(shape) >= 1
                    and shape[1:] == base_shape[1:]):
                if shape[0] < base_shape[0]:
                    raise ValueError(f"tensor {key!r}: model {name!r} has {shape[0]} vocabulary rows, fewer than "
                                     f"the base's {base_shape[0]}; vocab_rule 'base' only drops added rows")
                vocab.setdefault(key, {})[name] = (shape[0], base_shape[0])
                continue
            raise ValueError(f"tensor {key!r}: model {name!r} has shape {shape}, the base has {base_shape}; "
                             "these models cannot be merged")
        keys.append(key)
    return keys, skipped, vocab


def merge_state_dicts(method: str, base: dict[str, torch.Tensor], models: dict[str, dict[str, torch.Tensor]],
                      params: dict, *, seed: int = 0, exclude: Iterable[str] = (), vocab_rule: str = "base",
                      score_fn: Callable[[dict[str, torch.Tensor]], float] | None = None,
                      device: str | torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge ``models`` (name → state dict, any dtype) on ``base`` with a registered merge method.

    ``params`` must already be resolved (``registry.get("merge", method).resolve``); ``seed`` seeds
    DARE masks; ``score_fn`` (float32 state dict of the merged keys, on ``device`` → validation
    score, higher is better) is passed to the method (soup-greedy needs it). Computes on ``device``
    (None: where the tensors are; see the module docstring). Returns (merged tensors in the base's
    dtypes, on the CPU; info)."""
    if vocab_rule not in VOCAB_RULES:
        raise ValueError(f"unknown vocab_rule {vocab_rule!r}; known: {list(VOCAB_RULES)}")
    spec = registry.get("merge", method)
    names = sorted(models)
    if not names:
        raise ValueError("merging needs at least one model")
    keys, skipped, vocab = _select(base, models, names, exclude, vocab_rule)

    def prepared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # float32 views/copies of the merged tensors; vocabulary tensors sliced to the base's rows
        return {k: (sd[k][:base[k].shape[0]] if k in vocab else sd[k]).to(device=device, dtype=torch.float32)
                for k in keys}

    base32 = prepared(base)
    models32 = [prepared(models[n]) for n in names]
    extra: dict = {}
    merged = spec.fn(base32, models32, names=names, seed=seed, score_fn=score_fn, info=extra, **params)
    if set(merged) != set(keys):
        raise RuntimeError(f"merge method {method!r} returned tensors {sorted(set(merged) ^ set(keys))} "
                           "it was not given (or dropped some)")
    out = {k: merged[k].to("cpu", base[k].dtype) for k in keys}
    clash = _RESERVED & set(extra)
    if clash:
        raise RuntimeError(f"merge method {method!r} recorded reserved info keys {sorted(clash)}")
    info = {"method": method, "params": dict(params), "seed": seed, "models": names, "merged_tensors": len(out),
            "skipped": skipped, "vocab_aligned": vocab, **extra}
    return out, info
