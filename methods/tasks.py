"""Task specifications: what a task's examples look like and how it is scored.

A task is named in the config; its spec tells the fine-tuning and evaluation code which text
fields to read, whether it is classification, regression, generation or multiple choice, and
which metric is the task's headline score.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    name: str
    arch: str                      # "encoder" or "decoder": the kind of model that solves it
    kind: str                      # classification | regression | generation | multiple_choice | lm-eval
    text_fields: tuple[str, ...]   # one field, or two for sentence pairs
    metrics: tuple[str, ...]       # every metric reported, in report order
    primary: str                   # headline metric (may be a mean of others, e.g. "pearson_spearman")
    num_labels: int = 0            # classifiers: number of classes; regression: 1
    label_field: str = "label"
    answer_field: str = "answer"   # generation: the reference answer
    answer_suffix: str = ""        # generation: appended to the answer in fine-tuning (the stop marker)
    choices_field: str = "choices" # multiple choice: the candidate answers
    prompt: str = ""               # decoders: a format string over the example's fields
    description: str = ""
    source: str = "zoo"            # where its data comes from: zoo (generated), glue, gsm8k, or lm-eval
                                   # (none of the suite's: scored by lm-eval tasks named in the config)
    # lm-eval settings of a decoder task that differ from the generic ones (methods/evaluate/harness.py)
    harness: dict = field(default_factory=dict)

    @property
    def is_encoder(self) -> bool:
        return self.arch == "encoder"


# Range of every metric name we emit; the aggregation refuses values outside them.
METRIC_RANGES = {
    "accuracy": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "mcc": (-1.0, 1.0),
    "pearson": (-1.0, 1.0),
    "spearman": (-1.0, 1.0),
    "pearson_spearman": (-1.0, 1.0),
    "accuracy_f1": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "acc": (0.0, 1.0),
    "acc_norm": (0.0, 1.0),
    "perplexity": (1.0, float("inf")),
    "score": (0.0, 1.0),           # tasks scored by lm-eval tasks by name: mean of their headline metrics
}

_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is registered twice")
    unknown = [m for m in (*spec.metrics, spec.primary) if m not in METRIC_RANGES]
    if unknown:
        raise ValueError(f"task {spec.name!r}: metrics {unknown} have no declared range")
    _TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    _load_builtin_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}") from None


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def _load_builtin_tasks() -> None:
    # Importing the modules registers their tasks.
    from methods.data import glue as _glue  # noqa: F401
    from methods.data import gsm8k as _gsm8k  # noqa: F401
    from methods.data import lm_eval_scored as _lm_eval_scored  # noqa: F401
    from methods.zoo import tasks as _zoo_tasks  # noqa: F401
