"""Decoder evaluation: lm-evaluation-harness on generated tasks (offline), its response cache,
tasks by name, and sliding-window perplexity."""

import json
import math

import pytest
import torch

from methods.evaluate.harness import run_harness, run_named_tasks, task_config
from methods.evaluate.perplexity import perplexity
from methods.report.aggregate import records_to_frame
from methods.tasks import get_task
from methods.zoo.models import build_decoder, build_decoder_tokenizer
from methods.zoo.tasks import generate_task

TEXT = " ".join(["the cat sees a dog .", "two plus three is five .", "the movie was not good ."] * 12)


@pytest.fixture(scope="module")
def tiny_decoder():
    torch.manual_seed(0)
    tokenizer = build_decoder_tokenizer(64)
    return build_decoder(tokenizer, 16, 1, 2, 32, 64).eval(), tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", ["zoo-review", "zoo-arithmetic"])
def test_lm_eval_scores_a_generated_task_offline_and_caches_per_model(tmp_path, tiny_decoder, task):
    model, tokenizer = tiny_decoder
    rows = generate_task(task, 0, {"train": 20, "validation": 10, "test": 12})["test"][:12]
    data = _jsonl(tmp_path / "test.jsonl", rows)
    cache = tmp_path / "cache" / "weights-hash"
    metrics, summary, samples = run_harness(model, tokenizer, get_task(task), data, tmp_path / "yaml", 4, cache)
    primary = get_task(task).primary
    assert 0.0 <= metrics[primary] <= 1.0 and len(samples) == len(rows)
    assert summary["settings"]["num_fewshot"] == 0 and summary["n-samples"]
    assert list(cache.parent.glob("weights-hash*.db"))  # lm-eval's sqlite response cache
    again, _, _ = run_harness(model, tokenizer, get_task(task), data, tmp_path / "yaml2", 4, cache)
    assert again == metrics


def test_generated_task_yaml_uses_absolute_paths_and_gsm8k_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = task_config(get_task("gsm8k"), "data/test.jsonl")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "data" / "test.jsonl")
    assert [f["name"] for f in config["filter_list"]] == ["strict-match", "flexible-extract"]
    assert config["generation_kwargs"]["until"][0] == "Question:" and config["generation_kwargs"]["do_sample"] is False


def test_gsm8k_style_data_through_lm_eval(tmp_path, tiny_decoder):
    tokenizer = tiny_decoder[1]
    model = build_decoder(tokenizer, 16, 1, 2, 32, 320).eval()  # room for GSM8K's 256 generated tokens
    data = _jsonl(tmp_path / "test.jsonl", [{"question": "two plus three", "answer": "five\n#### 5"}] * 3)
    metrics, _, samples = run_harness(model, tokenizer, get_task("gsm8k"), data, tmp_path / "yaml", 2)
    assert metrics["exact_match"] == 0.0  # an untrained model writes no "#### 5"
    assert len(samples) == 3 * 2  # lm-eval logs each document once per filter (strict, flexible)


def test_tasks_by_name_resolve_and_unknown_names_fail_clearly(tmp_path, tiny_decoder):
    model, tokenizer = tiny_decoder
    data = _jsonl(tmp_path / "review.jsonl", generate_task("zoo-review", 0, {"train": 5, "validation": 5, "test": 6})["test"])
    include = tmp_path / "tasks"
    include.mkdir()
    config = {**task_config(get_task("zoo-review"), data), "task": "my_review"}
    (include / "my_review.yaml").write_text(json.dumps(config))  # JSON is YAML
    metrics, summary, samples = run_named_tasks(model, tokenizer, ["my_review"], 4, include_path=include)
    assert 0.0 <= metrics["my_review"]["acc"] <= 1.0 and len(samples["my_review"]) == 6
    with pytest.raises(KeyError, match="no_such_task"):
        run_named_tasks(model, tokenizer, ["no_such_task"], 4, include_path=include)


def _full_nll(model, ids):
    logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
    return float(-torch.log_softmax(logits, -1).gather(1, ids[1:].unsqueeze(1)).sum())


@torch.inference_mode()
def test_perplexity_scores_every_token_once_and_matches_a_full_pass(tiny_decoder):
    model, tokenizer = tiny_decoder
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:60]
    text = tokenizer.decode(ids)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    whole = perplexity(model, tokenizer, text, window=64, stride=32)  # one window holds the whole text
    assert whole["tokens_scored"] == len(ids) - 1
    assert whole["perplexity"] == pytest.approx(math.exp(_full_nll(model, ids) / (len(ids) - 1)), rel=1e-5)
    # Windows of 16 scoring 8 tokens each: the first window's tokens as a full pass, the rest each once.
    strided = perplexity(model, tokenizer, text, window=16, stride=8)
    assert strided["tokens_scored"] == len(ids) - 1
    expected = _full_nll(model, ids[:16])
    end = 16
    while end < len(ids):
        new_end = min(len(ids), end + 8)
        begin = new_end - 16
        chunk = ids[begin:new_end]
        logits = model(input_ids=chunk.unsqueeze(0)).logits[0, :-1]
        log_probs = torch.log_softmax(logits, -1)
        first = end - begin - 1
        expected -= float(log_probs[first:].gather(1, chunk[first + 1:].unsqueeze(1)).sum())
        end = new_end
    assert strided["nll_per_token"] == pytest.approx(expected / (len(ids) - 1), rel=1e-5)
    with pytest.raises(ValueError, match="stride < window"):
        perplexity(model, tokenizer, text, window=16, stride=16)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        perplexity(model, tokenizer, text, window=128, stride=8)


def test_named_task_rows_in_the_tidy_table(tmp_path):
    record = {"experiment": "e", "model": "m", "arch": "decoder", "task": "zoo-review", "finetune": "adamw", "seed": 0,
              "stage": "finetune", "method": "adamw", "variant": "adamw", "drop_rate": None, "mask_seed": None,
              "params": {}, "selected_on": "", "split": "test", "primary_metric": "acc",
              "metrics": {"acc": 0.7, "perplexity": 12.5}, "checkpoint_sha256": "x",
              "harness_tasks": {"metrics": {"arc_easy": {"acc": 0.4, "acc_norm": 0.45, "acc_stderr": 0.01}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    frame = records_to_frame([tmp_path / "metrics.json"])
    named = frame[frame["task"] == "lm-eval:arc_easy"]
    assert set(named["metric"]) == {"acc", "acc_norm"}
    assert named[named["is_primary"]]["metric"].tolist() == ["acc_norm"]
    assert frame[(frame["task"] == "zoo-review") & (frame["metric"] == "perplexity")]["value"].item() == 12.5
