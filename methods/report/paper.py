"""Published figures next to ours: "reported vs reproduced".

The figures live in ``report/paper_numbers/<paper>.csv``, one file per paper, one row per figure,
in the paper's own units (84.0 for 84 %, 5.68 for a perplexity). Only figures that our research
notes (``../shared/specs/*.md``) record as read in a primary source are allowed in: a figure
copied from a secondary source, or remembered, would turn a "reproduced" column into a comparison
with a number nobody checked.

How verification is recorded: the ``source`` column names the spec file, the section and the
note's provenance tag, e.g. ``quantization.md §8.A [code]; …free text…``. ``load_paper_numbers``
accepts a row only when every part of its tag is a primary-source tag (:data:`VERIFIED_TAGS`:
read in the official code or README, in the abstract, or in the paper text) and rejects the
notes' other tags ([2nd], [unverified], [infer], "verify", TODO, ...), naming file and line. There
is deliberately no separate ``verified`` column: it could disagree with the tag it summarises.
``check_against_specs`` goes further where the notes are present: the section exists, carries the
tag, and contains the figure.

Figures left out on purpose (all from ``dpp_merge.md`` §6 and ``quantization.md`` §8):
DAREx Tables 1/3/5 (BERT CoLA ≈ 4 / 53 / 57, MetaMath-7B 65.50 / 0.00 / 34.87, RoBERTa-CoLA 59.01)
are tagged [2nd …; verify]; the DAREx abstract's "> 30 % on CoLA and SST-2" is a lower bound on a
gain at an unstated drop rate, not a figure; DARE's encoder tables, DiscQuant's and NUPES's
tables are [UNVERIFIED]/TODO; the OFQ abstract's margins over earlier work (9.8 / 7.7 / 4.64)
compare with methods the suite does not run; DONOD's data-selection gains concern a method the
suite does not implement (it only reuses DONOD's metrics as diagnostics).

Join keys: ``our_task``, ``our_method``, ``drop_rate`` and ``bits`` select our runs (the tidy
metrics table of ``aggregate.py``); ``our_metric`` picks a metric (empty: the task's headline);
``our_model_hint`` only says which of our models is the paper's model (``same_model``), because
the suite usually reproduces a paper's protocol on a stand-in model. ``our_method`` is a
registered method name, or ``finetuned`` for the unpruned/unquantized model (a paper's "no
pruning", "FP16", "original model"). An empty ``our_task`` or ``our_method`` means the suite has
no counterpart (an ImageNet figure, a Wiki2 token perplexity): the row stays "not run".
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from methods.report.tables import Table, wide_table

TEXT = ["paper", "citation", "table", "model", "task", "method", "setting", "metric", "unit", "source"]
OPTIONAL_TEXT = ["our_model_hint", "our_task", "our_method", "our_metric"]
COLUMNS = TEXT[:9] + ["value", "source"] + OPTIONAL_TEXT + ["drop_rate", "bits"]

# percent: the paper prints 100 × our 0..1 score (accuracy, MCC ×100 ...); raw: same units (perplexity).
UNIT_SCALE = {"percent": 100.0, "raw": 1.0}
FINETUNED = "finetuned"
VERIFIED_TAGS = frozenset({"code", "abs", "paper", "readme"})

_SOURCE = re.compile(r"^(?P<file>[\w.-]+\.md) §(?P<section>\d+(?:\.\d+)*(?:\.[A-Z])?)\b[^\[]*\[(?P<tag>[^\]]+)\]")
_PAPER_KEY = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class PaperNumbersError(ValueError):
    """A paper-numbers CSV is malformed; the message names the file, the line and the column."""


def _where(path: Path, line: int) -> str:
    return f"{path}, line {line}"   # line numbers as an editor shows them: the header is line 1


def known_keys() -> dict[str, set[str]]:
    """What ``our_method``, ``our_task`` and ``our_metric`` may name: registered prune, quantize
    and merge methods (and ``finetuned``), registered tasks, declared metrics. Tasks run by name
    through lm-eval (``lm-eval:<name>``) and their metrics are lm-eval's, so they are not listed."""
    from methods import registry
    from methods.tasks import METRIC_RANGES, task_names

    methods = {FINETUNED} | {name for family in ("prune", "quantize", "merge") for name in registry.names(family)}
    return {"our_method": methods, "our_task": set(task_names()), "our_metric": set(METRIC_RANGES)}


