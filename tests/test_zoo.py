"""The offline zoo: deterministic data (same seed, same bytes), sound splits, working tokenizers."""

import hashlib
import json

import pytest
import torch

from methods.tasks import get_task
from methods.zoo.language import all_arithmetic_problems, vocabulary
from methods.zoo.models import (build_decoder, build_decoder_tokenizer, build_encoder,
                                build_encoder_tokenizer)
from methods.zoo.tasks import ZOO_TASKS, generate_corpus, generate_task

SIZES = {"train": 300, "validation": 60, "test": 80}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def test_corpus_same_seed_same_bytes_and_seed_matters():
    assert _digest(generate_corpus(0, 500)) == _digest(generate_corpus(0, 500))
    assert _digest(generate_corpus(0, 500)) != _digest(generate_corpus(1, 500))


@pytest.mark.parametrize("task", ZOO_TASKS)
def test_task_same_seed_same_bytes(task):
    assert _digest(generate_task(task, 0, SIZES)) == _digest(generate_task(task, 0, SIZES))
    assert _digest(generate_task(task, 0, SIZES)) != _digest(generate_task(task, 1, SIZES))


@pytest.mark.parametrize("task", ZOO_TASKS)
def test_evaluation_splits_never_repeat_training_examples(task):
    spec = get_task(task)
    splits = generate_task(task, 0, SIZES)
    key = lambda row: tuple(row[f] for f in spec.text_fields)  # noqa: E731
    train = {key(r) for r in splits["train"]}
    assert not train & {key(r) for r in splits["test"]}
    assert not train & {key(r) for r in splits["validation"]}


@pytest.mark.parametrize("task", ["zoo-sentiment", "zoo-acceptability", "zoo-review"])
def test_classification_tasks_have_both_classes_in_reasonable_shares(task):
    rows = generate_task(task, 0, SIZES)["test"]
    share = sum(r["label"] for r in rows) / len(rows)
    assert 0.25 < share < 0.8


def test_rating_labels_cover_the_scale():
    labels = [r["label"] for r in generate_task("zoo-rating", 0, SIZES)["train"]]
    assert min(labels) < 1.0 and max(labels) > 4.0 and all(0.0 <= x <= 5.0 for x in labels)


def test_arithmetic_answers_are_correct_and_splits_partition_problems():
    splits = generate_task("zoo-arithmetic", 0, SIZES)
    numbers = {w: i for i, w in enumerate(vocabulary()[vocabulary().index("zero"):][:21])}
    total = 0
    for rows in splits.values():
        for row in rows:
            _, _, a, op, b, _ = row["question"].split()
            expected = numbers[a] + numbers[b] if op == "plus" else numbers[a] - numbers[b]
            assert numbers[row["answer"]] == expected
        total += len(rows)
    assert total == len(all_arithmetic_problems())


def test_every_generated_word_is_in_the_vocabulary():
    vocab = set(vocabulary())
    words = {w for line in generate_corpus(0, 2000) for w in line.split()}
    for task in ZOO_TASKS:
        for row in generate_task(task, 0, SIZES)["train"]:
            for field in get_task(task).text_fields:
                words.update(row[field].split())
    assert words <= vocab


def test_encoder_tokenizer_round_trip_and_models_run(tmp_path):
    tok = build_encoder_tokenizer(32)
    enc = tok("the movie was not good .", "the cat runs .")
    assert tok.unk_token_id not in enc["input_ids"]
    assert enc["input_ids"][0] == tok.cls_token_id and set(enc["token_type_ids"]) == {0, 1}
    model = build_encoder(tok, 16, 1, 2, 32, 32)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    ids = AutoTokenizer.from_pretrained(tmp_path)("the cat runs .", return_tensors="pt")
    assert loaded(**ids).logits.shape == (1, 2)


def test_decoder_tokenizer_decodes_words_and_adds_no_bos():
    tok = build_decoder_tokenizer(32)
    ids = tok("three plus four is seven .", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "three plus four is seven."  # transformers cleans up " ."
    assert tok("seven")["input_ids"] == tok("seven", add_special_tokens=False)["input_ids"]
    model = build_decoder(tok, 16, 1, 2, 32, 32)
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))
