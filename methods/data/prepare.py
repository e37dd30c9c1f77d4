"""One entry point from a task name and the config's ``data`` section to its three splits."""

from __future__ import annotations

import logging
from pathlib import Path

from methods.data.splits import paper_holdout, subsample
from methods.data.lm_eval_scored import has_suite_data
from methods.tasks import get_task

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def _real_source(name: str, data: dict) -> dict:
    family = get_task(name).source
    settings = data.get(family)
    if not settings:
        raise KeyError(f"task {name} needs data.{family} in the config (source: hub, or source: local with a path)")
    return settings


def local_source_files(name: str, directory: str | Path) -> list[Path]:
    """The files a real task reads from a local data directory (for checks before any job)."""
    family = get_task(name).source
    if family == "glue":
        from methods.data.glue import local_files

        return list(local_files(directory, name).values())
    if family == "gsm8k":
        from methods.data.gsm8k import local_files

        return list(local_files(directory).values())
    raise ValueError(f"task {name} reads no local data directory (source {family!r})")


def prepare_task(name: str, data: dict, zoo: dict) -> dict[str, list[dict]]:
    """{"train", "validation", "test"} rows of a task.

    Zoo tasks are generated from ``zoo`` (seed, sizes). Real tasks are loaded from the source given
    in ``data`` (``data.glue`` / ``data.gsm8k``: ``source: hub`` with an optional ``dataset`` id, or
    ``source: local`` with a ``path``); validation is ``data.validation_fraction`` of train held out
    as the papers do, test is the benchmark's labelled evaluation split (GLUE dev, GSM8K test).
    ``data.max_examples`` caps splits by a seeded subsample, a deliberate departure from the
    protocol for small machines that is recorded in the task's manifest. Tasks scored only by lm-eval
    tasks by name (``instruct``, ``code``) have no data here: three empty splits."""
    spec = get_task(name)
    if not has_suite_data(name):
        # no data of the suite (methods/data/lm_eval_scored.py): empty files keep every rule's inputs
        # uniform; the lm-eval tasks that score it bring their own data
        return {split: [] for split in SPLITS}
    if spec.source == "zoo":
        from methods.zoo.tasks import generate_task

        return generate_task(name, zoo.get("seed", 0), zoo.get("task_sizes"))
    settings = _real_source(name, data)
    if spec.source == "glue":
        from methods.data.glue import load_glue_hub, load_glue_local

        loaded = (load_glue_local(settings["path"], name) if settings["source"] == "local"
                  else load_glue_hub(name, settings.get("dataset", "nyu-mll/glue")))
        full_train, test = loaded["train"], loaded["dev"]
    elif spec.source == "gsm8k":
        from methods.data.gsm8k import load_gsm8k_hub, load_gsm8k_local

        loaded = (load_gsm8k_local(settings["path"]) if settings["source"] == "local"
                  else load_gsm8k_hub(settings.get("dataset", "openai/gsm8k")))
        full_train, test = loaded["train"], loaded["test"]
    else:
        raise ValueError(f"task {name}: unknown data source {spec.source!r}")
    train, validation = paper_holdout(full_train, data.get("validation_fraction", 0.1), data.get("split_seed", 0))
    splits = {"train": train, "validation": validation, "test": test}
    caps = data.get("max_examples") or {}
    for split in SPLITS:
        capped = subsample(splits[split], caps.get(split), name, split)
        if len(capped) < len(splits[split]):
            log.info("%s %s: capped at %d of %d examples (data.max_examples)", name, split, len(capped),
                     len(splits[split]))
        splits[split] = capped
    return splits