def parse_source(source: str) -> tuple[str, str, list[str]]:
    """(spec file, section id, tag parts) of a ``source`` cell: ``quantization.md §8.A [code]``
    gives ("quantization.md", "8.A", ["code"]); ``[paper/README]`` gives ["paper", "readme"]."""
    match = _SOURCE.match(source.strip())
    if match is None:
        raise ValueError(f"source {source!r} does not read '<spec>.md §<section> [<tag>]'")
    parts = [p.strip().lower() for p in re.split(r"[/,;]", match["tag"]) if p.strip()]
    return match["file"], match["section"], parts


def _number(text: str, what: str, where: str, integer: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PaperNumbersError(f"{where}: column {what!r} = {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PaperNumbersError(f"{where}: column {what!r} = {text!r} is not finite")
    if integer and value != int(value):
        raise PaperNumbersError(f"{where}: column {what!r} = {text!r} is not a whole number of bits")
    return value


def _check_row(row: dict, path: Path, line: int, known: dict[str, set[str]]) -> dict:
    where = _where(path, line)
    for column in TEXT + ["value"]:
        if not row[column].strip():
            raise PaperNumbersError(f"{where}: column {column!r} is empty")
    if row["paper"] != path.stem:
        raise PaperNumbersError(f"{where}: paper {row['paper']!r} differs from the file name {path.stem!r} "
                                "(one file per paper, named by its key)")
    if row["unit"] not in UNIT_SCALE:
        raise PaperNumbersError(f"{where}: unit {row['unit']!r} is not one of {sorted(UNIT_SCALE)}")
    try:
        _, _, tags = parse_source(row["source"])
    except ValueError as error:
        raise PaperNumbersError(f"{where}: {error}") from None
    unverified = [t for t in tags if t not in VERIFIED_TAGS]
    if unverified or not tags:
        raise PaperNumbersError(f"{where}: source tag(s) {unverified or tags} are not verified; only figures the "
                                f"notes read in a primary source ({sorted(VERIFIED_TAGS)}) belong here")
    for column, names in known.items():
        value = row[column].strip()
        if value and value not in names and not (row["our_task"].startswith("lm-eval:") and column != "our_method"):
            raise PaperNumbersError(f"{where}: column {column!r} = {value!r} is not one of ours; known: "
                                    f"{', '.join(sorted(names))}")
    out = {**row, "value": _number(row["value"], "value", where)}
    out["drop_rate"] = _number(row["drop_rate"], "drop_rate", where) if row["drop_rate"].strip() else np.nan
    if not (math.isnan(out["drop_rate"]) or 0.0 <= out["drop_rate"] <= 1.0):
        raise PaperNumbersError(f"{where}: column 'drop_rate' = {row['drop_rate']!r} is outside [0, 1]")
    out["bits"] = _number(row["bits"], "bits", where, integer=True) if row["bits"].strip() else np.nan
    if not (math.isnan(out["bits"]) or 1 <= out["bits"] <= 32):
        raise PaperNumbersError(f"{where}: column 'bits' = {row['bits']!r} is outside [1, 32]")
    return out


def read_paper_file(path: str | Path, known: dict[str, set[str]] | None = None) -> pd.DataFrame:
    """One paper's figures, validated (see the module docstring; ``known``: see ``known_keys``,
    its default); rows keep the file's order."""
    path = Path(path)
    known = known_keys() if known is None else known
    if not _PAPER_KEY.match(path.stem):
        raise PaperNumbersError(f"{path}: the file name must be a short lower-case paper key (e.g. dare.csv)")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise PaperNumbersError(f"{path}: not a readable CSV ({error})") from None
    missing = [c for c in COLUMNS if c not in raw.columns]
    unknown = [c for c in raw.columns if c not in COLUMNS]
    if missing or unknown:
        raise PaperNumbersError(f"{path}: missing column(s) {missing}, unknown column(s) {unknown}; "
                                f"expected {COLUMNS}")
    if raw.empty:
        raise PaperNumbersError(f"{path}: no figures (an empty file would hide a paper from the report)")
    rows = [_check_row(record, path, i + 2, known) for i, record in enumerate(raw.to_dict("records"))]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    identity = ["table", "model", "task", "method", "setting", "metric"]
    duplicated = frame.duplicated(identity, keep=False)
    if duplicated.any():
        lines = [int(i) + 2 for i in np.flatnonzero(duplicated)]
        raise PaperNumbersError(f"{path}: lines {lines} describe the same figure ({identity} are equal)")
    return frame


def load_paper_numbers(directory: str | Path) -> pd.DataFrame:
    """Every ``<paper>.csv`` in ``directory``, concatenated in file-name order; columns
    :data:`COLUMNS` with ``value``, ``drop_rate`` and ``bits`` as floats (NaN = empty). Raises
    ``PaperNumbersError`` naming the file, line and column of the first problem."""
    directory = Path(directory)
    files = sorted(directory.glob("*.csv"))
    if not files:
        raise PaperNumbersError(f"{directory}: no paper-numbers CSV files")
    known = known_keys()
    return pd.concat([read_paper_file(f, known) for f in files], ignore_index=True)


# -- checking against the research notes ---------------------------------------------------------
def _section_text(text: str, section: str) -> str | None:
    """The text of ``§section`` of a Markdown note: from its heading to the next heading of the
    same or a higher level; a trailing letter (``8.A``) selects the bold ``**A.`` paragraph group
    inside it, up to the next ``**B.`` one."""
    number, letter = re.fullmatch(r"(\d+(?:\.\d+)*)(?:\.([A-Z]))?", section).groups()
    heading = re.search(rf"^(#+)\s+{re.escape(number)}\.?(?=\s)", text, flags=re.M)
    if heading is None:
        return None
    level = len(heading.group(1))
    end = re.compile(rf"^#{{1,{level}}}\s", flags=re.M).search(text, heading.end())
    body = text[heading.start():end.start() if end else len(text)]
    if not letter:
        return body
    start = re.search(rf"^\*\*{letter}\.", body, flags=re.M)
    if start is None:
        return None
    stop = re.compile(r"^\*\*[A-Z]\.", flags=re.M).search(body, start.end())
    return body[start.start():stop.start() if stop else len(body)]


# A line of a note that carries one of these holds unchecked figures, even inside a section
# whose other lines are verified (dpp_merge.md §6.1 mixes [paper] facts and [2nd; verify] numbers).
_UNVERIFIED_LINE = re.compile(r"\[[^\]]*(2nd|unverified|infer|exp\b|verify)[^\]]*\]|TODO", flags=re.I)


def _verified_numbers(section: str) -> list[float]:
    """Every number on the lines of ``section`` that carry no unverified marker."""
    lines = [line for line in section.splitlines() if not _UNVERIFIED_LINE.search(line)]
    return [float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", "\n".join(lines))]


def check_against_specs(paper_numbers: pd.DataFrame, spec_dir: str | Path) -> None:
    """Raise ``PaperNumbersError`` listing every row whose ``source`` does not hold up: the spec
    file or section is missing, the section does not carry the row's tag, or the figure itself
    does not appear in the section (a transcription error) on a line free of unverified
    markers (a figure taken from a [2nd; verify] line of an otherwise verified section). The
    check is per section, not per table cell: a figure swapped with another of the same section
    passes it."""
    spec_dir = Path(spec_dir)
    problems = []
    for _, row in paper_numbers.iterrows():
        label = f"{row['paper']}.csv, {row['model']} / {row['method']} / {row['setting']} = {row['value']:g}"
        file, section, _ = parse_source(row["source"])
        tag = re.search(r"\[[^\]]+\]", row["source"]).group(0)
        path = spec_dir / file
        if not path.is_file():
            problems.append(f"{label}: spec file {path} does not exist")
            continue
        body = _section_text(path.read_text(encoding="utf-8"), section)
        if body is None:
            problems.append(f"{label}: {file} has no section §{section}")
        elif tag.lower() not in body.lower():
            problems.append(f"{label}: {file} §{section} does not carry the tag {tag}")
        elif not any(math.isclose(n, row["value"], abs_tol=1e-9) for n in _verified_numbers(body)):
            problems.append(f"{label}: the value {row['value']:g} does not appear in {file} §{section} "
                            "outside lines marked [2nd], [unverified], [infer], verify or TODO")
    if problems:
        raise PaperNumbersError("paper numbers that the research notes do not back:\n  " + "\n  ".join(problems))


# -- reported vs reproduced ----------------------------------------------------------------------
def _normalized(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _same(ours: pd.Series, theirs: float) -> pd.Series:
    """Key equality where an empty key on the paper's side means "not set on ours" either (a
    plain 4-bit RTN figure must not match our RTN of a DARE delta, whose drop_rate is 0.9)."""
    if math.isnan(theirs):
        return ours.isna()
    return np.isclose(ours.astype(float), theirs, rtol=0.0, atol=1e-9) & ours.notna()


def _our_runs(row: pd.Series, metrics: pd.DataFrame) -> pd.DataFrame:
    task, method, metric = (str(row[c]).strip() for c in ("our_task", "our_method", "our_metric"))
    if not task or not method:
        return metrics.iloc[0:0]
    if method == FINETUNED:
        part = metrics[(metrics["stage"] == "finetune")]
    else:
        part = metrics[(metrics["stage"] != "finetune") & (metrics["method"] == method)]
    part = part[(part["task"] == task) & _same(part["drop_rate"], row["drop_rate"]) & _same(part["bits"], row["bits"])]
    return part[part["metric"] == metric] if metric else part[part["is_primary"].astype(bool)]


OUTPUT = ["paper", "citation", "table", "model", "task", "method", "setting", "metric", "unit", "reported",
          "our_model", "our_finetune", "our_variant", "our_task", "our_method", "our_metric", "drop_rate", "bits",
          "same_model", "reproduced", "reproduced_std", "difference", "n_runs", "source"]


def reported_vs_reproduced(paper_numbers: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (paper figure, our model, our fine-tuning, our variant) that ran it, with
    ``reported`` (the paper's value), ``reproduced`` (our mean over seeds and mask seeds, ×100
    when the paper is in percent), ``reproduced_std``, ``difference`` (reproduced − reported) and
    ``n_runs``; a figure no run of ours matches stays as one row with ``reproduced`` NaN and
    ``n_runs`` 0 (the report's "not run").

    Our runs are kept apart by model, fine-tuning and variant label rather than averaged: two
    variants of one method (say RTN per channel and RTN g64) are different reproductions, and the
    reader has to see which one each number comes from. ``our_metric`` names the metric of our
    table actually compared (the task's headline when the paper row leaves it empty)."""
    required = ["model", "task", "finetune", "stage", "method", "variant", "drop_rate", "bits", "metric", "value",
                "is_primary", "seed", "mask_seed"]
    missing = [c for c in required if c not in metrics.columns]
    if missing:
        raise KeyError(f"metrics table lacks column(s) {missing}; expected the tidy table of aggregate.py")
    missing = [c for c in COLUMNS if c not in paper_numbers.columns]
    if missing:
        raise KeyError(f"paper numbers lack column(s) {missing}; load them with load_paper_numbers")
    rows = []
    for _, row in paper_numbers.iterrows():
        scale = UNIT_SCALE[row["unit"]]
        base = {c: row[c] for c in ("paper", "citation", "table", "model", "task", "method", "setting", "metric",
                                     "unit", "our_task", "our_method", "drop_rate", "bits", "source")}
        base["reported"] = float(row["value"])
        runs = _our_runs(row, metrics)
        if runs.empty:
            rows.append({**base, "our_model": np.nan, "our_finetune": np.nan, "our_variant": np.nan,
                         "our_metric": row["our_metric"] or np.nan, "same_model": False, "reproduced": np.nan,
                         "reproduced_std": np.nan, "difference": np.nan, "n_runs": 0})
            continue
        for (model, finetune, variant, metric), part in runs.groupby(["model", "finetune", "variant", "metric"],
                                                                     sort=True):
            values = scale * part["value"].astype(float)
            hint = _normalized(row["our_model_hint"])
            rows.append({**base, "our_model": model, "our_finetune": finetune, "our_variant": variant,
                         "our_metric": metric, "same_model": bool(hint) and hint in _normalized(model),
                         "reproduced": values.mean(), "reproduced_std": values.std() if len(values) > 1 else np.nan,
                         "difference": values.mean() - base["reported"],
                         "n_runs": int(part[["seed", "mask_seed"]].drop_duplicates().shape[0])})
    return pd.DataFrame(rows, columns=OUTPUT)


def comparison_table(comparison: pd.DataFrame, caption: str = "", digits: int = 2,
                     missing: str = "not run") -> Table:
    """The comparison as a ``tables.Table`` (render it with to_markdown / to_latex / to_html):
    one row per figure and reproduction (``ours`` = our model: fine-tuning → variant), columns
    reported / reproduced / difference, rows in the order of ``comparison``; entries with no run
    of ours print as ``missing``."""
    ours = [f"{m}: {f} → {v}" if isinstance(m, str) else "–"
            for m, f, v in zip(comparison["our_model"], comparison["our_finetune"], comparison["our_variant"])]
    labels = ["paper", "model", "task", "method", "setting", "ours"]
    long = comparison.assign(ours=ours, n=comparison["n_runs"].where(comparison["n_runs"] > 0))
    long = long.melt(id_vars=labels + ["n"], value_vars=["reported", "reproduced", "difference"],
                     var_name="column", value_name="value")
    order = list(dict.fromkeys(tuple(r) for r in long[labels].itertuples(index=False)))
    return wide_table(long, labels, "column", column_order=["reported", "reproduced", "difference"],
                      row_order=order, digits=digits, caption=caption, missing=missing)


# -- a paper's own tables (the config's `paper` key, config/paper/*.yaml) ---------------------------
# A paper config names the tables the paper prints (rows x columns of our runs), so its report shows
# our numbers in the paper's layout next to the published figures. A cell is the union of the
# table's `fixed` keys, its row and its column; a list value in a row (column) expands into one row
# (column) per value, in order. tests/test_paper_configs.py checks that every cell of every paper
# config has its evaluation job in the dry-run DAG (cell_jobs).
PAPER_PAGE = "paper.md"
CELL_KEYS = ("model", "task", "finetune", "prune", "quantize", "merge", "drop_rate", "bits", "metric")
STAGE_KEYS = ("prune", "quantize", "merge")


class PaperLayoutError(ValueError):
    """A paper table names something the config does not run; the message names the table and cell."""


def _label_part(key: str, value) -> str:
    if key == "drop_rate":
        return f"p = {float(value):g}"
    if key == "bits":
        return f"{int(value)}-bit"
    return str(value)


def expand_entries(entries: list[dict]) -> list[tuple[str, dict]]:
    """(heading, keys) of every row (or column) of a table: list values expand in key order; the
    heading is the entry's ``label`` (followed by the expanded values when it expands) or its values."""
    out = []
    for entry in entries:
        keys = [k for k in entry if k != "label"]
        unknown = [k for k in keys if k not in CELL_KEYS]
        if unknown:
            raise PaperLayoutError(f"unknown key(s) {unknown} in a table entry {entry}; known: {list(CELL_KEYS)}")
        expanding = [k for k in keys if isinstance(entry[k], list)]
        choices = [entry[k] if isinstance(entry[k], list) else [entry[k]] for k in keys]
        for values in itertools.product(*choices):
            cell = dict(zip(keys, values))
            if "label" in entry:
                extra = ", ".join(_label_part(k, cell[k]) for k in expanding)
                heading = f"{entry['label']}, {extra}" if extra else entry["label"]
            else:
                heading = ", ".join(_label_part(k, v) for k, v in cell.items() if k != "metric") or "–"
            out.append((heading, cell))
    return out


def _labels(config: Mapping, section: str) -> dict[str, dict]:
    variants = config.get("merge", {}).get("methods", []) if section == "merge" else config.get(section, [])
    return {v.get("label", v["method"]): v for v in variants}


def resolve_cell(cell: dict, config: Mapping, where: str) -> dict:
    """A cell's selector: model, task, finetune, stage (finetune | prune | quantize | merge),
    variant (the stage's label; the optimizer label for the fine-tuned model), drop_rate, bits,
    metric (None: the task's headline). Raises ``PaperLayoutError`` (naming ``where``) when the
    config does not run it."""
    stages = [k for k in STAGE_KEYS if k in cell]
    if len(stages) > 1:
        raise PaperLayoutError(f"{where}: a cell shows one variant, got {stages}")
    optimizers = [v.get("label", v["method"]) for v in config["finetune"]["optimizers"]]
    models = list(config["models"])
    model = cell.get("model", models[0] if len(models) == 1 else None)
    finetune = cell.get("finetune", optimizers[0] if len(optimizers) == 1 else None)
    if model not in config["models"]:
        raise PaperLayoutError(f"{where}: model {model!r} is not a model of this config ({models})")
    if finetune not in optimizers:
        raise PaperLayoutError(f"{where}: finetune {finetune!r} is not an optimizer label ({optimizers})")
    task = cell.get("task")
    tasks = config["models"][model]["tasks"]
    if isinstance(task, str) and task.startswith("lm-eval:"):
        # lm-eval tasks run by name (evaluate.harness_tasks) are scored inside every evaluation job
        # of a decoder variant: the cell's job is that of one of the model's own tasks
        if task.split(":", 1)[1] not in config.get("evaluate", {}).get("harness_tasks", []) \
                or config["models"][model]["arch"] != "decoder":
            raise PaperLayoutError(f"{where}: {task!r} is not in evaluate.harness_tasks of decoder {model!r}")
    elif task not in tasks:
        raise PaperLayoutError(f"{where}: task {task!r} is not a task of model {model!r}")
    selector = {"model": model, "task": task, "job_task": task, "finetune": finetune, "stage": "finetune",
                "variant": finetune, "drop_rate": None, "bits": None, "metric": cell.get("metric")}
    covered = _labels(config, stages[0]).get(cell[stages[0]], {}).get("tasks", tasks) if stages else tasks
    if task.startswith("lm-eval:"):
        selector["job_task"] = next((t for t in tasks if t in covered), tasks[0])
    stage = stages[0] if stages else None
    if stage == "prune" and float(cell.get("drop_rate", 1.0)) == 0.0:
        stage = None  # drop rate 0 is the fine-tuned model itself (no pruning job runs for it)
    if stage is None:
        if "bits" in cell:
            raise PaperLayoutError(f"{where}: bits without a quantize variant")
        return selector
    label = cell[stage]
    variants = _labels(config, stage)
    if label not in variants:
        raise PaperLayoutError(f"{where}: {stage} variant {label!r} is not in the config ({sorted(variants)})")
    variant = variants[label]
    selector.update(stage=stage, variant=label)
    if stage == "prune":
        if "drop_rate" not in cell:
            raise PaperLayoutError(f"{where}: a prune cell needs drop_rate")
        rate = float(cell["drop_rate"])
        if rate not in [float(r) for r in variant["drop_rates"]]:
            raise PaperLayoutError(f"{where}: drop rate {rate:g} is not one of {label}'s {variant['drop_rates']}")
        if selector["job_task"] not in variant.get("tasks", [selector["job_task"]]):
            raise PaperLayoutError(f"{where}: prune variant {label!r} does not prune {task}")
        selector["drop_rate"] = rate
    elif stage == "quantize":
        if "bits" not in cell or int(cell["bits"]) not in [int(b) for b in variant["bits"]]:
            raise PaperLayoutError(f"{where}: a quantize cell needs bits among {label}'s {variant['bits']}")
        if selector["job_task"] not in variant.get("tasks", [selector["job_task"]]):
            raise PaperLayoutError(f"{where}: quantize variant {label!r} does not quantize {task}")
        selector["bits"] = int(cell["bits"])
        if "after" in variant:
            selector["drop_rate"] = float(variant["after"]["drop_rate"])
    else:
        merged = variant.get("models") or [n for n, m in config["models"].items() if len(m["tasks"]) >= 2]
        if model not in merged:
            raise PaperLayoutError(f"{where}: merge variant {label!r} does not merge model {model!r}")
    return selector


def layout_cells(table: Mapping, config: Mapping) -> tuple[list[str], list[str], list[list[dict]]]:
    """(row headings, column headings, selectors[row][column]) of one paper table."""
    rows = expand_entries(table["rows"])
    columns = expand_entries(table["columns"])
    fixed = {k: v for k, v in (table.get("fixed") or {}).items() if k != "label"}
    if any(isinstance(v, list) for v in fixed.values()):
        raise PaperLayoutError(f"table {table['name']}: fixed keys take one value each")
    grid = []
    for row_heading, row in rows:
        line = []
        for column_heading, column in columns:
            overlap = (set(row) & set(column)) | (set(fixed) & (set(row) | set(column)))
            if overlap:
                raise PaperLayoutError(f"table {table['name']}: {sorted(overlap)} set twice in cell "
                                       f"[{row_heading}] x [{column_heading}]")
            where = f"paper table {table['name']!r}, cell [{row_heading}] x [{column_heading}]"
            line.append(resolve_cell({**fixed, **row, **column}, config, where))
        grid.append(line)
    return [h for h, _ in rows], [h for h, _ in columns], grid


def cell_jobs(selector: dict, config: Mapping) -> list[tuple[str, dict]]:
    """The evaluation jobs (rule, wildcards as strings) whose metrics make up one cell: one per
    fine-tuning seed (x mask seed of random variants, x calibration seed of quantized ones), as the
    workflow's rules name them."""
    base = {"model": selector["model"], "task": selector["job_task"], "ft": selector["finetune"]}
    seeds = [str(s) for s in config["finetune"].get("seeds", [0])]
    stage = selector["stage"]
    if stage == "finetune":
        return [("evaluate_finetuned", {**base, "seed": s}) for s in seeds]
    if stage == "prune":
        variant = _labels(config, "prune")[selector["variant"]]
        return [("evaluate", {**base, "seed": s, "prune": selector["variant"], "rate": f"{selector['drop_rate']:g}",
                              "mseed": str(m)}) for s in seeds for m in variant.get("mask_seeds", [0])]
    if stage == "quantize":
        variant = _labels(config, "quantize")[selector["variant"]]
        return [("evaluate_quantized", {**base, "seed": s, "quant": selector["variant"], "bits": str(selector["bits"]),
                                        "cseed": str(c)}) for s in seeds for c in variant.get("calibration_seeds", [0])]
    from methods import registry  # merges with a drop rate expand over the merge mask seeds

    variant = _labels(config, "merge")[selector["variant"]]
    random = any(p.name == "drop_rate" for p in registry.get("merge", variant["method"]).params)
    mask_seeds = config.get("merge", {}).get("mask_seeds", [0]) if random else [0]
    return [("evaluate_merge", {**base, "seed": s, "merge": selector["variant"], "mseed": str(m)})
            for s in seeds for m in mask_seeds]


def _cell_rows(selector: dict, metrics: pd.DataFrame) -> pd.DataFrame:
    part = metrics[(metrics["model"] == selector["model"]) & (metrics["task"] == selector["task"])
                   & (metrics["finetune"] == selector["finetune"]) & (metrics["stage"] == selector["stage"])]
    if selector["stage"] != "finetune":
        part = part[part["variant"] == selector["variant"]]
    if selector["stage"] == "prune":
        part = part[np.isclose(part["drop_rate"].astype(float), selector["drop_rate"], rtol=0.0, atol=1e-9)]
    if selector["stage"] == "quantize":
        part = part[part["bits"].astype(float) == selector["bits"]]
    if selector["metric"]:
        return part[part["metric"] == selector["metric"]]
    return part[part["is_primary"].astype(bool)]


def _half_width(std: float, count: int) -> float:
    """95% Student-t confidence half-width of a mean over ``count`` runs (NaN for one run), as the report's."""
    import scipy.stats

    if count < 2 or not math.isfinite(std):
        return float("nan")
    return float(scipy.stats.t.ppf(0.975, count - 1) * std / count ** 0.5)


def layout_table(table: Mapping, config: Mapping, metrics: pd.DataFrame) -> Table:
    """One paper table filled from the tidy metrics (×100 for scores; perplexities as they are):
    the mean over fine-tuning, mask and calibration seeds, ± the table's ``spread``; an empty cell
    prints "–"."""
    row_headings, column_headings, grid = layout_cells(table, config)
    shape = (len(row_headings), len(column_headings))
    values, errors, counts = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape)
    metric_of = [set() for _ in column_headings]
    for i, line in enumerate(grid):
        for j, selector in enumerate(line):
            part = _cell_rows(selector, metrics)
            if not len(part):
                continue
            axes = [a for a in ("seed", "mask_seed", "calibration_seed") if a in part.columns]
            runs = part.groupby(axes, dropna=False)["value"].mean().astype(float)
            values[i, j], counts[i, j] = runs.mean(), len(runs)
            metric_of[j].update(part["metric"])
            spread = table.get("spread", "ci95")
            if spread == "std" and len(runs) > 1:
                errors[i, j] = runs.std()
            elif spread == "ci95":
                errors[i, j] = _half_width(runs.std(), len(runs))
    raw = [bool(m) and all("perplexity" in name for name in m) for m in metric_of]
    return Table(row_names=[""], rows=[(h,) for h in row_headings], columns=column_headings, values=values,
                 errors=errors, counts=counts, better=["lower" if r else "higher" for r in raw],
                 scale=[1.0 if r else 100.0 for r in raw], digits=[2 if r else 1 for r in raw],
                 caption=table.get("caption", ""))


def paper_page(config: Mapping, metrics: pd.DataFrame, report_dir: str | Path,
               paper_dir: str | Path | None) -> str:
    """Markdown of ``report/<experiment>/paper.md``; also writes each table as
    ``tables/paper_<name>.{tex,html}``."""
    from methods.io.checkpoint import atomic_file
    from methods.report.tables import to_html, to_latex, to_markdown

    paper = config["paper"]
    report_dir = Path(report_dir)
    (report_dir / "tables").mkdir(parents=True, exist_ok=True)
    lines = [f"# Paper reproduction: {paper['title']}", "",
             f"Experiment `{config['experiment']}`; the config's `paper` section lays out the paper's tables, "
             "filled from this experiment's `metrics.csv` (headline metric ×100 unless named; "
             "mean over fine-tuning, mask and calibration seeds; – = no run). "
             + (f"Research notes followed: {paper['spec']}." if paper.get("spec") else ""), ""]
    if paper.get("departures"):
        lines += ["## Departures from the paper's protocol", ""] + [f"- {d}" for d in paper["departures"]] + [""]
    for table in paper["tables"]:
        rendered = layout_table(table, config, metrics)
        spread = {"std": "± = standard deviation over runs", "ci95": "± = 95% confidence interval (Student t) over runs",
                  "none": "no spread shown"}[table.get("spread", "ci95")]
        rendered.caption = f"{table.get('caption', '')} ({spread}; best in bold).".strip()
        with atomic_file(report_dir / "tables" / f"paper_{table['name']}.tex") as f:
            f.write(to_latex(rendered) + "\n")
        with atomic_file(report_dir / "tables" / f"paper_{table['name']}.html") as f:
            f.write(to_html(rendered) + "\n")
        lines += [f"## {table['name']}", "", to_markdown(rendered), ""]
    lines += ["## Reported vs reproduced", ""]
    numbers = None
    if paper_dir is not None and (Path(paper_dir) / f"{paper['key']}.csv").is_file():
        numbers = read_paper_file(Path(paper_dir) / f"{paper['key']}.csv")
    if numbers is None:
        lines += [f"No published figure of this paper is in `report/paper_numbers/{paper['key']}.csv`: the research "
                  "notes verify none (figures they mark [2nd], [UNVERIFIED] or TODO are left out on purpose).", ""]
    else:
        comparison = reported_vs_reproduced(numbers, metrics)
        lines += [f"The {len(numbers)} figures of `report/paper_numbers/{paper['key']}.csv` (each verified by a "
                  "research note) next to this experiment's runs; `not run` = no run of ours matches the figure's "
                  "task, method, drop rate and bits.", "", to_markdown(comparison_table(comparison)), ""]
    return "\n".join(lines)


def write_paper_page(config: Mapping, metrics: pd.DataFrame, report_dir: str | Path,
                     paper_dir: str | Path | None) -> Path | None:
    """Write ``paper.md`` (and its tables) when the config has a ``paper`` section; return its path."""
    from methods.io.checkpoint import atomic_file

    if not config.get("paper"):
        return None
    text = paper_page(config, metrics, report_dir, paper_dir)
    target = Path(report_dir) / PAPER_PAGE
    with atomic_file(target) as f:
        f.write(text + "\n")
    return target
