"""Checkpoint and file I/O: every artifact is written under a temporary name and renamed into place,
so a killed job never leaves a partial output that looks complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"

# Fault-injection hook for the test suite: seconds to wait between writing an artifact and renaming
# it into place (only for targets whose path contains DCBENCH_FAULT_COMMIT_MATCH), so a test can
# kill a job mid-write deterministically. Unset in normal runs.
COMMIT_DELAY_ENV = "DCBENCH_FAULT_COMMIT_DELAY"
COMMIT_MATCH_ENV = "DCBENCH_FAULT_COMMIT_MATCH"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file cannot be read; the message names the file."""


class NonFiniteWeightsError(ValueError):
    """A tensor holds NaN or inf; the message names the tensor."""


@contextlib.contextmanager
def _clear_disk_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, SafetensorError) as error:
        # safetensors reports ENOSPC as a SafetensorError carrying the OS message
        if getattr(error, "errno", None) == errno.ENOSPC or "os error 28" in str(error):
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {target}; nothing was "
                                        "written there (the partial copy was removed)") from error
        raise


def _commit_delay(target: Path) -> None:
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    if delay > 0 and os.environ.get(COMMIT_MATCH_ENV, "") in str(target):
        time.sleep(delay)


def _remove_debris(target: Path) -> None:
    """Remove temporaries of a writer that was killed (kill -9 skips clean-up); Snakemake lets one
    job at a time write a given target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.
    On any failure (including a full disk) the temporary directory is removed and ``target`` is
    left as it was."""
    target = Path(target)
    _remove_debris(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _clear_disk_errors(target):
            yield tmp
            _commit_delay(target)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Write through a temporary sibling file renamed into place once complete and synced."""
    target = Path(target)
    _remove_debris(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with _clear_disk_errors(target):
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            _commit_delay(target)
            os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights with NaN or inf before they become an artifact."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(f"{where}: tensor {name!r} has {bad} NaN/inf values; refusing to save it")


def write_json(obj, path: str | Path) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt file is an error that names it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CorruptCheckpointError(
            f"{path}: cannot read the safetensors file ({error}); it is corrupt or truncated. Delete it "
            "(or its directory) and re-run the workflow to rebuild it.") from error


def hub_offline() -> bool:
    """Whether the workflow runs without the hub: HF_HUB_OFFLINE, which defaults to 1 (offline)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") == "1"


def checkpoint_dir_of(location: str | Path) -> Path:
    """A checkpoint directory, or the local snapshot of a hub id (downloaded only when the workflow
    runs online, HF_HUB_OFFLINE=0)."""
    path = Path(location)
    if path.is_dir() or path.is_absolute() or str(location).startswith("."):
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(location), local_files_only=hub_offline(),
                                  allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint directory (or hub id), or of a
    delta checkpoint (methods/io/delta_artifact.py) rebuilt over its base."""
    checkpoint_dir = checkpoint_dir_of(checkpoint_dir)
    from methods.io.delta_artifact import is_delta_checkpoint, materialize_delta  # it builds on this module

    if is_delta_checkpoint(checkpoint_dir):
        return materialize_delta(checkpoint_dir)
    index = checkpoint_dir / WEIGHTS_INDEX
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            state.update(load_tensors(checkpoint_dir / shard))
        return state
    path = checkpoint_dir / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no {WEIGHTS} or {WEIGHTS_INDEX}; is this a checkpoint?")
    return load_tensors(path)


def save_like(state: dict[str, torch.Tensor], template_dir: str | Path, out_dir: Path) -> None:
    """Write ``state`` as model weights next to copies of the template's config and tokenizer files."""
    check_finite(state, str(out_dir))
    copy_template_files(template_dir, out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, out_dir / WEIGHTS, metadata={"format": "pt"})


def copy_template_files(template_dir: str | Path, out_dir: str | Path) -> None:
    """A checkpoint's config, tokenizer and other non-weight files (weights, delta files and the
    manifest belong to the checkpoint itself)."""
    for item in Path(template_dir).iterdir():
        if item.is_file() and not item.name.startswith(("model", "delta")) and item.name != MANIFEST:
            shutil.copy2(item, Path(out_dir) / item.name)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """Content hash of a checkpoint's weight files (config and tokenizer excluded); a delta
    checkpoint's hash covers its base's."""
    checkpoint_dir = Path(checkpoint_dir)
    # model*: a full checkpoint; delta*: a delta checkpoint; merged*: a merge's tensors (variant_storage: full)
    files = sorted(p for p in checkpoint_dir.iterdir()
                   if p.name.startswith(("model", "delta", "merged")) and p.is_file())
    digest = hashlib.sha256()
    from methods.io.delta_artifact import base_location, is_delta_checkpoint

    if is_delta_checkpoint(checkpoint_dir):
        digest.update(checkpoint_hash(checkpoint_dir_of(base_location(checkpoint_dir))).encode())
    for p in files:
        digest.update(p.name.encode() + file_sha256(p).encode())
    return digest.hexdigest()


def align_names(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``base`` with its tensors renamed to the fine-tuned model's names where the two checkpoints
    were saved by different model classes: a base saved as a bare ``BertModel`` (e.g.
    sentence-transformers checkpoints) names ``embeddings.…`` what the fine-tuned
    ``BertForSequenceClassification`` names ``bert.embeddings.…``. A fine-tuned tensor takes the
    base tensor whose name equals its own without the first component; names present in both are
    kept, and a renamed tensor appears under its new name only. Refuses when no fine-tuned tensor
    has a counterpart, since every delta would then be silently empty."""
    aligned = dict(base)
    for name in finetuned:
        if name not in aligned and "." in name:
            stripped = name.split(".", 1)[1]
            if stripped in aligned and stripped not in finetuned:
                aligned[name] = aligned.pop(stripped)
    shared = [n for n, t in finetuned.items() if t.is_floating_point() and n in aligned]
    if not shared:
        raise ValueError(f"{where}: no tensor of the fine-tuned model has a counterpart in the base "
                         f"(fine-tuned {sorted(finetuned)[:3]} vs base {sorted(base)[:3]}); "
                         "are these the same architecture?")
    return aligned
