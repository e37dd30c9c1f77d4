"""GPU slots on a workstation: which devices a job may use, so that concurrent jobs never share one.

Snakemake's `--resources gpu=N` keeps at most N GPU jobs running at once but does not say which
device each one gets (snakemake/snakemake#281). A job that asks for GPUs takes free slots here: slot
`i` is the lock file `<slot dir>/gpu-<device>.lock`, held with `fcntl.flock` for as long as the job
runs. The kernel drops the lock when the process ends, however it ends (exception, SIGKILL, OOM
kill), so a failed job always frees its slot. The job then sets CUDA_VISIBLE_DEVICES to its devices
before anything initialises CUDA (torch reads the variable once, at CUDA initialisation).

CPU-only fallback: a job that asks for no GPU, or a machine without one, gets CUDA_VISIBLE_DEVICES=""
(a job that reserved no GPU must not touch one). Inside a SLURM job SLURM has already chosen the
devices, and nothing is changed.

Environment: DCBENCH_GPU_POOL (how many devices the run shares out; the workflow sets it from
`--resources gpu=N`), DCBENCH_GPU_SLOT_DIR (where the lock files live; default .snakemake/gpu_slots in
the working directory), CUDA_VISIBLE_DEVICES of the Snakemake process (the devices to share out;
default: every device nvidia-smi lists).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping

POOL_ENV = "DCBENCH_GPU_POOL"
DIR_ENV = "DCBENCH_GPU_SLOT_DIR"
DEFAULT_DIR = ".snakemake/gpu_slots"

log = logging.getLogger("dcbench")


def physical_devices() -> list[str]:
    """Indices of the NVIDIA GPUs on this machine (nvidia-smi; no CUDA initialisation), or []."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_pool(env: Mapping[str, str] | None = None, devices: list[str] | None = None) -> list[str]:
    """The devices the run shares out: the Snakemake process's CUDA_VISIBLE_DEVICES if it was set,
    else every physical device; the first DCBENCH_GPU_POOL of them when that is set."""
    env = os.environ if env is None else env
    if devices is None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = ([d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
                   if visible is not None else physical_devices())
    size = env.get(POOL_ENV)
    return devices[:int(size)] if size not in (None, "") else devices


@dataclass
class Allocation:
    """The devices a job holds; ``release`` (or process exit) frees them."""

    devices: list[str]
    _locks: list[IO] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.devices)

    def release(self) -> None:
        for handle in self._locks:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._locks.clear()


def _try_lock(path: Path) -> IO | None:
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")  # who holds it, for a person looking
    handle.flush()
    return handle


def acquire(count: int, devices: list[str], slot_dir: str | Path, *, timeout: float | None = None,
            poll: float = 0.2) -> Allocation:
    """Lock `count` free slots among `devices`, waiting for other jobs to release theirs (at most
    `timeout` seconds; None: no limit). count 0 or no devices: an empty allocation (CPU only)."""
    if count <= 0 or not devices:
        return Allocation([])
    if count > len(devices):
        raise ValueError(f"a job asks for {count} GPUs but only {len(devices)} are shared out ({devices})")
    slot_dir = Path(slot_dir)
    slot_dir.mkdir(parents=True, exist_ok=True)
    start, last_note = time.monotonic(), time.monotonic()
    while True:
        held: list[tuple[str, IO]] = []
        for device in devices:
            handle = _try_lock(slot_dir / f"gpu-{device}.lock")
            if handle is not None:
                held.append((device, handle))
                if len(held) == count:
                    return Allocation([d for d, _ in held], [h for _, h in held])
        Allocation([], [h for _, h in held]).release()  # all or nothing: never sit on a partial set
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"no {count} free GPU slot(s) among {devices} in {slot_dir} after {waited:.0f} s")
        if time.monotonic() - last_note > 60:
            log.info("waiting for %d free GPU slot(s) among %s (%.0f s)", count, devices, waited)
            last_note = time.monotonic()
        time.sleep(poll)


@contextlib.contextmanager
def gpu_slots(count: int, *, env: dict | None = None, devices: list[str] | None = None,
              slot_dir: str | Path | None = None, timeout: float | None = None) -> Iterator[Allocation]:
    """Hold `count` GPU slots for the duration of the block and set CUDA_VISIBLE_DEVICES in `env`
    (default os.environ) to them ("" when the job gets none: CPU only). Inside a SLURM job nothing is
    allocated or changed: SLURM has set CUDA_VISIBLE_DEVICES for the job's own GPUs."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        yield Allocation([d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d])
        return
    pool = device_pool(env, devices) if count > 0 else []  # a CPU job needs no device list (nvidia-smi)
    allocation = acquire(count, pool, slot_dir or env.get(DIR_ENV) or DEFAULT_DIR, timeout=timeout)
    previous = env.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = allocation.cuda_visible_devices
    try:
        yield allocation
    finally:
        allocation.release()
        if previous is None:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            env["CUDA_VISIBLE_DEVICES"] = previous
