"""Tasks the suite has no data for, scored by lm-evaluation-harness tasks named in the config.

``instruct`` (instruction following) and ``code`` (program synthesis) are the skills of published
decoders such as WizardLM and code-alpaca (the DARE decoder merges, Yu et al. 2024). The suite has
no training data for them and never fine-tunes on them: a config gives each its model as a
published checkpoint (``models.<name>.finetuned.<task>``) and names the lm-eval tasks that score
it (``evaluate.harness_scoring.<task>``, e.g. code: [humaneval, mbpp], instruct: [ifeval]); those
tasks bring their own data (from the Hugging Face cache when offline).

The task's headline ``score`` is the mean over its lm-eval tasks of each one's headline metric
(``methods.evaluate.harness.named_task_primary``: pass@1 for HumanEval and MBPP, prompt-level
strict accuracy for IFEval); every lm-eval metric is also kept as rows ``lm-eval:<name>`` of the
tidy table. Its train/validation/test files are empty, so merges select hyper-parameters on the
other tasks' validation data only, and data-driven pruning or quantization cannot run on it.
"""

from __future__ import annotations

from methods.tasks import TaskSpec, register_task

SOURCE = "lm-eval"  # TaskSpec.source of every task here: no data of the suite

_COMMON = dict(arch="decoder", kind="lm-eval", text_fields=(), metrics=("score",), primary="score", source=SOURCE)

INSTRUCT = register_task(TaskSpec(
    name="instruct", description="instruction following, scored by the lm-eval tasks of "
    "evaluate.harness_scoring.instruct (e.g. ifeval); a published checkpoint only", **_COMMON))
CODE = register_task(TaskSpec(
    name="code", description="code generation, scored by the lm-eval tasks of evaluate.harness_scoring.code "
    "(e.g. humaneval, mbpp; they execute generated code: evaluate.allow_code_execution); a published "
    "checkpoint only", **_COMMON))


def has_suite_data(task: str) -> bool:
    from methods.tasks import get_task

    return get_task(task).source != SOURCE
