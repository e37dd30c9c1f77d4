"""Evaluate an encoder classifier/regressor on a task split: batched, deterministic, with a
progress bar; every example's prediction is kept for paired comparisons."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from methods.evaluate.metrics import classification_metrics, regression_metrics
from methods.finetune.batching import batch_to, encode_texts, encoder_batch
from methods.tasks import TaskSpec


@torch.inference_mode()
def predict(model, tokenizer, spec: TaskSpec, rows: list[dict], batch_size: int,
            max_length: int) -> list[float | int]:
    """The model's prediction for every row (class index, or the regression value), computed where
    the model is."""
    model.eval()
    predictions: list[float | int] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"evaluate {spec.name}", mininterval=2.0):
        chunk = rows[start:start + batch_size]
        encodings = encode_texts(tokenizer, spec.text_fields, chunk, max_length)
        logits = model(**batch_to(encoder_batch(encodings, tokenizer.pad_token_id), model.device)).logits
        if spec.kind == "regression":
            predictions += logits[:, 0].tolist()
        else:
            predictions += logits.argmax(-1).tolist()
    return predictions


def score(spec: TaskSpec, predictions: list, rows: list[dict]) -> dict[str, float]:
    labels = [row[spec.label_field] for row in rows]
    if spec.kind == "regression":
        metrics = regression_metrics(predictions, labels)
    else:
        metrics = classification_metrics(predictions, labels)
    return {name: metrics[name] for name in spec.metrics}


def evaluate_encoder(model, tokenizer, spec: TaskSpec, rows: list[dict], batch_size: int,
                     max_length: int) -> tuple[dict[str, float], list[dict]]:
    """Metrics and per-example records of a loaded sequence-classification model."""
    predictions = predict(model, tokenizer, spec, rows, batch_size, max_length)
    samples = [{"index": i, "prediction": p, "label": row[spec.label_field]}
               for i, (p, row) in enumerate(zip(predictions, rows))]
    return score(spec, predictions, rows), samples
