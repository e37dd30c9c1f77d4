"""Evaluate any variant on any task: load a checkpoint for the task (optionally overriding some of
its tensors with merged or compressed weights), then score it with the task's evaluator — ours for
encoders, lm-evaluation-harness for decoders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from methods.evaluate.encoder import evaluate_encoder
from methods.evaluate.harness import run_harness
from methods.finetune.train import load_for_task
from methods.tasks import TaskSpec
from methods.data.jsonl import read_jsonl


def load_task_model(checkpoint: str | Path, spec: TaskSpec, overrides: dict[str, torch.Tensor] | None = None,
                    *, device: str | torch.device = "cpu"):
    """The task's model class from ``checkpoint``, with ``overrides`` copied over its tensors, in eval
    mode on ``device`` (the evaluators feed it batches there: ``encoder.predict``, lm-eval's HFLM,
    ``perplexity``)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = load_for_task(checkpoint, spec)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{checkpoint}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{rows} rows; tokenizer and weights do not belong together")
    if overrides:
        apply_overrides(model, overrides, str(checkpoint))
    model.to(device)
    model.eval()
    return model, tokenizer


def apply_overrides(model: torch.nn.Module, overrides: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``overrides`` over the model's tensors of the same names (cast to their dtype, onto their
    device). Every override must name a tensor of the model with the same shape, so a merged body can
    never be silently dropped onto the wrong architecture."""
    own = model.state_dict()
    unknown = sorted(set(overrides) - set(own))
    if unknown:
        raise KeyError(f"{where}: the model has no tensors {unknown[:5]} to override")
    for name, tensor in overrides.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"tensor {name!r}: override shape {tuple(tensor.shape)} differs from the "
                             f"model's {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in overrides.items():
            own[name].copy_(tensor.to(own[name].dtype))


def evaluate_task(model, tokenizer, spec: TaskSpec, data_file: str | Path, batch_size: int,
                  max_length: int, cache: str | Path | None = None) -> tuple[dict[str, float], list[dict], dict | None]:
    """(metrics, per-example samples, lm-eval summary or None) of a loaded model on one split;
    ``cache``: lm-eval response cache of these exact weights (decoders)."""
    if spec.is_encoder:
        metrics, samples = evaluate_encoder(model, tokenizer, spec, read_jsonl(data_file), batch_size, max_length)
        return metrics, samples, None
    with tempfile.TemporaryDirectory() as include_dir:
        metrics, summary, samples = run_harness(model, tokenizer, spec, data_file, Path(include_dir), batch_size,
                                                cache)
    return metrics, samples, summary
