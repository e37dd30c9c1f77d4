"""Published fine-tuned checkpoints as a task's model (config ``models.<name>.finetuned.<task>``).

A task with a published checkpoint is not fine-tuned by the workflow: its fine-tuned checkpoint
directory is made from the published one, and everything downstream (delta diagnostics, pruning,
merging, quantization, evaluation) reads it as it reads a checkpoint the workflow trained.

- ``source: local``: a checkpoint directory (``config.json`` and weights).
- ``source: hub``: a hub id (optionally a ``revision``), fetched with huggingface_hub's
  ``snapshot_download`` into the Hugging Face cache (only from the cache when HF_HUB_OFFLINE=1,
  the workflow's default).

Safetensors weights are **symlinked** (absolute paths into the local directory or the hub cache;
no copy of a 26 GB model), next to links to its config and tokenizer files. Checkpoints published
as PyTorch pickles only (``pytorch_model*.bin``, as many 2023 releases are) are **converted** to
safetensors shards, since every stage reads safetensors; they are loaded with
``weights_only=True`` (no code runs). The source must stay in place; the manifest records the
weights' content hash, so a changed source shows in provenance.

Vocabulary. Published decoders often add tokens to the base's vocabulary (WizardLM/WizardMath
add ``[PAD]``: 32,001 embedding rows on Llama-2's 32,000). A delta needs equal shapes, so the
model's ``vocab_rule`` decides (checked when a checkpoint is imported):

- ``strict`` (default): the checkpoint must have the base's vocabulary size, else the import
  fails naming the config key. (Single-model pruning refuses differing shapes, and a merge's
  tensors sliced to the base's rows cannot be evaluated with a tokenizer that has more tokens.)
- ``resize-base``: MergeLM's rule (spec dpp_merge.md §1.2, ``smart_tokenizer_and_embedding_resize``):
  the base gets the checkpoints' extra rows, each new input- and output-embedding row the mean of
  the base's existing rows, before any delta is taken (``resize_base_vocabulary``). Every published
  checkpoint of the model must then have the same number of rows, at least the base's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from methods.io.checkpoint import hub_offline

# PyTorch pickles and other formats that are never linked: safetensors are linked, pickles converted.
_NOT_LINKED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
_NOT_LINKED = {"pytorch_model.bin.index.json", "manifest.json"}
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# files of a checkpoint that describe its tokenizer (copied into a resized base)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt")
VOCAB_RULES = ("strict", "resize-base")


class PublishedCheckpointError(ValueError):
    """A published checkpoint cannot serve as a task's model; the message names the config key."""


