"""Checkpoint and file I/O: every artifact is written under a temporary name and renamed into place,
so a killed job never leaves a partial output that looks complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    index = checkpoint_dir / WEIGHTS_INDEX
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            state.update(load_file(checkpoint_dir / shard))
        return state
    path = checkpoint_dir / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}; is this a checkpoint?")
    return load_file(path)


def save_like(state: dict[str, torch.Tensor], template_dir: str | Path, out_dir: Path) -> None:
    """Write ``state`` as model weights next to copies of the template's config and tokenizer files."""
    template_dir = Path(template_dir)
    for item in template_dir.iterdir():
        if item.is_file() and not item.name.startswith("model") and item.name != MANIFEST:
            shutil.copy2(item, out_dir / item.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / WEIGHTS, metadata={"format": "pt"})


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """Content hash of a checkpoint's weight files (config and tokenizer excluded)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(p for p in checkpoint_dir.iterdir() if p.name.startswith("model") and p.is_file())
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + file_sha256(p).encode())
    return digest.hexdigest()
