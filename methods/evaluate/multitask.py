"""Score one set of merged tensors on several tasks at once (the multi-task protocol of MergeLM):
encoders keep each task's own head and take the merged body; decoders take every merged tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from methods.evaluate.run import apply_overrides, evaluate_task, load_task_model
from methods.data.lm_eval_scored import has_suite_data
from methods.tasks import TaskSpec


def normalized(score: float, reference: float) -> float:
    """Merged score relative to the individually fine-tuned model's. A reference at or below zero
    (possible for MCC or correlations) makes the ratio meaningless: the raw score is used then."""
    return score / reference if reference > 1e-6 else score


class MultiTaskScorer:
    """Callable: merged tensors -> mean normalized headline score over the tasks.

    Each task's fine-tuned model is loaded once and scored once as the reference; a call copies
    the merged tensors into every task model (restoring nothing: the next call overwrites the same
    tensors) and scores the given split. ``history`` keeps every call's per-task scores.

    Tasks without data of the suite (source lm-eval: instruct, code) are not scored (``skipped``):
    the merge is chosen on the other tasks; with none left, a call returns NaN (no choice to make;
    the workflow refuses a grid for such a model at start-up).

    The task models live and compute on ``device``; merged tensors may come from any device."""

    def __init__(self, tasks: dict[str, tuple[TaskSpec, str | Path, str | Path]], batch_size: int,
                 max_length: int, *, device: str | torch.device = "cpu"):
        self.batch_size, self.max_length = batch_size, max_length
        self.tasks = {}
        self.skipped = sorted(name for name, (spec, _, _) in tasks.items() if not has_suite_data(spec.name))
        for name, (spec, checkpoint, data_file) in sorted(tasks.items()):
            if name in self.skipped:
                continue
            model, tokenizer = load_task_model(checkpoint, spec, device=device)
            self.tasks[name] = (spec, model, tokenizer, data_file)
        self.reference = {name: self._primary(name) for name in self.tasks}
        self.history: list[dict[str, float]] = []

    def _primary(self, name: str) -> float:
        spec, model, tokenizer, data_file = self.tasks[name]
        metrics, _, _ = evaluate_task(model, tokenizer, spec, data_file, self.batch_size, self.max_length)
        return metrics[spec.primary]

    def __call__(self, merged: dict[str, torch.Tensor]) -> float:
        scores = {}
        for name, (spec, model, tokenizer, _) in self.tasks.items():
            apply_overrides(model, merged, f"task {name}")
            scores[name] = self._primary(name)
        self.history.append(scores)
        if not scores:
            return float("nan")
        return sum(normalized(scores[n], self.reference[n]) for n in scores) / len(scores)
