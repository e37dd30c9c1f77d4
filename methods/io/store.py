"""Between-workflow cache of expensive directory outputs (pre-trained and fine-tuned checkpoints).

Two experiments that fine-tune the same base on the same data with the same settings share one
entry: the job that comes second finds it and links its files into its output instead of training.
An entry is keyed by content, never by path or experiment name:

    sha256(stage, the job's settings (JSON), the source of the `methods` package and of the stage's
           script, and the content of every input: file bytes, or every file of a directory except
           manifest.json and hidden files; an input that is not a path, e.g. a hub id, by its value)

so any change to the code, the settings or the data is a new entry. Entries are complete
directories, published with one rename (a job killed while storing leaves no entry); outputs are
hard links to the entry's files (a copy across file systems), so a cached checkpoint costs its
disk space once. The lookup runs inside the job, so it works the same on a workstation and in a
SLURM job (the cache directory must then be on a shared file system).

On only when the workflow runs with `--cache` (the profiles set it): the workflow then exports
DCBENCH_CACHE, the cache directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from methods.io.checkpoint import atomic_dir, file_sha256

CACHE_ENV = "DCBENCH_CACHE"
FORMAT = 1  # bump when the key's recipe changes
SKIPPED = {"manifest.json"}  # provenance (paths, wall time) differs between identical computations

log = logging.getLogger("dcbench")


def cache_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """The cache directory if the cache is on, else None."""
    location = (os.environ if env is None else env).get(CACHE_ENV)
    return Path(location) if location else None


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def digest(value) -> str:
    """Content digest of an input: a file, a directory (every file but manifest.json and hidden ones,
    with its relative path), or a value that is not an existing path (JSON)."""
    if isinstance(value, (str, Path)) and str(value) and Path(value).exists():
        path = Path(value)
        if path.is_file():
            return "file:" + file_sha256(path)
        h = hashlib.sha256()
        for f in _files(path):
            if f.name in SKIPPED and f.parent == path:
                continue
            h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode() + b"\0")
        return "dir:" + h.hexdigest()
    if isinstance(value, (list, tuple)):
        return "list:" + hashlib.sha256("\0".join(digest(v) for v in value).encode()).hexdigest()
    return "value:" + json.dumps(value, sort_keys=True, default=str)


def code_version(stage: str) -> str:
    """sha256 of the `methods` package source and of the stage's script, workflow/scripts/<stage>.py."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    script = package.parent / "workflow" / "scripts" / f"{stage}.py"
    for f in sorted(package.rglob("*.py")) + ([script] if script.is_file() else []):
        h.update(str(f.relative_to(package.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def entry_key(stage: str, settings: dict, inputs: Mapping[str, object], code: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "stage": stage, "settings": settings,
                         "code": code_version(stage) if code is None else code}, sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        h.update(name.encode() + b"\0" + digest(inputs[name]).encode() + b"\0")
    return h.hexdigest()


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` into the existing directory `target` (copy across devices)."""
    for f in source.rglob("*"):
        dest = target / f.relative_to(source)
        if f.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dest)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copy2(f, dest)


def _publish(output: Path, entry: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the entry from the group
        _link_tree(output, tmp)
        try:
            os.rename(tmp, entry)
        except OSError as error:  # another job published the same entry first: keep theirs
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reuse_or_make(output: str | Path, stage: str, settings: dict, inputs: Mapping[str, object],
                  make: Callable[[Path], None]) -> bool:
    """Fill the directory `output`: from the cache entry of (stage, settings, inputs) when the cache is
    on and holds it, else by `make(tmp_dir)` (written atomically, as atomic_dir does), and
    then store it. Returns True when the entry was reused."""
    cache = cache_dir()
    if cache is None:
        with atomic_dir(output) as out:
            make(out)
        return False
    key = entry_key(stage, settings, inputs)
    entry = cache / key
    if entry.is_dir():
        with atomic_dir(output) as out:
            _link_tree(entry, out)
        log.info("between-workflow cache: reused entry %s (%s)", key, cache)
        return True
    with atomic_dir(output) as out:
        make(out)
    _publish(Path(output), entry)
    log.info("between-workflow cache: stored entry %s (%s)", key, cache)
    return False
