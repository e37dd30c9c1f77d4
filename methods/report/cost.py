"""What each result cost: wall time, CPU time and peak memory per job, and per variant.

Two records exist for a job, and neither alone covers every job:

- Snakemake's ``benchmark:`` TSV (``…/<stage>.benchmark.tsv``, ``benchmarks/<rule>/<name>.tsv``)
  measures the whole job process (start-up, imports and loading included), but rules whose
  outputs come from Snakemake's between-workflow cache have none, and a cached job's cost is
  the one of the run that produced it;
- our ``manifest.json`` (``methods/io/manifest.py``, beside each checkpoint) is written by the
  job itself with ``wall_time_s`` (from the start of the method to the write, without process
  start-up), ``peak_rss_mb`` and, where a job measured one, ``peak_gpu_mb``; evaluation jobs and
  quantized artifacts write none.

``collect_costs`` merges the two into one row per job and says which it used (``source``): the
benchmark's seconds, RSS and CPU time where present (they include everything the job cost), the
manifest's otherwise; ``peak_gpu_mb`` only ever comes from a manifest. The path wildcards of the
workflow (``workflow/rules/common.smk``) become columns, so a cost can be joined with the metrics
table on model, task, finetune, seed, variant, drop_rate, bits, mask_seed and calibration_seed (as far as the path
holds them: a quantized DARE delta's drop rate is in the config, not in its ``quant~…`` path).

``cost_per_variant`` then answers what a report table needs next to a score: what producing and
evaluating a variant cost, in total and per instance (one instance = one produced model: one
fine-tuned checkpoint, one pruned or quantized variant at one rate or bit width and mask seed, one
merge; the merge's evaluations on each task all count towards it).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from methods.io.checkpoint import MANIFEST, read_json

# Columns of Snakemake's benchmark TSV that we read (the others, and the extended format's, are ignored).
BENCHMARK_COLUMNS = ("s", "max_rss", "cpu_time")
MISSING_VALUES = ("NA", "-", "")  # Snakemake writes NA when a job ended before its first sample

KEYS = ["model", "task", "finetune", "seed", "variant", "drop_rate", "bits", "mask_seed", "calibration_seed"]
COLUMNS = (["path", "stage", "variant_stage", "instance"] + KEYS
           + ["seconds", "max_rss_mb", "cpu_seconds", "peak_gpu_mb", "source", "manifest"])

_LABEL = r"[A-Za-z0-9][A-Za-z0-9.-]*"
_PARTS = {
    "finetune": re.compile(rf"^ft~(?P<finetune>{_LABEL})$"),
    "seed": re.compile(r"^seed~(?P<seed>[0-9]+)$"),
    "prune": re.compile(rf"^prune~(?P<variant>{_LABEL})_rate~(?P<drop_rate>[0-9.]+(?:e-?[0-9]+)?)"
                        r"_mseed~(?P<mask_seed>[0-9]+)$"),
    "quantize": re.compile(rf"^quant~(?P<variant>{_LABEL})_bits~(?P<bits>[0-9]+)_cseed~(?P<calibration_seed>[0-9]+)$"),
    "merge": re.compile(rf"^merge~(?P<variant>{_LABEL})_mseed~(?P<mask_seed>[0-9]+)$"),
    "eval": re.compile(rf"^eval~(?P<task>{_LABEL})$"),
}


class CostRecordError(ValueError):
    """A benchmark or manifest file cannot be read; the message names the file."""


def read_benchmark(path: str | Path) -> dict:
    """Seconds, peak RSS (MB) and CPU seconds of one Snakemake benchmark file. With
    ``repeat(…, n)`` the file holds n rows: the mean seconds and CPU time and the largest RSS."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CostRecordError(f"{path}: not a Snakemake benchmark TSV ({error})") from None
    missing = [c for c in BENCHMARK_COLUMNS if c not in frame.columns]
    if missing:
        raise CostRecordError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)}")
    if frame.empty:
        raise CostRecordError(f"{path}: no benchmark row under the header")
    values = {}
    for column in BENCHMARK_COLUMNS:
        numbers = []
        for line, text in enumerate(frame[column], start=2):
            if text.strip() in MISSING_VALUES:
                numbers.append(math.nan)
                continue
            try:
                numbers.append(float(text))
            except ValueError:
                raise CostRecordError(f"{path}, line {line}: column {column!r} = {text!r} is not a number") from None
        values[column] = np.array(numbers)

    def reduce(array: np.ndarray, how) -> float:
        finite = array[np.isfinite(array)]
        return float(how(finite)) if finite.size else math.nan

    return {"seconds": reduce(values["s"], np.mean), "max_rss_mb": reduce(values["max_rss"], np.max),
            "cpu_seconds": reduce(values["cpu_time"], np.mean)}


