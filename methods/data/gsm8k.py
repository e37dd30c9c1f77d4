"""GSM8K (grade-school math word problems), scored through lm-evaluation-harness as its own
``gsm8k`` task scores it: greedy generation until "Question:", the number after "####" extracted
by the strict-match regex (the headline ``exact_match``), and the flexible-extract filter
(last number in the output) recorded next to it.

Data: the hub dataset ``openai/gsm8k`` (config ``main``) or a local directory with the original
``train.jsonl`` / ``test.jsonl`` (keys ``question`` and ``answer``, the answer ending in
``#### <number>``). Test = the official test split; validation = a held-out share of train.
"""

from __future__ import annotations

from pathlib import Path

from methods.data.jsonl import read_jsonl
from methods.tasks import TaskSpec, register_task

HUB_DATASET = "openai/gsm8k"

GSM8K = register_task(TaskSpec(
    name="gsm8k", arch="decoder", kind="generation", text_fields=("question",), metrics=("exact_match",),
    primary="exact_match", answer_field="answer", prompt="Question: {question}\nAnswer:", source="gsm8k",
    description="GSM8K math word problems, zero-shot; exact match of the number after '####'",
    harness={
        # lm-eval 0.4.13 tasks/gsm8k/gsm8k.yaml, except num_fewshot (ours: HARNESS_SETTINGS, 0)
        "target": "{{answer}}",
        "until": ["Question:", "</s>", "<|im_end|>"],
        "max_gen_toks": 256,
        "primary_filter": "strict-match",
        "metric": {"ignore_case": True, "ignore_punctuation": False,
                   "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]},
        "filters": [
            {"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]},
        ],
    }))


def _check(rows: list[dict], where: str) -> list[dict]:
    for i, row in enumerate(rows):
        if not {"question", "answer"} <= set(row) or "####" not in row["answer"]:
            raise ValueError(f"{where}, line {i + 1}: a GSM8K row needs 'question' and an 'answer' "
                             "ending in '#### <number>'")
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def local_files(directory: str | Path) -> dict[str, Path]:
    return {split: Path(directory) / f"{split}.jsonl" for split in ("train", "test")}


def load_gsm8k_local(directory: str | Path) -> dict[str, list[dict]]:
    """{"train", "test"} rows from a directory holding GSM8K's train.jsonl and test.jsonl."""
    out = {}
    for split, path in local_files(directory).items():
        if not path.is_file():
            raise FileNotFoundError(f"gsm8k: {path} does not exist (expected train.jsonl and test.jsonl)")
        out[split] = _check(read_jsonl(path), str(path))
    return out


def load_gsm8k_hub(dataset: str = HUB_DATASET) -> dict[str, list[dict]]:
    import datasets

    loaded = datasets.load_dataset(dataset, "main")
    return {split: _check([dict(r) for r in loaded[split]], f"{dataset}:{split}") for split in ("train", "test")}
