"""GLUE: the eight tasks the DARE/DAREx papers use, their official metrics, and two loaders.

* ``hub``: ``datasets.load_dataset("nyu-mll/glue", <config>)`` (the default for real runs).
* ``local``: a directory in the original ``glue_data`` layout written by ``download_glue_data.py``
  (``<dir>/<TASK>/train.tsv`` and ``dev.tsv``; MNLI's test file is ``dev_matched.tsv``). CoLA has
  no header row there (columns: source, label, author's mark, sentence); a CoLA file with a header
  row is accepted too. The files are read with quoting off, as GLUE's own processors do: sentences
  contain unbalanced quotes.

Both loaders return rows with the hub dataset's field names and label ids (MNLI: entailment 0,
neutral 1, contradiction 2; QNLI/RTE: entailment 0, not_entailment 1), so a model fine-tuned on
one source is scored identically on the other. Test = GLUE dev (MNLI: matched); see
``methods.data.splits.paper_holdout`` for the validation split.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from methods.tasks import TaskSpec, register_task

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueFiles:
    """Where a task lives in the hub dataset and in the glue_data directory, and how to read it."""
    hub_config: str
    directory: str
    columns: dict[str, str]              # TSV header name -> row field ("label" for the label)
    hub_test_split: str = "validation"
    dev_file: str = "dev.tsv"
    positional: tuple[int, ...] = ()     # header-less files (CoLA): column index of each field, in columns' order
    label_names: tuple[str, ...] = ()    # text labels in id order (MNLI, QNLI, RTE)


def _task(name: str, kind: str, fields: tuple[str, ...], metrics: tuple[str, ...], primary: str,
          num_labels: int, files: GlueFiles, description: str) -> TaskSpec:
    spec = register_task(TaskSpec(name=name, arch="encoder", kind=kind, text_fields=fields, metrics=metrics,
                                  primary=primary, num_labels=num_labels, source="glue", description=description))
    GLUE_FILES[name] = files
    return spec


GLUE_FILES: dict[str, GlueFiles] = {}
_BINARY_F1 = ("accuracy", "f1", "accuracy_f1")

_task("glue-cola", "classification", ("sentence",), ("mcc", "accuracy"), "mcc", 2,
      GlueFiles("cola", "CoLA", {"label": "label", "sentence": "sentence"}, positional=(1, 3)),
      "CoLA: grammatical acceptability; Matthews correlation")
_task("glue-sst2", "classification", ("sentence",), ("accuracy",), "accuracy", 2,
      GlueFiles("sst2", "SST-2", {"sentence": "sentence", "label": "label"}),
      "SST-2: movie-review sentiment; accuracy")
_task("glue-mrpc", "classification", ("sentence1", "sentence2"), _BINARY_F1, "accuracy_f1", 2,
      GlueFiles("mrpc", "MRPC", {"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"}),
      "MRPC: paraphrase; mean of accuracy and F1")
_task("glue-stsb", "regression", ("sentence1", "sentence2"), ("pearson", "spearman", "pearson_spearman"),
      "pearson_spearman", 1,
      GlueFiles("stsb", "STS-B", {"sentence1": "sentence1", "sentence2": "sentence2", "score": "label"}),
      "STS-B: similarity 0-5 (regression); mean of Pearson and Spearman")
_task("glue-qqp", "classification", ("question1", "question2"), _BINARY_F1, "accuracy_f1", 2,
      GlueFiles("qqp", "QQP", {"question1": "question1", "question2": "question2", "is_duplicate": "label"}),
      "QQP: duplicate questions; mean of accuracy and F1")
_task("glue-mnli", "classification", ("premise", "hypothesis"), ("accuracy",), "accuracy", 3,
      GlueFiles("mnli", "MNLI", {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                hub_test_split="validation_matched", dev_file="dev_matched.tsv",
                label_names=("entailment", "neutral", "contradiction")),
      "MNLI: entailment, 3 classes; accuracy on dev matched")
_task("glue-qnli", "classification", ("question", "sentence"), ("accuracy",), "accuracy", 2,
      GlueFiles("qnli", "QNLI", {"question": "question", "sentence": "sentence", "label": "label"},
                label_names=("entailment", "not_entailment")),
      "QNLI: question/answer entailment; accuracy")
_task("glue-rte", "classification", ("sentence1", "sentence2"), ("accuracy",), "accuracy", 2,
      GlueFiles("rte", "RTE", {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
                label_names=("entailment", "not_entailment")),
      "RTE: entailment; accuracy")

GLUE_TASKS = tuple(GLUE_FILES)


class GlueFormatError(ValueError):
    """A GLUE file does not have the layout of glue_data; the message names the file."""


def _label(value: str, files: GlueFiles, kind: str, where: str):
    value = value.strip()
    if kind == "regression":
        return float(value)
    if files.label_names:
        if value not in files.label_names:
            raise GlueFormatError(f"{where}: label {value!r} is not one of {list(files.label_names)}")
        return files.label_names.index(value)
    return int(value)


def read_glue_tsv(path: str | Path, task: str) -> list[dict]:
    """Rows of one glue_data TSV file with the hub's field names and label ids, plus ``idx``.

    Rows with the wrong number of columns (a handful in QQP's train.tsv) are skipped and counted in
    the log, as GLUE's reference processors do."""
    from methods.tasks import get_task

    spec, files = get_task(task), GLUE_FILES[task]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task}: GLUE file {path} does not exist (expected the glue_data layout "
                                f"<dir>/{files.directory}/train.tsv and {files.dev_file})")
    with open(path, encoding="utf-8-sig", newline="") as f:
        table = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not table:
        raise GlueFormatError(f"{path}: empty file")
    fields = list(files.columns.values())
    if files.positional:
        indices = list(files.positional)
        width = len(table[0])
        label_at = indices[fields.index("label")]
        try:  # a header row, if any, has a non-numeric label cell
            _label(table[0][label_at], files, spec.kind, str(path))
            body = table
        except (ValueError, IndexError):
            body = table[1:]
    else:
        header, body = table[0], table[1:]
        missing = [c for c in files.columns if c not in header]
        if missing:
            raise GlueFormatError(f"{path}: header {header} lacks the column(s) {missing} of {task}")
        indices = [header.index(c) for c in files.columns]
        width = len(header)
    rows, skipped = [], 0
    for line, cells in enumerate(body):
        if len(cells) != width:
            skipped += 1
            continue
        row = {field: cells[i] for field, i in zip(fields, indices)}
        row["label"] = _label(row["label"], files, spec.kind, f"{path}, row {line + 1}")
        row["idx"] = len(rows)
        rows.append(row)
    if skipped:
        log.warning("%s: skipped %d malformed row(s) of %d", path, skipped, len(body))
    return rows


