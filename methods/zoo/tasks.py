"""Generated tasks of the synthetic language, and the pre-training corpus.

Encoder tasks mirror three GLUE scoring styles: ``zoo-sentiment`` (binary, accuracy, like SST-2),
``zoo-acceptability`` (grammatical or not, Matthews correlation, like CoLA) and ``zoo-rating``
(a review's rating 0-5, regression scored by Pearson/Spearman, like STS-B). Decoder tasks: ``zoo-arithmetic``
(free generation, exact match) and ``zoo-review`` (sentiment as two-way multiple choice by
log-likelihood). Each split is drawn from its own seed and test/validation examples never repeat a
training example.
"""

from __future__ import annotations

from typing import Callable, Iterable

from methods.seeding import derive_seed
from methods.tasks import TaskSpec, register_task
from methods.zoo.language import (INTRANSITIVE, NUMBERS, TRANSITIVE, Generator,
                                  all_arithmetic_problems)

SPLITS = ("train", "validation", "test")

SENTIMENT = register_task(TaskSpec(
    name="zoo-sentiment", arch="encoder", kind="classification", text_fields=("sentence",),
    metrics=("accuracy",), primary="accuracy", num_labels=2,
    description="review sentiment with negation and mixed clauses (SST-2 style)"))
ACCEPTABILITY = register_task(TaskSpec(
    name="zoo-acceptability", arch="encoder", kind="classification", text_fields=("sentence",),
    metrics=("mcc", "accuracy"), primary="mcc", num_labels=2,
    description="grammatical vs corrupted sentences, 35% corrupted (CoLA style)"))
RATING = register_task(TaskSpec(
    name="zoo-rating", arch="encoder", kind="regression", text_fields=("sentence",),
    metrics=("pearson", "spearman", "pearson_spearman"), primary="pearson_spearman", num_labels=1,
    description="review rating 0-5 = share of positive clauses, scored like STS-B"))
ARITHMETIC = register_task(TaskSpec(
    name="zoo-arithmetic", arch="decoder", kind="generation", text_fields=("question",),
    metrics=("exact_match",), primary="exact_match",
    prompt="question : {question} answer :", answer_suffix=" .",
    description="addition and subtraction within twenty, answered in words; test problems are "
                "never seen in fine-tuning (only as facts in the pre-training corpus)"))
REVIEW = register_task(TaskSpec(
    name="zoo-review", arch="decoder", kind="multiple_choice", text_fields=("review",),
    metrics=("acc",), primary="acc", prompt="review : {review} sentiment :",
    description="review sentiment as a choice between ' positive' and ' negative'"))

DEFAULT_SIZES = {"train": 2000, "validation": 300, "test": 500}


def _text(words: Iterable[str]) -> str:
    return " ".join(words)


# -- example generators: one example per call ---------------------------------------------
def _sentiment(gen: Generator) -> dict:
    words, label = gen.review()
    return {"sentence": _text(words), "label": label}


_SINGULAR_VERBS = {s: p for s, p in TRANSITIVE + INTRANSITIVE}
_PLURAL_VERBS = {p: s for s, p in TRANSITIVE + INTRANSITIVE}


def _corrupt(gen: Generator, words: list[str]) -> list[str]:
    """Break a grammatical sentence in one of four ways a reader would reject."""
    r = gen.rng
    body = words[:-1]
    kinds = ["order", "determiner"]
    if any(w in _SINGULAR_VERBS or w in _PLURAL_VERBS for w in body):
        kinds += ["agreement", "agreement"]
    kind = r.choice(kinds)
    if kind == "agreement":
        i = next(i for i, w in enumerate(body) if w in _SINGULAR_VERBS or w in _PLURAL_VERBS)
        body[i] = _SINGULAR_VERBS.get(body[i]) or _PLURAL_VERBS[body[i]]
    elif kind == "order":
        i = r.randrange(len(body) - 1)
        body[i], body[i + 1] = body[i + 1], body[i]
    else:
        dets = [i for i, w in enumerate(body) if w in ("the", "a")]
        if dets and r.random() < 0.5:
            del body[r.choice(dets)]
        else:
            i = r.randrange(len(body))
            body.insert(i, r.choice(["the", "a"]))
    return body + ["."]


def _acceptability(gen: Generator) -> dict:
    words = gen.declarative()
    if gen.rng.random() < 0.65:
        return {"sentence": _text(words), "label": 1}
    corrupted = _corrupt(gen, list(words))
    # A swap of two equal words, for instance, changes nothing: count it as acceptable.
    return {"sentence": _text(corrupted), "label": int(corrupted == words)}


