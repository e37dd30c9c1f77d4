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
    "fewshot_as_multiturn": False,   # lm-eval >= 0.4.10 defaults to True; it only acts with a chat template
    "system_instruction": None,
    "gen_kwargs": None,
}


def harness_task_name(spec: TaskSpec) -> str:
    return HARNESS_PREFIX + spec.name.replace("-", "_")


def _jinja(prompt: str) -> str:
    """Turn our ``{field}`` prompt into lm-eval's Jinja ``{{field}}``."""
    return prompt.replace("{", "{{").replace("}", "}}")


def task_config(spec: TaskSpec, data_file: str | Path) -> dict:
    """lm-eval task YAML (as a dict) for one of our decoder tasks on one jsonl split.

    Generic settings suit the zoo's one-word answers; a task's ``harness`` dict overrides them
    (GSM8K takes lm-eval's own gsm8k settings, see methods/data/gsm8k.py)."""
    data_file = str(Path(data_file).resolve())
    custom = spec.harness
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
        metric = custom.get("metric", {"ignore_case": True, "ignore_punctuation": True})
        config.update({
            "output_type": "generate_until",
            "doc_to_target": custom.get("target", "{{" + spec.answer_field + "}}"),
            "generation_kwargs": {"until": custom.get("until", [".", "\n"]),
                                  "max_gen_toks": custom.get("max_gen_toks", 8), "do_sample": False},
            # Zoo answers are one word: score the first word generated (as GSM8K's strict match
            # scores the number after '####'), case- and punctuation-insensitively.
            "filter_list": custom.get("filters", [{"name": "first-word", "filter": [
                {"function": "regex", "regex_pattern": "([a-z]+)"}, {"function": "take_first"}]}]),
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **metric}],
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


def _metric_key(results: dict, name: str, preferred_filter: str | None) -> str | None:
    keys = [k for k in results if k.split(",")[0] == name]
    if preferred_filter and f"{name},{preferred_filter}" in keys:
        return f"{name},{preferred_filter}"
    return keys[0] if keys else None


def _simple_evaluate(model, tokenizer, tasks: list[str], task_manager, batch_size: int,
                     cache: str | Path | None, allow_code_execution: bool = False) -> dict:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    if allow_code_execution:
        # HumanEval/MBPP score through Hugging Face evaluate's code_eval, which refuses to execute
        # generated programs unless this is set
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    # lm-eval keys cached responses by the request alone, so a cache is only valid for one set of
    # weights: the caller names it after the model's content hash.
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                       use_cache=str(cache) if cache else None,
                                       confirm_run_unsafe_code=allow_code_execution, **HARNESS_SETTINGS)
    except ValueError as error:
        if "unsafe" in str(error) and not allow_code_execution:
            raise ValueError(f"{error} (the config's evaluate.allow_code_execution: true allows it; the "
                             "generated programs then run on this machine)") from None
        raise


def _summary(results: dict, allow_code_execution: bool = False) -> dict:
    summary = {k: v for k, v in results.items() if k in ("results", "configs", "n-shot", "versions", "n-samples",
                                                          "lm_eval_version", "transformers_version")}
    summary["settings"] = {**HARNESS_SETTINGS, "confirm_run_unsafe_code": allow_code_execution}
    return summary


def run_harness(model, tokenizer, spec: TaskSpec, data_file: str | Path, include_dir: Path,
                batch_size: int, cache: str | Path | None = None) -> tuple[dict[str, float], dict, list[dict]]:
    """Score a loaded causal LM on one of our tasks through lm-eval's HFLM wrapper (in memory, so
    merged or pruned weights need no checkpoint on disk); returns (our metrics, lm-eval results
    summary, per-sample logs)."""
    from lm_eval.tasks import TaskManager

    task = write_task_yaml(spec, data_file, include_dir)
    # Only our generated task: indexing lm-eval's thousands of built-in task files costs seconds a call.
    results = _simple_evaluate(model, tokenizer, [task], TaskManager(include_path=str(include_dir),
                                                                     include_defaults=False), batch_size, cache)
    task_results = results["results"][task]
    metrics = {}
    for name in spec.metrics:
        key = _metric_key(task_results, name, spec.harness.get("primary_filter"))
        if key is None:
            raise KeyError(f"lm-eval returned no {name!r} for {task}; keys: {sorted(task_results)}")
        metrics[name] = float(task_results[key])
        stderr = task_results.get(key.replace(name, f"{name}_stderr", 1))
        if isinstance(stderr, (int, float)):
            metrics[f"{name}_stderr"] = float(stderr)
    return metrics, _summary(results), results.get("samples", {}).get(task, [])


