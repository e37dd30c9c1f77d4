"""LoRA fine-tuning through peft: the saved checkpoint is a plain model whose delta is the LoRA product."""

import torch
from transformers import AutoModelForSequenceClassification

from methods.finetune.train import Budget, finetune
from methods.registry import get
from methods.tasks import get_task
from methods.zoo.models import build_encoder, build_encoder_tokenizer
from methods.zoo.tasks import generate_task


def test_lora_checkpoint_is_merged_and_its_delta_is_low_rank(tmp_path):
    tokenizer = build_encoder_tokenizer(32)
    torch.manual_seed(0)
    build_encoder(tokenizer, 32, 1, 2, 64, 32).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = generate_task("zoo-sentiment", 0, {"train": 64, "validation": 10, "test": 10})["train"]
    params = get("finetune", "lora").resolve({"rank": 2, "alpha": 4.0}, "params")
    budget = Budget(steps=5, batch_size=16, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_length=32)
    finetune(tmp_path / "base", get_task("zoo-sentiment"), rows, tmp_path / "ft", optimizer="lora",
             optimizer_params=params, budget=budget, seed=0)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).state_dict()
    tuned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft", num_labels=2).state_dict()
    assert set(tuned) == set(base)  # no lora_A/lora_B or wrapper names survive the merge
    query = "bert.encoder.layer.0.attention.self.query.weight"
    delta = tuned[query] - base[query]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= 2
    untouched = "bert.encoder.layer.0.intermediate.dense.weight"  # not a LoRA target: no delta at all
    assert torch.equal(tuned[untouched], base[untouched])