def read_manifest_cost(path: str | Path) -> dict:
    """Wall time, peak RSS and (optional) peak GPU memory a job recorded in its manifest."""
    path = Path(path)
    try:
        record = read_json(path)
    except (OSError, ValueError) as error:
        raise CostRecordError(f"{path}: not a readable manifest ({error})") from None
    if not isinstance(record, dict):
        raise CostRecordError(f"{path}: a manifest is a JSON object, found {type(record).__name__}")

    def number(key: str) -> float:
        value = record.get(key)
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CostRecordError(f"{path}: {key} = {value!r} is not a number")
        return float(value)

    return {"stage": record.get("stage"), "seconds": number("wall_time_s"), "max_rss_mb": number("peak_rss_mb"),
            "peak_gpu_mb": number("peak_gpu_mb")}


def parse_job_path(relative: str | Path) -> dict:
    """The stage and wildcards of a benchmark or manifest path relative to ``results/<exp>``.

    ``stage`` is the job's own stage (``evaluate`` for an evaluation), ``variant_stage`` the stage
    that produced the model it concerns (an evaluation of a pruned model: ``prune``), ``instance``
    the directory of that model (its job directory), shared by the producing job and its
    evaluations."""
    parts = Path(relative).parts
    info = {key: math.nan for key in KEYS}
    if len(parts) == 3 and parts[0] == "benchmarks":             # benchmarks/<rule>/<name>.tsv
        rule, name = parts[1], Path(parts[2]).stem
        if rule == "pretrain":
            return {**info, "stage": "pretrain", "variant_stage": "pretrain", "instance": f"{name}/pretrained",
                    "model": name}
        return {**info, "stage": rule, "variant_stage": rule, "instance": f"benchmarks/{rule}/{name}"}
    name = parts[-1]
    if name == MANIFEST:
        directory = parts[:-1]
        if directory and directory[-1] == "checkpoint":
            directory = directory[:-1]
        stage = None                                             # the manifest's own "stage" decides
    else:
        directory = parts[:-1]
        stage = name[: -len(".benchmark.tsv")] if name.endswith(".benchmark.tsv") else Path(name).stem
    if len(directory) == 2 and directory[1] == "pretrained":
        return {**info, "stage": stage or "pretrain", "variant_stage": "pretrain", "instance": "/".join(directory),
                "model": directory[0]}
    variant_stage, instance = "finetune", list(directory)
    for index, part in enumerate(directory):
        if index == 0:
            info["model"] = part
        elif index == 1 and part != "merged":
            info["task"] = part
        for kind, pattern in _PARTS.items():
            match = pattern.match(part)
            if not match:
                continue
            info.update(match.groupdict())
            if kind in ("prune", "quantize", "merge"):
                variant_stage = kind
            if kind == "eval":
                instance = list(directory[:index])
    if variant_stage == "finetune" and isinstance(info["finetune"], str):
        info["variant"] = info["finetune"]
    for key in ("seed", "mask_seed", "bits", "calibration_seed"):
        if isinstance(info[key], str):
            info[key] = int(info[key])
    if isinstance(info["drop_rate"], str):
        info["drop_rate"] = float(info["drop_rate"])
    return {**info, "stage": stage, "variant_stage": variant_stage, "instance": "/".join(instance)}


def _benchmark_files(results: Path) -> list[Path]:
    files = set(results.rglob("*.benchmark.tsv"))
    if (results / "benchmarks").is_dir():
        files |= set((results / "benchmarks").glob("*/*.tsv"))
    return sorted(files)


def _manifest_files(results: Path) -> list[Path]:
    # Only the manifests the workflow writes beside a job's model: <model>/pretrained/ and
    # …/checkpoint/ (fine-tuned, pruned, merged); parents recorded inside them are not jobs.
    found = set(results.glob(f"*/pretrained/{MANIFEST}")) | set(results.rglob(f"checkpoint/{MANIFEST}"))
    return sorted(found)