def _rating(gen: Generator) -> dict:
    """Two to four polar clauses (negation flips one); the rating is the share of positive
    clauses scaled to 0-5, plus a little noise, so no model can score perfectly."""
    r = gen.rng
    clauses = [gen.review_clause() for _ in range(r.randint(2, 4))]
    words: list[str] = []
    for i, clause in enumerate(clauses):
        if i:
            words.append(r.choice(["and", "but"]))
        words += clause.words
    share = sum(c.polarity > 0 for c in clauses) / len(clauses)
    score = 5.0 * share + r.gauss(0.0, 0.3)
    return {"sentence": _text(words + ["."]), "label": round(min(5.0, max(0.0, score)), 3)}


def _review(gen: Generator) -> dict:
    words, label = gen.review()
    # choices[label] is the correct answer; keep "positive" first so the index equals 1 - label
    return {"review": _text(words), "choices": ["positive", "negative"], "label": 1 - label}


_EXAMPLE_MAKERS: dict[str, Callable[[Generator], dict]] = {
    SENTIMENT.name: _sentiment,
    ACCEPTABILITY.name: _acceptability,
    RATING.name: _rating,
    REVIEW.name: _review,
}


def _key(example: dict, spec: TaskSpec) -> tuple:
    return tuple(example[f] for f in spec.text_fields)


def _sampled_splits(spec: TaskSpec, seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    make = _EXAMPLE_MAKERS[spec.name]
    splits: dict[str, list[dict]] = {}
    seen: set[tuple] = set()
    for split in SPLITS:
        gen = Generator(derive_seed("zoo-task", seed, spec.name, split))
        rows: list[dict] = []
        attempts = 0
        while len(rows) < sizes[split]:
            attempts += 1
            if attempts > 50 * sizes[split] + 1000:
                raise RuntimeError(f"{spec.name}: cannot draw {sizes[split]} distinct {split} examples")
            example = make(gen)
            key = _key(example, spec)
            if split != "train" and key in seen:
                continue  # never evaluate on an example that was trained on
            if split == "train":
                seen.add(key)
            rows.append(example)
        if split != "train":
            seen.update(_key(e, spec) for e in rows)
        splits[split] = rows
    return splits


def _arithmetic_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Problems are partitioned, so test problems are new to fine-tuning."""
    problems = all_arithmetic_problems()
    gen = Generator(derive_seed("zoo-task", seed, ARITHMETIC.name))
    gen.rng.shuffle(problems)
    n_test = min(sizes["test"], len(problems) // 4)
    n_val = min(sizes["validation"], len(problems) // 8)
    parts = {"test": problems[:n_test], "validation": problems[n_test:n_test + n_val],
             "train": problems[n_test + n_val:]}
    return {split: [{"question": f"what is {NUMBERS[a]} {op} {NUMBERS[b]} ?", "answer": NUMBERS[c]}
                    for a, op, b, c in rows]
            for split, rows in parts.items()}


def generate_task(name: str, seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """All splits of a zoo task as lists of JSON-able rows."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if name == ARITHMETIC.name:
        return _arithmetic_splits(seed, sizes)
    if name not in _EXAMPLE_MAKERS:
        raise KeyError(f"{name!r} is not a zoo task; zoo tasks: {', '.join(ZOO_TASKS)}")
    return _sampled_splits(_SPECS[name], seed, sizes)


_SPECS = {spec.name: spec for spec in (SENTIMENT, ACCEPTABILITY, RATING, ARITHMETIC, REVIEW)}
ZOO_TASKS = tuple(_SPECS)


def generate_corpus(seed: int, sentences: int, purpose: str = "corpus") -> list[str]:
    """Pre-training text: declaratives, reviews, counting and arithmetic facts, one per line.
    Another ``purpose`` (e.g. "heldout", for perplexity) draws a text of the same distribution
    from an independent stream; short sentences of a small language can still recur in both."""
    gen = Generator(derive_seed(f"zoo-{purpose}", seed))
    lines = []
    for _ in range(sentences):
        u = gen.rng.random()
        if u < 0.45:
            words = gen.declarative()
        elif u < 0.7:
            words = gen.review()[0]
        elif u < 0.8:
            words = gen.counting()
        else:
            words = gen.arithmetic_fact()
        lines.append(_text(words))
    return lines
