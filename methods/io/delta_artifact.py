"""Compressed delta checkpoints: a variant stored as a reference to its base plus only what differs.

A pruned model differs from its base in the few entries its delta kept; storing it as a full
model wastes (1 − density) of the disk. A delta checkpoint directory holds the variant's
config/tokenizer files, ``delta.json`` (the base's location and, per tensor, how it is stored)
and ``delta.safetensors``. Each tensor is stored in the cheapest of four forms, counted in bytes:

- ``base``: equal to the base tensor (cast to the variant's dtype), bit for bit; nothing stored;
- ``bitmask``: a 1-bit-per-entry mask of the changed entries (little-endian bit stream, row-major)
  plus the changed entries' values;
- ``indices``: the changed entries' flat positions (int32, int64 past 2³¹ entries) plus values;
- ``dense``: the whole tensor (also every tensor without a same-shape floating-point counterpart
  in the base, such as a new classifier head).

Values are the variant's own values in its dtype, so materializing reproduces the variant bit for
bit (δ = value − base at those entries); "changed" compares bit patterns, so −0.0 against 0.0 and
the last bit of a bfloat16 count. The writer takes one tensor at a time and holds only what it
stores (the compressed size) until ``save``; the streamed operations of methods/stream.py still
write full models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from methods.io.checkpoint import (align_names, check_finite, checkpoint_dir_of, copy_template_files, load_state_dict,
                                   load_tensors, read_json, write_json)


def _bits():
    """methods.quantize.artifact (a bitmask is the 1-bit case of its code packer), imported on use:
    importing the methods.quantize package loads every quantizer and transformers (~0.5 s), which
    every reader of this module (the merge and streaming code) would otherwise pay at start-up."""
    from methods.quantize import artifact

    return artifact


DELTA_INDEX = "delta.json"
DELTA_WEIGHTS = "delta.safetensors"
FORMAT = "dcbench-delta/1"
STORAGE_FORMS = ("base", "bitmask", "indices", "dense")

_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_delta_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / DELTA_INDEX).is_file()


def changed_entries(variant: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of the entries whose bit pattern differs from the base's (cast to the variant's dtype)."""
    reference = base.to(variant.dtype)
    view = _BITS_VIEW[variant.element_size()]
    return (variant.contiguous().view(view) != reference.contiguous().view(view)).reshape(-1)


def storage_bytes(numel: int, changed: int, itemsize: int) -> dict[str, int]:
    """Bytes each storage form needs for a tensor of ``numel`` entries with ``changed`` of them changed."""
    index_bytes = 4 if numel < 2**31 else 8
    return {"base": 0 if changed == 0 else None, "bitmask": (numel + 7) // 8 + changed * itemsize,
            "indices": changed * (index_bytes + itemsize), "dense": numel * itemsize}


def cheapest_form(numel: int, changed: int, itemsize: int) -> str:
    sizes = {k: v for k, v in storage_bytes(numel, changed, itemsize).items() if v is not None}
    return min(STORAGE_FORMS, key=lambda form: (sizes.get(form, float("inf")), STORAGE_FORMS.index(form)))