def collect_costs(results_dir: str | Path) -> pd.DataFrame:
    """One row per job under ``results_dir`` (``results/<experiment>``), sorted by path: columns
    :data:`COLUMNS`. ``path`` is the benchmark file relative to ``results_dir`` (the manifest when
    the job has no benchmark), ``source`` is "benchmark", "manifest" or "benchmark+manifest"."""
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no such results directory")
    jobs: dict[tuple[str, str], dict] = {}
    for path in _benchmark_files(results):
        relative = path.relative_to(results).as_posix()
        info = parse_job_path(relative)
        # A job is (stage, directory it wrote): the benchmark's own directory, except under
        # benchmarks/<rule>/, where the pre-training benchmark stands for <model>/pretrained.
        job_dir = info["instance"] if relative.startswith("benchmarks/") else Path(relative).parent.as_posix()
        jobs[(info["stage"], job_dir)] = {**info, **read_benchmark(path), "path": relative, "source": "benchmark",
                                          "peak_gpu_mb": math.nan, "manifest": math.nan}
    for path in _manifest_files(results):
        relative = path.relative_to(results).as_posix()
        info = parse_job_path(relative)
        cost = read_manifest_cost(path)
        stage = cost.pop("stage") or info["stage"] or info["variant_stage"]
        key = (stage, info["instance"])
        if key in jobs:
            job = jobs[key]
            job.update(source="benchmark+manifest", manifest=relative, peak_gpu_mb=cost["peak_gpu_mb"])
            for column in ("seconds", "max_rss_mb"):
                if math.isnan(job[column]):
                    job[column] = cost[column]
        else:
            jobs[key] = {**info, **cost, "stage": stage, "cpu_seconds": math.nan, "path": relative,
                         "source": "manifest", "manifest": relative}
    frame = pd.DataFrame(list(jobs.values()), columns=COLUMNS)
    # the metrics table's types: seed an integer, mask_seed / bits / drop_rate floats (NaN where unset)
    frame = frame.astype({"seed": "Int64", "mask_seed": float, "bits": float, "drop_rate": float,
                          "calibration_seed": float})
    return frame.sort_values(["path"], kind="stable").reset_index(drop=True)


def cost_per_variant(costs: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per (variant_stage → ``stage``, variant[, by...]): ``produce_seconds`` (the jobs that made
    the variants: fine-tune, prune, quantize, merge, pre-train), ``evaluate_seconds`` (their
    evaluations), ``total_seconds``, ``seconds_per_instance`` (total / instances), ``cpu_seconds``,
    the largest ``max_rss_mb`` and ``peak_gpu_mb`` of any of those jobs, ``instances`` and ``jobs``.

    Sums skip jobs without a time; ``jobs_without_time`` counts them, so a partial sum is visible
    as such rather than read as a cheap variant. Pass ``by=["model"]`` (or drop_rate, bits, ...)
    for finer rows."""
    keys = ["variant_stage", "variant", *by]
    missing = [c for c in keys + ["stage", "instance", "seconds", "max_rss_mb", "cpu_seconds", "peak_gpu_mb"]
               if c not in costs.columns]
    if missing:
        raise KeyError(f"costs lack column(s) {missing}; expected the frame of collect_costs")
    frame = costs.assign(evaluating=costs["stage"] == "evaluate")
    frame = frame.assign(produce=frame["seconds"].where(~frame["evaluating"]),
                         evaluate=frame["seconds"].where(frame["evaluating"]))
    grouped = frame.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame({
        "produce_seconds": grouped["produce"].sum(min_count=1),
        "evaluate_seconds": grouped["evaluate"].sum(min_count=1),
        "total_seconds": grouped["seconds"].sum(min_count=1),
        "cpu_seconds": grouped["cpu_seconds"].sum(min_count=1),
        "max_rss_mb": grouped["max_rss_mb"].max(),
        "peak_gpu_mb": grouped["peak_gpu_mb"].max(),
        "instances": grouped["instance"].nunique(),
        "jobs": grouped.size(),
        "jobs_without_time": grouped["seconds"].agg(lambda s: int(s.isna().sum())),
    })
    out["seconds_per_instance"] = out["total_seconds"] / out["instances"]
    out = out.reset_index().rename(columns={"variant_stage": "stage"})
    order = ["stage", "variant", *by, "instances", "jobs", "produce_seconds", "evaluate_seconds", "total_seconds",
             "seconds_per_instance", "cpu_seconds", "max_rss_mb", "peak_gpu_mb", "jobs_without_time"]
    return out[order]
