"""One training loop for pre-training and fine-tuning: shuffled mini-batches by step count, linear
warm-up and decay, gradient clipping, a progress bar, and the loss curve returned."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from methods.finetune.batching import batch_to


def no_decay(name: str) -> bool:
    """Biases and normalisation weights get no weight decay (the usual transformers grouping)."""
    return name.endswith("bias") or "norm" in name.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    warmup = max(1, int(round(steps * warmup_ratio)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def index_stream(n: int, batch_size: int, generator: torch.Generator):
    """Endless mini-batches of example indices: a fresh permutation each epoch."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[start:start + batch_size]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          make_batch: Callable[[list[int]], dict], n_examples: int, steps: int, batch_size: int,
          warmup_ratio: float, seed: int, desc: str, max_grad_norm: float = 1.0,
          *, device: str | torch.device | None = None) -> list[float]:
    """Train for ``steps`` optimizer steps and return the loss of each. ``make_batch`` builds each
    batch on the CPU from example indices (the index stream is a CPU generator, so the data order is
    the same on every device); the batch is then moved to ``device`` (None: where the model's
    parameters are). The model and its optimizer must already be on that device. Dropout draws from
    that device's own generator, so a GPU run with the same seed drops other units than a CPU run."""
    if n_examples == 0:
        raise ValueError(f"{desc}: no training examples")
    if device is None:
        device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    scheduler = linear_schedule(optimizer, steps, warmup_ratio)
    batches = index_stream(n_examples, batch_size, generator)
    losses: list[float] = []
    model.train()
    with tqdm(range(steps), desc=desc, mininterval=2.0) as bar:
        for step in bar:
            loss = model(**batch_to(make_batch(next(batches)), device)).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    return losses