def fetch(entry: dict, where: str) -> tuple[Path, dict]:
    """The local directory of a published checkpoint (``{source: local, path}`` or ``{source: hub,
    id, revision}``) and what identifies it (path, or hub id with the resolved commit)."""
    if entry["source"] == "local":
        path = Path(entry["path"]).resolve()
        if not (path / "config.json").is_file():
            raise PublishedCheckpointError(f"{where}.path: {str(path)!r} is not a checkpoint directory "
                                           "(no config.json there)")
        return path, {"source": "local", "path": str(path)}
    if entry["source"] != "hub":
        raise PublishedCheckpointError(f"{where}.source: {entry['source']!r} is not hub or local")
    from huggingface_hub import snapshot_download

    def snapshot(patterns: list[str]) -> Path:
        return Path(snapshot_download(entry["id"], revision=entry.get("revision"), local_files_only=hub_offline(),
                                      allow_patterns=patterns))

    try:
        # config, tokenizer and safetensors first; pickled weights only when there are no safetensors
        path = snapshot(["*.json", "*.safetensors", "*.txt", "*.model"])
        if not any((path / name).is_file() for name in SAFETENSORS):
            path = snapshot(["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    except Exception as error:  # offline cache miss, unknown id, no access
        raise PublishedCheckpointError(
            f"{where}.id: cannot fetch {entry['id']!r}{' at ' + entry['revision'] if entry.get('revision') else ''} "
            f"({type(error).__name__}: {error}); offline runs (HF_HUB_OFFLINE=1) need it in the Hugging Face cache, "
            "HF_HUB_OFFLINE=0 downloads it") from None
    # snapshots/<commit>/: the commit the revision resolved to
    return path, {"source": "hub", "id": entry["id"], "revision": entry.get("revision"), "commit": path.name}


def _link(source: Path, target: Path) -> None:
    os.symlink(source.resolve(), target)


def materialize(source: Path, out_dir: Path) -> dict:
    """Fill ``out_dir`` (an existing empty directory) from the checkpoint directory ``source``:
    safetensors weights and every other file linked, pickled weights converted. Returns what was
    done ({"weights": "linked" | "converted", "files": [...]})."""
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if any((source / name).is_file() for name in SAFETENSORS):
        how = "linked"
    elif any((source / name).is_file() for name in PICKLES):
        how = "converted"
        _convert_pickles(source, out_dir)
    else:
        raise PublishedCheckpointError(f"{source}: no weights ({' or '.join(SAFETENSORS + PICKLES)}); files: "
                                       f"{[p.name for p in files]}")
    linked = []
    for path in files:
        if path.name in _NOT_LINKED or path.name.endswith(_NOT_LINKED_SUFFIXES):
            continue
        _link(path, out_dir / path.name)
        linked.append(path.name)
    return {"weights": how, "files": linked}


def _convert_pickles(source: Path, out_dir: Path) -> None:
    """pytorch_model.bin (or its shards) as safetensors shards with the same grouping."""
    from safetensors.torch import save_file

    index = source / "pytorch_model.bin.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "pytorch_model.bin"]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        state = torch.load(source / shard, map_location="cpu", weights_only=True, mmap=True)
        # safetensors refuses tensors sharing storage (tied embeddings): every tensor gets its own
        state = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(state, out_dir / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in state})
        total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def vocabulary_size(location: str | Path) -> int:
    """The vocabulary size a checkpoint's config declares (a directory or a hub id; config only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(location))
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if size is None:
        raise PublishedCheckpointError(f"{location}: its config declares no vocab_size")
    return int(size)


def check_vocabulary(base_rows: int, rows: int, rule: str, where: str, model_key: str) -> None:
    """Refuse a published checkpoint whose vocabulary the model's ``vocab_rule`` cannot reconcile
    with the base's (``where``: its config key; ``model_key``: ``models.<name>``)."""
    if rule not in VOCAB_RULES:
        raise PublishedCheckpointError(f"{model_key}.vocab_rule: {rule!r} is not one of {list(VOCAB_RULES)}")
    if rows == base_rows:
        return
    if rule == "strict":
        raise PublishedCheckpointError(
            f"{where}: the checkpoint has {rows} vocabulary rows, the base {base_rows}; a delta needs equal shapes. "
            f"Set {model_key}.vocab_rule: resize-base (MergeLM's rule: the base gets the extra rows, each the mean "
            "of its existing rows) or use a checkpoint with the base's vocabulary")
    if rows < base_rows:
        raise PublishedCheckpointError(
            f"{where}: the checkpoint has {rows} vocabulary rows, fewer than the base's {base_rows}; "
            "vocab_rule resize-base only adds rows to the base")


def resize_base_vocabulary(base: str | Path, references: dict[str, str | Path], out_dir: Path,
                           model_key: str) -> dict:
    """Write to ``out_dir`` the base checkpoint with its vocabulary grown to the published
    checkpoints' (``references``: task -> checkpoint directory): MergeLM's
    ``smart_tokenizer_and_embedding_resize``, each new row of the input and (untied) output
    embedding the mean of the base's existing rows, computed in float32 and stored in the base's
    dtype. The tokenizer files come from the first checkpoint (by task name): the base's tokenizer
    plus the added tokens. Returns {"rows": [old, new], "tokenizer_from": task}."""
    import shutil

    from transformers import AutoModelForCausalLM

    from methods.io.checkpoint import checkpoint_dir_of

    sizes = {task: vocabulary_size(path) for task, path in sorted(references.items())}
    if len(set(sizes.values())) != 1:
        raise PublishedCheckpointError(
            f"{model_key}.finetuned: vocab_rule resize-base needs one vocabulary size, the published checkpoints "
            f"have {sizes}")
    rows = next(iter(sizes.values()))
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir_of(base), dtype="auto")
    embedding = model.get_input_embeddings()
    old = embedding.weight.shape[0]
    check_vocabulary(old, rows, "resize-base", f"{model_key}.finetuned", model_key)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    if rows > old:
        model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():
            for module in [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()]):
                if module is None:
                    continue
                weight = module.weight
                weight[old:] = weight[:old].to(torch.float32).mean(dim=0, keepdim=True).to(weight.dtype)
    model.save_pretrained(out_dir)
    first = next(iter(sorted(references)))
    for name in TOKENIZER_FILES:
        if (Path(references[first]) / name).is_file():
            shutil.copy2(Path(references[first]) / name, out_dir / name)
    return {"rows": [old, rows], "tied_embeddings": tied, "tokenizer_from": first}
