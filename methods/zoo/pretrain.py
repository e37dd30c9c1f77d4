"""Pre-train the zoo models on the generated corpus: masked LM for the encoder, causal LM for the
decoder. Fine-tuning then starts from genuinely pre-trained weights, so its deltas are the small,
structured updates that delta-pruning papers study, not a move away from random init."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from methods.finetune.batching import IGNORE, causal_lm_batch, encoder_batch
from methods.finetune.loop import param_groups, train
from methods.io.checkpoint import check_finite
from methods.seeding import seed_everything
from methods.zoo.models import (build_decoder, build_decoder_tokenizer, build_encoder,
                                build_encoder_tokenizer)


@dataclass
class _Loss:
    loss: torch.Tensor


class MaskedLMObjective(torch.nn.Module):
    """Masked-LM loss on ``BertForPreTraining`` (its NSP head and pooler are kept untrained)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor, **inputs) -> _Loss:
        logits = self.model(**inputs).prediction_logits
        return _Loss(torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE))


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of ordinary tokens; 80% [MASK], 10% random, 10% kept."""
    labels = input_ids.clone()
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = IGNORE
    action = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = mask_id
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    masked[randomised] = torch.randint(vocab_size, input_ids.shape, generator=generator)[randomised]
    return masked, labels


def pretrain_encoder(corpus: list[str], out_dir: Path, *, seed: int, hidden_size: int, layers: int,
                     heads: int, intermediate_size: int, max_length: int, steps: int, batch_size: int,
                     lr: float, weight_decay: float, warmup_ratio: float,
                     mlm_probability: float, device: str | torch.device = "cpu") -> list[float]:
    """Masked-LM pre-training on ``device``; the masks are drawn on the CPU (the same on every device)
    and the checkpoint is written from the CPU."""
    seed_everything(seed)
    tokenizer = build_encoder_tokenizer(max_length)
    model = build_encoder(tokenizer, hidden_size, layers, heads, intermediate_size, max_length)
    encodings = [tokenizer(line, truncation=True, max_length=max_length) for line in corpus]
    special_ids = torch.tensor(sorted(tokenizer.all_special_ids))
    masking = torch.Generator().manual_seed(seed + 1)

    def make_batch(indices: list[int]) -> dict:
        batch = encoder_batch([encodings[i] for i in indices], tokenizer.pad_token_id)
        special = torch.isin(batch["input_ids"], special_ids)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), mlm_probability, masking)
        return batch

    model.to(device)  # after the CPU initialisation, so the initial weights do not depend on the device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    losses = train(MaskedLMObjective(model), optimizer, make_batch, len(encodings), steps, batch_size,
                   warmup_ratio, seed, desc="pretrain encoder (MLM)", device=device)
    model.to("cpu")
    check_finite(model.state_dict(), "pre-trained model")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return losses


def pretrain_decoder(corpus: list[str], out_dir: Path, *, seed: int, hidden_size: int, layers: int,
                     heads: int, intermediate_size: int, max_length: int, steps: int, batch_size: int,
                     lr: float, weight_decay: float, warmup_ratio: float,
                     device: str | torch.device = "cpu") -> list[float]:
    """Causal-LM pre-training on ``device``; the checkpoint is written from the CPU."""
    seed_everything(seed)
    tokenizer = build_decoder_tokenizer(max_length)
    model = build_decoder(tokenizer, hidden_size, layers, heads, intermediate_size, max_length)
    lines = [tokenizer(line, add_special_tokens=False)["input_ids"][:max_length - 1] + [tokenizer.eos_token_id]
             for line in corpus]

    def make_batch(indices: list[int]) -> dict:
        # Every token is a target: an empty prompt and the whole line as the target.
        return causal_lm_batch([[] for _ in indices], [lines[i] for i in indices], tokenizer.pad_token_id)

    model.to(device)  # after the CPU initialisation, so the initial weights do not depend on the device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    losses = train(model, optimizer, make_batch, len(lines), steps, batch_size, warmup_ratio, seed,
                   desc="pretrain decoder (causal LM)", device=device)
    model.to("cpu")
    check_finite(model.state_dict(), "pre-trained model")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return losses
