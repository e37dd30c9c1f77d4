"""Perplexity of a causal LM on a text file, with a fixed sliding window.

The text is tokenized once (no special tokens). Each forward pass sees at most ``window`` tokens
and scores the last ``stride`` of them, so every token after the first is scored exactly once
with at least ``window - stride`` tokens of context (fewer only at the start of the text): the
strided evaluation of the transformers docs ("Perplexity of fixed-length models"). It is computed
as an exact sum of token log-likelihoods, not a mean of per-window means, so the figure does not
depend on how the last window is cut. ``stride`` must be below ``window``: a token needs context.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, window: int, stride: int, max_tokens: int | None = None) -> dict:
    """{"perplexity", "nll_per_token", "tokens_scored", "window", "stride"} of ``model`` on ``text``."""
    if not 0 < stride < window:
        raise ValueError(f"perplexity needs 0 < stride < window, got stride {stride} and window {window}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and window > positions:
        raise ValueError(f"perplexity window {window} exceeds the model's {positions} positions; lower evaluate.perplexity.window")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    model.eval()
    device = next(model.parameters()).device
    total_nll, scored_until = 0.0, 1  # the first token has no context: never scored
    passes = 1 + max(0, math.ceil((len(ids) - window) / stride))
    for _ in tqdm(range(passes), desc="perplexity", mininterval=2.0):
        end = min(len(ids), window if scored_until == 1 else scored_until + stride)
        begin = max(0, end - window)
        chunk = ids[begin:end].unsqueeze(0).to(device)
        # position j predicts token j + 1: score the targets scored_until .. end - 1
        log_probs = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].to(torch.float32), dim=-1)
        first = scored_until - begin - 1
        targets = chunk[0, first + 1:].unsqueeze(1)
        total_nll -= float(log_probs[first:].gather(1, targets).sum())
        scored_until = end
    assert scored_until == len(ids), (scored_until, len(ids))
    scored = len(ids) - 1
    mean = total_nll / scored
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": scored,
            "window": window, "stride": stride}


def text_perplexity(model, tokenizer, path: str | Path, window: int, stride: int,
                    max_tokens: int | None = None) -> dict:
    return perplexity(model, tokenizer, Path(path).read_text(encoding="utf-8"), window, stride, max_tokens)
