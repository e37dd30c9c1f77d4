"""Tokenised examples to padded tensors for the training loop."""

from __future__ import annotations

from typing import Any, Mapping

import torch

IGNORE = -100  # label value the losses skip


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def causal_lm_batch(prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> dict:
    """Right-padded causal-LM batch whose loss covers only the target tokens."""
    ids = [p + t for p, t in zip(prompts, targets)]
    labels = [[IGNORE] * len(p) + t for p, t in zip(prompts, targets)]
    input_ids = pad(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": (pad([[1] * len(s) for s in ids], 0)),
            "labels": pad(labels, IGNORE)}


def encode_texts(tokenizer, text_fields: tuple[str, ...], rows: list[dict], max_length: int) -> list[dict]:
    """Tokenizer outputs of each row's text field(s) (a pair for sentence-pair tasks), truncated."""
    return [tokenizer(*(row[f] for f in text_fields), truncation=True, max_length=max_length) for row in rows]


def encoder_batch(encodings: list[dict], pad_id: int) -> dict:
    """Pad tokenizer outputs (input_ids, token_type_ids, attention_mask) to one width."""
    batch = {"input_ids": pad([e["input_ids"] for e in encodings], pad_id),
             "attention_mask": pad([e["attention_mask"] for e in encodings], 0)}
    if "token_type_ids" in encodings[0]:
        batch["token_type_ids"] = pad([e["token_type_ids"] for e in encodings], 0)
    return batch


def batch_to(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor on ``device``: a dict of model keyword arguments, a tuple or list
    of positional ones, or one tensor (nested freely); other values as they are. Batches are built
    on the CPU, so what they hold (random masks, index order) does not depend on where the model
    computes; a tensor already on ``device`` is returned as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: batch_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(value, device) for value in batch)
    return batch
