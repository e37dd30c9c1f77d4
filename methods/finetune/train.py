"""Fine-tune a base checkpoint on one task.

Encoders get a fresh sequence-classification (or regression) head; decoders are trained as causal
LMs on ``prompt + answer`` with the loss on the answer tokens only. Training runs in float32
whatever dtype the checkpoint was saved in (transformers 5 would otherwise load ``dtype="auto"``).
The optimizer is a registered ``finetune`` method.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from methods.finetune.batching import causal_lm_batch, encode_texts, encoder_batch
from methods.finetune.loop import param_groups, train
from methods.io.checkpoint import check_finite
from methods.io.delta_artifact import is_delta_checkpoint, materialize_delta
from methods.registry import Param, get, register
from methods.seeding import seed_everything
from methods.tasks import TaskSpec


@register("finetune", "adamw", params=(
    Param("beta1", float, 0.9, minimum=0.0, maximum=1.0),
    Param("beta2", float, 0.999, minimum=0.0, maximum=1.0),
    Param("eps", float, 1e-8, minimum=0.0),
), doc="AdamW (decoupled weight decay; none on biases and norms)")
def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, beta1: float, beta2: float,
          eps: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)


@dataclass
class Budget:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_length: int


def decoder_prompt(spec: TaskSpec, row: dict) -> str:
    return spec.prompt.format(**row)


def decoder_answer(spec: TaskSpec, row: dict) -> str:
    if spec.kind == "multiple_choice":
        return row[spec.choices_field][row[spec.label_field]]
    return row[spec.answer_field] + spec.answer_suffix


def load_for_task(checkpoint: str | Path, spec: TaskSpec, **kwargs):
    """The model class a task needs, in float32; a delta checkpoint is rebuilt over its base."""
    model_class = AutoModelForSequenceClassification if spec.is_encoder else AutoModelForCausalLM
    task_config = {}
    if spec.is_encoder:
        task_config = {"num_labels": spec.num_labels,
                       "problem_type": "regression" if spec.kind == "regression" else "single_label_classification"}
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_dir() and is_delta_checkpoint(checkpoint):
        # transformers takes a state dict only with a config object and no path, and only through
        # the concrete class (the Auto classes need a path)
        config = AutoConfig.from_pretrained(checkpoint, **task_config)
        return model_class._model_mapping[type(config)].from_pretrained(
            None, config=config, state_dict=materialize_delta(checkpoint), dtype=torch.float32, **kwargs)
    return model_class.from_pretrained(checkpoint, dtype=torch.float32, **task_config, **kwargs)


def finetune(base_dir: str | Path, spec: TaskSpec, train_rows: list[dict], out_dir: Path, *,
             optimizer: str, optimizer_params: dict, budget: Budget, seed: int,
             device: str | torch.device = "cpu") -> list[float]:
    """Fine-tune ``base_dir`` on ``train_rows``, save the model and tokenizer to ``out_dir`` and
    return the loss of every step. Trains on ``device``; the checkpoint is written from the CPU."""
    seed_everything(seed)  # the new head's initialisation depends on the fine-tuning seed
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_for_task(base_dir, spec)
    if spec.is_encoder:
        encodings = encode_texts(tokenizer, spec.text_fields, train_rows, budget.max_length)
        label_dtype = torch.float32 if spec.kind == "regression" else torch.long
        labels = torch.tensor([row[spec.label_field] for row in train_rows], dtype=label_dtype)

        def make_batch(indices: list[int]) -> dict:
            batch = encoder_batch([encodings[i] for i in indices], tokenizer.pad_token_id)
            batch["labels"] = labels[indices]
            return batch
    else:
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        prompts = [ids(decoder_prompt(spec, row)) for row in train_rows]
        answers = [ids(decoder_answer(spec, row)) for row in train_rows]

        def make_batch(indices: list[int]) -> dict:
            return causal_lm_batch([prompts[i] for i in indices], [answers[i] for i in indices],
                                   tokenizer.pad_token_id)

    method = get("finetune", optimizer)
    if "prepare_model" in method.hooks:  # e.g. LoRA: train adapters, then merge them into the weights
        model = method.hooks["prepare_model"](model, spec, optimizer_params)
    # Moved only now: the new head and any adapters are initialised on the CPU, so the starting
    # weights do not depend on the device; and before the optimizer, whose state (AdamR's θ₀
    # snapshot) is created where the parameters are.
    model.to(device)
    extra = {}
    if "total_steps" in inspect.signature(method.fn).parameters:  # e.g. statsq-qat: CGA anneals the last steps
        extra["total_steps"] = budget.steps
    opt = method.fn(model, lr=budget.lr, weight_decay=budget.weight_decay, **optimizer_params, **extra)
    losses = train(model, opt, make_batch, len(train_rows), budget.steps, budget.batch_size,
                   budget.warmup_ratio, seed, desc=f"fine-tune {spec.name} ({optimizer}, seed {seed})",
                   device=device)
    if "finalize_model" in method.hooks:
        model = method.hooks["finalize_model"](model)
    model.to("cpu")
    check_finite(model.state_dict(), f"fine-tuned {spec.name}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return losses