def local_files(directory: str | Path, task: str) -> dict[str, Path]:
    """{"train", "dev"} file paths of ``task`` in a glue_data directory."""
    files = GLUE_FILES[task]
    folder = Path(directory) / files.directory
    return {"train": folder / "train.tsv", "dev": folder / files.dev_file}


def load_glue_local(directory: str | Path, task: str) -> dict[str, list[dict]]:
    """{"train", "dev"} rows of ``task`` from a glue_data directory."""
    return {split: read_glue_tsv(path, task) for split, path in local_files(directory, task).items()}


def load_glue_hub(task: str, dataset: str = HUB_DATASET) -> dict[str, list[dict]]:
    """{"train", "dev"} rows of ``task`` from the hub dataset (or any dataset with its configs)."""
    import datasets

    from methods.tasks import get_task

    spec, files = get_task(task), GLUE_FILES[task]
    loaded = datasets.load_dataset(dataset, files.hub_config)
    keep = (*spec.text_fields, "label", "idx")

    def rows(split: str) -> list[dict]:
        if split not in loaded:
            raise KeyError(f"{dataset} ({files.hub_config}) has no split {split!r}; splits: {list(loaded)}")
        return [{k: example[k] for k in keep} for example in loaded[split]]

    return {"train": rows("train"), "dev": rows(files.hub_test_split)}
