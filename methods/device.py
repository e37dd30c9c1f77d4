"""Where a job computes: the config's ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) resolved
against what torch sees in this process.

A workflow job sees only the GPUs it holds: ``methods.io.job.job`` sets CUDA_VISIBLE_DEVICES to its
GPU slot (or to "" when the run offers no GPUs or the job's kind takes none, see the config's
``resources.<kind>.gpu``) before torch initialises CUDA. ``auto`` therefore computes on the job's
GPU when it holds one and on the CPU otherwise; ``cpu`` never touches a GPU; ``cuda`` insists on
one and fails with a message that says why none is visible.

Delta math stays float32 on either device: tensors are converted explicitly (``methods.prune.common
.f32`` and friends), and ``strict_float32`` turns off TF32, which CUDA would otherwise be free to use
for float32 matrix products (GPTQ's Hessians, DAREx's fits) and convolutions.
"""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_ENV = "DCBENCH_DEVICE"   # the config's `device`, set by the workflow (workflow/rules/common.smk)


def compute_device(requested: str | torch.device | None = None, *, where: str | None = None) -> torch.device:
    """The torch device for ``requested`` (None: $DCBENCH_DEVICE, i.e. the workflow config's
    ``device``, else ``auto``): ``auto`` → the first visible CUDA device when there is one, else the
    CPU; ``cpu``; ``cuda`` or ``cuda:N`` → that device, which must be visible. ``where`` names the
    setting in error messages."""
    if requested is None:
        requested = os.environ.get(DEVICE_ENV) or "auto"
        where = where or f"config key `device` (${DEVICE_ENV})"
    where = where or "device"
    if isinstance(requested, torch.device):
        requested = str(requested)
    name = str(requested).strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"{where}: {requested!r} is not a device; use one of {list(DEVICE_CHOICES)} or cuda:N")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        reason = ("this torch has no CUDA support" if torch.version.cuda is None else
                  "the job holds no GPU (CUDA_VISIBLE_DEVICES is empty: offer GPUs with --resources gpu=N "
                  "and give the job's kind resources.<kind>.gpu: 1)" if visible == "" else
                  "torch sees no CUDA device")
        raise RuntimeError(f"{where}: {requested!r} asks for a GPU but {reason}; use 'auto' to fall back to the CPU")
    device = torch.device("cuda", int(index or 0))
    if device.index >= torch.cuda.device_count():
        raise RuntimeError(f"{where}: {requested!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def strict_float32() -> None:
    """Full float32 precision for matrix products and convolutions on every device (no TF32)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def divide(tensor: torch.Tensor, divisor: float | torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor / divisor``, correctly rounded on every device. CUDA divides a tensor by a Python
    number as a product with its reciprocal, which can be one bit off; a divisor tensor on the same
    device is divided exactly there, and on the CPU it gives the very bits of the Python number."""
    if not isinstance(divisor, torch.Tensor):
        divisor = torch.tensor(divisor, dtype=tensor.dtype, device=tensor.device)
    return torch.div(tensor, divisor, out=out)


def cache_key(device: torch.device) -> dict:
    """What a between-workflow cache key (``methods.io.store``) adds for a result computed on
    ``device``: training on a GPU gives other bits than on the CPU (dropout draws from the GPU's
    generator; reductions round in another order), so GPU results are cached apart. CPU keys stay
    as they were before devices were chosen, so earlier entries remain valid."""
    return {} if device.type == "cpu" else {"device": device.type}
