"""Decoder evaluation through lm-evaluation-harness (``simple_evaluate``), fully offline.

Zoo tasks become lm-eval custom tasks: a YAML per task, generated next to the run with an
**absolute** path to the task's jsonl (lm-eval resolves relative ``data_files`` against the working
directory, not the YAML). Every lm-eval default that affects a number is passed explicitly and
recorded with the results.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from methods.tasks import TaskSpec

# lm-eval task names must not clash with its built-in tasks.
HARNESS_PREFIX = "dcbench_"

# Every setting of simple_evaluate that changes a score, pinned and written into the results.
HARNESS_SETTINGS = {
    "num_fewshot": 0,
    "limit": None,
    "bootstrap_iters": 1000,
    "random_seed": 0,
    "numpy_random_seed": 1234,
    "torch_random_seed": 1234,
    "fewshot_random_seed": 1234,
    "apply_chat_template": False,
    "system_instruction": None,
    "gen_kwargs": None,
}


def harness_task_name(spec: TaskSpec) -> str:
    return HARNESS_PREFIX + spec.name.replace("-", "_")


def _jinja(prompt: str) -> str:
    """Turn our ``{field}`` prompt into lm-eval's Jinja ``{{field}}``."""
    return prompt.replace("{", "{{").replace("}", "}}")


def task_config(spec: TaskSpec, data_file: str | Path) -> dict:
    data_file = str(Path(data_file).resolve())
    config = {
        "task": harness_task_name(spec),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "doc_to_text": _jinja(spec.prompt),
        "metadata": {"version": 1.0, "source": spec.name},
    }
    if spec.kind == "multiple_choice":
        config.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "{{" + spec.choices_field + "}}",
            "doc_to_target": spec.label_field,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })
    elif spec.kind == "generation":
        config.update({
            "output_type": "generate_until",
            "doc_to_target": "{{" + spec.answer_field + "}}",
            "generation_kwargs": {"until": [".", "\n"], "max_gen_toks": 8, "do_sample": False},
            # The answer is one word: score the first word generated (as GSM8K's strict match
            # scores the first number), case- and punctuation-insensitively.
            "filter_list": [{"name": "first-word", "filter": [
                {"function": "regex", "regex_pattern": "([a-z]+)"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True}],
        })
    else:
        raise ValueError(f"task {spec.name}: lm-eval needs a generation or multiple-choice task, not {spec.kind}")
    return config


def write_task_yaml(spec: TaskSpec, data_file: str | Path, include_dir: Path) -> str:
    include_dir.mkdir(parents=True, exist_ok=True)
    config = task_config(spec, data_file)
    with open(include_dir / f"{config['task']}.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return config["task"]


def run_harness(model, tokenizer, spec: TaskSpec, data_file: str | Path, include_dir: Path,
                batch_size: int) -> tuple[dict[str, float], dict, list[dict]]:
    """Score a loaded causal LM on one task through lm-eval's HFLM wrapper (in memory, so merged
    or pruned weights need no checkpoint on disk); returns (our metrics, lm-eval results summary,
    per-sample logs)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = write_task_yaml(spec, data_file, include_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    results = lm_eval.simple_evaluate(
        # Only our generated task: indexing lm-eval's thousands of built-in task files costs seconds a call.
        model=lm, tasks=[task], task_manager=TaskManager(include_path=str(include_dir), include_defaults=False),
        log_samples=True, **HARNESS_SETTINGS)
    task_results = results["results"][task]
    metrics = {}
    for name in spec.metrics:
        key = next((k for k in task_results if k.split(",")[0] == name and "stderr" not in k), None)
        if key is None:
            raise KeyError(f"lm-eval returned no {name!r} for {task}; keys: {sorted(task_results)}")
        metrics[name] = float(task_results[key])
        stderr = task_results.get(key.replace(name, f"{name}_stderr", 1))
        if isinstance(stderr, (int, float)):
            metrics[f"{name}_stderr"] = float(stderr)
    samples = results.get("samples", {}).get(task, [])
    summary = {k: v for k, v in results.items() if k in ("results", "configs", "n-shot", "versions",
                                                          "lm_eval_version", "transformers_version")}
    summary["settings"] = HARNESS_SETTINGS
    return metrics, summary, samples
