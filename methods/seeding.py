"""Seeds derived from names, so that a random draw depends on *what* it is for, not on when it runs."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text, e.g. ``derive_seed(mask_seed, "bert.encoder...weight")``.

    sha256 is stable across processes and platforms (unlike ``hash()``)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def cpu_generator(*parts: object) -> torch.Generator:
    """A CPU torch generator seeded by ``derive_seed(*parts)``: same draws on every device and run."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(*parts))
    return generator


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global generators (model init, dropout, data order)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