def run_named_tasks(model, tokenizer, tasks: list[str], batch_size: int, cache: str | Path | None = None,
                    include_path: str | Path | None = None, allow_code_execution: bool = False,
                    ) -> tuple[dict[str, dict[str, float]], dict, dict]:
    """Score a loaded causal LM on lm-eval tasks by name (built-in ones such as ``gsm8k``,
    ``arc_easy``, ``hellaswag``, or tasks under ``include_path``): (metrics per task as lm-eval
    reports them, with ``<metric>,<filter>`` flattened to ``<metric>`` for the default filter
    ``none`` and ``<metric>_<filter>`` otherwise; the results summary; per-sample logs per task).
    Built-in tasks read their data from the hub cache: run once online, or pre-fetch the datasets.
    When every task is found under ``include_path``, lm-eval's thousands of built-in task files are
    not indexed (seconds a call); otherwise both are searched. Tasks that execute generated code
    (HumanEval, MBPP) run only with ``allow_code_execution``."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_path is None)
    if include_path and any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(include_path), include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise KeyError(f"lm-eval knows no task(s) {unknown}; see `lm-eval ls tasks`")
    results = _simple_evaluate(model, tokenizer, list(tasks), manager, batch_size, cache, allow_code_execution)
    metrics = {}
    for task in tasks:
        flat = {}
        for key, value in results["results"].get(task, {}).items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name, filter_name = key.split(",", 1)
            flat[name if filter_name == "none" else f"{name}_{filter_name}"] = float(value)
        metrics[task] = flat
    return metrics, _summary(results, allow_code_execution), results.get("samples", {})


# Headline metric of an lm-eval task run by name, in order of preference; a name also matches with a
# filter suffix (HumanEval reports pass@1 under its filter create_test: ``pass@1_create_test``).
# Those before word_perplexity lie in [0, 1], so a mean of them is a score.
NAMED_PRIMARY = ("acc_norm", "acc", "exact_match", "pass@1", "pass_at_1", "prompt_level_strict_acc",
                 "word_perplexity")
_BOUNDED = NAMED_PRIMARY[:-1]


def named_task_primary(metrics: dict) -> str:
    """Headline metric of an lm-eval task run by name (flattened names as run_named_tasks gives
    them): the first of NAMED_PRIMARY present, bare or with a filter suffix; else the first metric."""
    for name in NAMED_PRIMARY:
        found = [m for m in metrics if (m == name or m.startswith(name + "_")) and not m.endswith("_stderr")]
        if found:
            return name if name in found else found[0]  # lm-eval's order: its first filter
    return next((m for m in metrics if not m.endswith("_stderr")), "")


def harness_score(named: dict[str, dict[str, float]], tasks: list[str], where: str) -> dict[str, float]:
    """The metrics of a task scored by lm-eval tasks by name: ``score``, the mean of each task's
    headline metric (``named_task_primary``; each must be a [0, 1] metric such as accuracy or pass@1).
    ``where`` names the config key listing ``tasks``, for the error message."""
    values = []
    for task in tasks:
        metrics = named.get(task) or {}
        primary = named_task_primary(metrics)
        if not any(primary == m or primary.startswith(m + "_") for m in _BOUNDED):
            raise ValueError(f"{where}: lm-eval task {task!r} reports no accuracy-like headline metric "
                             f"(one of {list(_BOUNDED)}; it gave {sorted(metrics)}), so it cannot be averaged "
                             "into a score; list it in evaluate.harness_tasks instead")
        values.append(metrics[primary])
    return {"score": sum(values) / len(values)}
