"""Provenance manifest written beside every artifact: what made it, from which parents, at what cost."""

from __future__ import annotations

import platform
import resource
import sys
import time
from pathlib import Path

from methods.io.checkpoint import MANIFEST, checkpoint_dir_of, checkpoint_hash, write_json


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


class Manifest:
    """Collects provenance while a job runs; ``write`` records it with wall time and peak memory."""

    def __init__(self, stage: str, method: str, params: dict, parents: dict[str, str | Path] | None = None,
                 seeds: dict | None = None):
        self.started = time.perf_counter()
        self.record = {
            "stage": stage, "method": method, "params": params, "seeds": seeds or {},
            # a hub id (a base with source: hub) is hashed from its snapshot in the Hugging Face cache
            "parents": {name: {"path": str(path), "weights_sha256": checkpoint_hash(checkpoint_dir_of(path))}
                        for name, path in (parents or {}).items()},
            "versions": library_versions(),
        }

    def write(self, out_dir: str | Path, **extra) -> dict:
        out_dir = Path(out_dir)
        self.record.update(extra)
        self.record["wall_time_s"] = round(time.perf_counter() - self.started, 3)
        self.record["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if any(p.name.startswith("model") for p in out_dir.iterdir()):
            self.record["weights_sha256"] = checkpoint_hash(out_dir)
        write_json(self.record, out_dir / MANIFEST)
        return self.record
