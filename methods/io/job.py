"""Per-job process set-up shared by the workflow's scripts (no Snakemake imports here)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from methods.io.gpu_slots import gpu_slots


def requested_gpus() -> int:
    """The `gpu` resource of the Snakemake job running this script (0 outside Snakemake)."""
    snakemake = getattr(sys.modules.get("__main__"), "snakemake", None)
    resources = getattr(snakemake, "resources", None)
    try:
        return int(resources.get("gpu", 0) or 0) if resources is not None else 0
    except (TypeError, ValueError):
        return 0


@contextlib.contextmanager
def job(log_path: str | Path | None, threads: int = 1, gpus: int | None = None) -> Iterator[logging.Logger]:
    """Send the job's stdout/stderr (progress bars included) to its log file, pin torch's thread
    count to the job's share of cores, make torch deterministic, and keep everything offline.
    GPUs: hold `gpus` GPU slots (default: the job's `gpu` resource) and set CUDA_VISIBLE_DEVICES
    to them before torch can initialise CUDA; none for a CPU-only job (methods/io/gpu_slots.py).
    Float32 stays float32 on a GPU (no TF32: methods/device.py)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA initialises
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with gpu_slots(requested_gpus() if gpus is None else gpus) as allocation:
        import torch

        from methods.device import strict_float32

        torch.set_num_threads(max(1, int(threads)))
        torch.use_deterministic_algorithms(True, warn_only=True)
        strict_float32()
        logger = logging.getLogger("dcbench")
        if log_path is None:
            yield logger
            return
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            handler = logging.StreamHandler(log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            if os.environ.get("SLURM_JOB_ID"):  # provenance; tests/test_slurm.py matches it with sacct
                logger.info("SLURM job %s on %s", os.environ["SLURM_JOB_ID"], os.environ.get("SLURMD_NODENAME", "?"))
            if allocation.devices:
                logger.info("GPU(s) %s (CUDA_VISIBLE_DEVICES)", allocation.cuda_visible_devices)
            try:
                yield logger
            except BaseException:
                logger.exception("job failed")
                raise
            finally:
                logger.removeHandler(handler)
