"""LoRA fine-tuning through Hugging Face peft, saved as a full (merged) checkpoint.

The adapted matrices get W = W₀ + (α/r)·B·A; after training the adapter is merged
(``merge_and_unload``), so the saved checkpoint is an ordinary model whose delta against the base
is exactly the LoRA product (plus the fully trained head of an encoder, peft's ``modules_to_save``
for sequence classification). Every pruning method then applies to the LoRA delta as to any other:
DARE or DAREx-q on (α/r)·B·A, the dense product, as the DAREx paper prunes LoRA deltas.
Target modules default to peft's per-architecture choice (BERT: query, value; Llama: q_proj, v_proj).
"""

from __future__ import annotations

import torch

from methods.finetune.loop import param_groups
from methods.registry import Param, register
from methods.tasks import TaskSpec


def _prepare(model: torch.nn.Module, spec: TaskSpec, params: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=params["rank"], lora_alpha=params["alpha"], lora_dropout=params["dropout"],
                        target_modules=params["target_modules"],
                        task_type="SEQ_CLS" if spec.is_encoder else "CAUSAL_LM")
    return get_peft_model(model, config)


def _finalize(model: torch.nn.Module) -> torch.nn.Module:
    return model.merge_and_unload()


@register("finetune", "lora", params=(
    Param("rank", int, 8, minimum=1, doc="LoRA rank r"),
    Param("alpha", float, 16.0, minimum=0.0, doc="LoRA scale numerator: the update is (alpha/r)*B*A"),
    Param("dropout", float, 0.0, minimum=0.0, maximum=1.0, doc="dropout on the LoRA input"),
    Param("target_modules", list, None, doc="module names to adapt (default: peft's choice for the architecture)"),
    Param("beta1", float, 0.9, minimum=0.0, maximum=1.0),
    Param("beta2", float, 0.999, minimum=0.0, maximum=1.0),
    Param("eps", float, 1e-8, minimum=0.0),
), doc="LoRA (peft) with AdamW on the adapter (and an encoder's head); saved merged, so the delta is (alpha/r)*B*A",
    hooks={"prepare_model": _prepare, "finalize_model": _finalize})
def lora(model: torch.nn.Module, *, lr: float, weight_decay: float, rank: int, alpha: float, dropout: float,
         target_modules: list | None, beta1: float, beta2: float, eps: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), eps=eps)