class DeltaCheckpointWriter:
    """Collects tensors one at a time (``add``), then writes the directory (``save``)."""

    def __init__(self, base_location: str | Path):
        self.base_location = str(base_location)
        self.stored: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, dict] = {}

    def add(self, name: str, variant: torch.Tensor, base: torch.Tensor | None) -> str:
        """Store ``variant`` against ``base`` (None: no counterpart, stored dense); returns the form chosen."""
        record = {"dtype": str(variant.dtype).removeprefix("torch."), "shape": list(variant.shape)}
        if base is None or not variant.is_floating_point() or base.shape != variant.shape:
            form = "dense"
        else:
            changed = changed_entries(variant, base)
            record["changed"] = int(changed.sum())
            form = cheapest_form(variant.numel(), record["changed"], variant.element_size())
            flat = variant.reshape(-1)
            if form == "bitmask":
                self.stored[f"{name}.bitmask"] = _bits().pack_bits(changed.to(torch.uint8), 1)
                self.stored[f"{name}.values"] = flat[changed].clone()
            elif form == "indices":
                index_dtype = torch.int32 if variant.numel() < 2**31 else torch.int64
                self.stored[f"{name}.indices"] = changed.nonzero().reshape(-1).to(index_dtype)
                self.stored[f"{name}.values"] = flat[changed].clone()
        if form == "dense":
            self.stored[name] = variant.contiguous()
        self.tensors[name] = {**record, "storage": form}
        return form

    def save(self, out_dir: str | Path, template_dir: str | Path | None = None) -> dict:
        """Write ``delta.safetensors`` and ``delta.json`` (plus the template's config and tokenizer
        files); returns the storage summary also recorded in ``delta.json``."""
        out_dir = Path(out_dir)
        check_finite(self.stored, str(out_dir))
        if template_dir is not None:
            copy_template_files(template_dir, out_dir)
        save_file({k: v.contiguous() for k, v in self.stored.items()}, out_dir / DELTA_WEIGHTS,
                  metadata={"format": FORMAT})
        summary = self.summary(out_dir / DELTA_WEIGHTS)
        write_json({"format": FORMAT, **_base_reference(self.base_location, out_dir), "storage": summary,
                    "tensors": self.tensors}, out_dir / DELTA_INDEX)
        return summary

    def summary(self, weights_file: Path) -> dict:
        params = sum(_numel(t["shape"]) for t in self.tensors.values())
        dense = sum(_numel(t["shape"]) * torch.empty((), dtype=getattr(torch, t["dtype"])).element_size()
                    for t in self.tensors.values())
        size = weights_file.stat().st_size
        stored = sum(t.numel() * t.element_size() for t in self.stored.values())
        forms = {form: sum(1 for t in self.tensors.values() if t["storage"] == form) for form in STORAGE_FORMS}
        # bits per parameter count the stored tensors' bytes, not the file header, as the quantized
        # artifacts' bit accounting does; size_ratio is the whole file against a dense copy's tensors
        return {"file_bytes": size, "stored_bytes": stored, "dense_bytes": dense, "size_ratio": size / max(1, dense),
                "parameters": params, "bits_per_parameter": 8 * stored / max(1, params), "tensors_by_storage": forms}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def storage_summary(directory: str | Path) -> dict:
    """The storage record of a delta checkpoint (bytes on disk, ratio to a dense copy, bits per parameter)."""
    return read_json(Path(directory) / DELTA_INDEX)["storage"]


def _base_reference(location: str, out_dir: Path) -> dict:
    """How ``delta.json`` names the base: a local directory relative to the delta checkpoint itself
    (so a results tree can be moved or read from any working directory), a hub id as it is."""
    path = Path(location)
    if path.is_dir():
        # out_dir may be the temporary sibling that is renamed into place: same parent, same relpath
        return {"base": os.path.relpath(path.resolve(), Path(out_dir).resolve()), "base_is_path": True}
    return {"base": location, "base_is_path": False}


def base_location(directory: str | Path) -> str:
    """The base of a delta checkpoint: a directory path (resolved from the checkpoint's own place)
    or a hub id."""
    index = read_json(Path(directory) / DELTA_INDEX)
    if index.get("base_is_path"):
        return str((Path(directory) / index["base"]).resolve())
    return index["base"]


def materialize_delta(directory: str | Path, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the variant, rebuilt from the base (loaded from the recorded location unless
    given) and the stored entries; equal bit for bit to the state the writer was given."""
    directory = Path(directory)
    index = read_json(directory / DELTA_INDEX)
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory / DELTA_INDEX}: format {index.get('format')!r}, expected {FORMAT!r}")
    stored = load_tensors(directory / DELTA_WEIGHTS)
    tensors = index["tensors"]
    needs_base = any(t["storage"] != "dense" for t in tensors.values())
    if needs_base:
        if base is None:
            base = load_state_dict(checkpoint_dir_of(base_location(directory)))
        shapes = {name: torch.empty(0, dtype=getattr(torch, t["dtype"])) for name, t in tensors.items()}
        base = align_names(base, shapes, str(directory))
    state: dict[str, torch.Tensor] = {}
    for name, record in tensors.items():
        form, dtype, shape = record["storage"], getattr(torch, record["dtype"]), tuple(record["shape"])
        if form == "dense":
            state[name] = stored[name]
            continue
        if name not in base or tuple(base[name].shape) != shape:
            found = tuple(base[name].shape) if name in base else "absent"
            raise ValueError(f"{directory}: tensor {name!r} is stored against a base tensor of shape {shape}, but "
                             f"the base at {base_location(directory)!r} has {found}; the base changed since this "
                             "was written")
        flat = base[name].to(dtype).reshape(-1).clone()
        if form == "bitmask":
            flat[_bits().unpack_bits(stored[f"{name}.bitmask"], 1, flat.numel()).bool()] = stored[f"{name}.values"]
        elif form == "indices":
            flat[stored[f"{name}.indices"].long()] = stored[f"{name}.values"]
        state[name] = flat.reshape(shape)
    return state


def save_delta_checkpoint(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_location: str | Path,
                          out_dir: str | Path, template_dir: str | Path | None = None) -> dict:
    """``state`` as a delta checkpoint against ``base`` (names already aligned to ``state``'s)."""
    writer = DeltaCheckpointWriter(base_location)
    for name, tensor in state.items():
        writer.add(name, tensor, base.get(name))
    return writer.save(out_dir, template_dir)

