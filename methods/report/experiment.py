"""An experiment's report from its tidy metrics table: one Markdown page with a section per stage
(delta pruning: method x rate by task, and its plot; quantization: method x bits with measured
storage, and its plot; merging: method by task with average and normalized average) and the task
descriptions. Tables are also written as LaTeX and HTML under ``tables/``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from methods.data.lm_eval_scored import has_suite_data
from methods.evaluate.multitask import normalized
from methods.io.checkpoint import atomic_file
from methods.report.cost import collect_costs, cost_per_variant
from methods.report.paper import comparison_table, load_paper_numbers, reported_vs_reproduced
from methods.report.plots import (delta_diagnostics_plot, pareto_plot, score_vs_bits, score_vs_drop_rate, variant_family,
                                  variant_label)
from methods.report.significance import compare
from methods.report.tables import grid_html, grid_latex, markdown_grid, to_html, to_latex, to_markdown, wide_table
from methods.tasks import get_task

SEED_AXES = ["seed", "mask_seed", "calibration_seed"]


def half_width(std: float, count: int, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of a mean over ``count`` runs (NaN for one)."""
    if count < 2 or pd.isna(std):
        return float("nan")
    return float(scipy.stats.t.ppf((1 + level) / 2, count - 1) * std / count ** 0.5)


def primary_scores(metrics: pd.DataFrame, keys: list[str], metric: str | None = None) -> pd.DataFrame:
    """Mean, standard deviation, count and 95% CI half-width (``error``) of each task's headline
    metric (or of ``metric``) over seeds."""
    primary = metrics[metrics["is_primary"] if metric is None else metrics["metric"] == metric]
    keys = ["model", "task", "metric", "finetune"] + keys
    scores = primary.groupby(keys, sort=True, dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()
    return scores.assign(error=[half_width(s, c) for s, c in zip(scores["std"], scores["count"])])


def _cell(mean: float, std: float, count: int, scale: float = 100.0, digits: int = 1) -> str:
    error = half_width(std, count)
    if pd.notna(error):
        return f"{scale * mean:.{digits}f} ± {scale * error:.{digits}f}"
    return f"{scale * mean:.{digits}f}"


def _task_column(frame: pd.DataFrame) -> pd.Series:
    return frame["task"] + " (" + frame["metric"] + ")"


# -- delta pruning ------------------------------------------------------------------------------
def prune_table(scores: pd.DataFrame, scale: float = 100.0, digits: int = 1):
    """Rows: fine-tune → prune variant at each drop rate; columns: task (metric); mean ± sd over runs."""
    long = scores.assign(column=_task_column(scores), method=scores["finetune"] + " → " + scores["variant"])
    order = list(dict.fromkeys(long.sort_values(["model", "task"])["column"]))  # tasks grouped by model
    return wide_table(long.rename(columns={"drop_rate": "drop rate"}), ["method", "drop rate"], "column",
                      value="mean", error="error", column_order=order, scale=scale, digits=digits)


def write_table(table, directory: Path, name: str) -> str:
    """Write a table as ``tables/<name>.tex`` and ``.html`` next to the page; return its Markdown."""
    (directory / "tables").mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "tables" / f"{name}.tex") as f:
        f.write(to_latex(table) + "\n")
    with atomic_file(directory / "tables" / f"{name}.html") as f:
        f.write(to_html(table) + "\n")
    return to_markdown(table)


# -- quantization -------------------------------------------------------------------------------
def quantize_scores(metrics: pd.DataFrame) -> pd.DataFrame:
    """Headline score of every quantized variant with its code width and measured storage (mean
    over seeds), on the tasks that have quantized variants."""
    quantized = metrics[metrics["stage"] == "quantize"]
    scores = primary_scores(quantized, ["variant", "method", "bits", "bpp", "model_bpp"])
    return scores.sort_values(["model", "task", "variant", "bits"]).reset_index(drop=True)


def quantize_table(metrics: pd.DataFrame, scores: pd.DataFrame, model: str):
    """Rows: the unquantized fine-tuned model, then each quantize variant at each code width with
    its measured bits per quantized parameter; columns: the model's quantized tasks."""
    part = scores[scores["model"] == model]
    reference = primary_scores(metrics[(metrics["stage"] == "finetune") & (metrics["model"] == model)
                                       & metrics["task"].isin(part["task"])], [])
    reference = reference.assign(variant=reference["finetune"] + " (unquantized)", method="–", bits=float("nan"),
                                 bpp=float("nan"))
    long = pd.concat([reference, part.assign(variant=part["finetune"] + " → " + part["variant"])])
    long = long.assign(column=_task_column(long))
    long = long.rename(columns={"bpp": "bits/param"})
    long["bits/param"] = long["bits/param"].map(lambda v: f"{v:.3f}" if pd.notna(v) else "–")
    order = [tuple(r) for r in long[["variant", "method", "bits", "bits/param"]].drop_duplicates().itertuples(index=False)]
    return wide_table(long, ["variant", "method", "bits", "bits/param"], "column", value="mean", error="error",
                      scale=100.0, row_order=order, better="higher")


# -- storage across every compression ----------------------------------------------------------
def stored_variants(metrics: pd.DataFrame) -> pd.DataFrame:
    """Headline rows of every variant with a measured storage (``model_bpp``: pruned and merged
    delta checkpoints, quantized artifacts), plus the fine-tuned reference rows of the same tasks."""
    if "model_bpp" not in metrics.columns:
        return metrics.iloc[:0]
    primary = metrics[metrics["is_primary"]]
    stored = primary[pd.to_numeric(primary["model_bpp"], errors="coerce") > 0]
    tasks = set(zip(stored["model"], stored["task"]))
    same_task = np.array([pair in tasks for pair in zip(primary["model"], primary["task"])], dtype=bool)
    reference = primary[(primary["stage"] == "finetune").to_numpy() & same_task]
    return pd.concat([stored, reference])


def storage_table(rows: pd.DataFrame):
    """Rows: every stored variant (family, label); columns: model; cells: bits per parameter stored
    beyond the shared base (mean over runs and tasks; the storage of a variant does not depend on
    the task it is scored on, except for the task's own head)."""
    stored = rows[rows["stage"] != "finetune"]
    long = stored.assign(family=variant_family(stored), label=variant_label(stored), column=stored["model"])
    cells = long.groupby(["family", "label", "column"], sort=True)["model_bpp"].mean().reset_index()
    return wide_table(cells, ["family", "label"], "column", value="model_bpp", digits=3, better="lower")


def storage_section(metrics: pd.DataFrame, report_dir: Path) -> list[str]:
    rows = stored_variants(metrics)
    if not len(rows) or not (rows["stage"] != "finetune").any():
        return []
    pareto_plot(rows, report_dir / "pareto", storage="model_bpp")
    return ["## Storage: every variant and the Pareto front", "",
            "Bits per parameter each variant stores beyond the shared base model, measured from the files "
            "written: a pruned or merged variant is a delta checkpoint (per tensor a bitmask or index list "
            "plus the changed values, whichever is smaller; `variant_storage: delta`), a quantized variant "
            "its packed artifact (codes, scales, zero-points and the float tensors it keeps, needing no base). "
            "The fine-tuned model in float32 stores 32.", "",
            write_table(storage_table(rows), report_dir, "storage"), "",
            "Every variant as a point of score against its storage, with the Pareto front (the best score "
            "reachable within a storage budget):", "", "![Pareto front](pareto.png)", ""]


# -- merging ------------------------------------------------------------------------------------
def merge_table(metrics: pd.DataFrame, model: str) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows). Rows: the individually fine-tuned models, then each merge variant; columns: every task's
    headline score, their average, and the normalized average (merged / fine-tuned per task)."""
    primary = metrics[metrics["is_primary"] & (metrics["model"] == model)]
    reference = primary[primary["stage"] == "finetune"].set_index(["task", "finetune", "seed"])["value"]
    merged = primary[primary["stage"] == "merge"].copy()
    merged["normalized"] = [normalized(v, reference.loc[(t, f, s)])
                            for v, t, f, s in zip(merged["value"], merged["task"], merged["finetune"], merged["seed"])]
    tasks = sorted(primary["task"].unique())
    metric_of = dict(zip(primary["task"], primary["metric"]))
    header = ["variant", "chosen on validation"] + [f"{t} ({metric_of[t]})" for t in tasks] + ["average", "normalized avg"]

    def row(label: str, params: str, part: pd.DataFrame, norm: pd.Series | None) -> list[str]:
        by_task = part.groupby("task")["value"]
        cells = [_cell(by_task.mean()[t], by_task.std()[t], by_task.count()[t]) if t in by_task.groups else "–"
                 for t in tasks]
        # average over tasks within each run, then mean (± sd) over runs
        runs = part.groupby(["finetune", "seed", "mask_seed"], dropna=False)["value"].mean()
        average = _cell(runs.mean(), runs.std(), len(runs))
        if norm is None:
            norm_cell = "100.0"
        else:
            norm_runs = part.assign(n=norm).groupby(["finetune", "seed", "mask_seed"], dropna=False)["n"].mean()
            norm_cell = _cell(norm_runs.mean(), norm_runs.std(), len(norm_runs))
        return [label, params] + cells + [average, norm_cell]

    finetuned = primary[primary["stage"] == "finetune"]
    rows = [row("fine-tuned, one model per task", "–", finetuned, None)]
    for variant, part in merged.groupby("variant", sort=True):
        chosen = sorted({_params_text(p) for p in part["params"]})
        rows.append(row(f"{part['finetune'].iloc[0]} → {variant}", "; ".join(chosen), part, part["normalized"]))
    return header, rows


def _params_text(params_json: str) -> str:
    params = json.loads(params_json)
    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        return "+".join(map(str, value)) if isinstance(value, list) else str(value)

    return ", ".join(f"{k}={text(v)}" for k, v in sorted(params.items())) or "–"


# -- significance, cost, published numbers -------------------------------------------------------
def significance_section(metrics: pd.DataFrame, report_dir: Path) -> list[str]:
    """Paired permutation tests of each pruning method against DARE at the same drop rate, and of
    each quantizer against RTN at the same code width, on the same test examples."""
    if "samples" not in metrics.columns:  # a metrics.csv aggregated before per-example paths were recorded
        return ["## Is the difference real?", "",
                "Not computed: this metrics.csv has no `samples` column; delete it and re-run to aggregate again.", ""]
    # lm-eval tasks by name, and tasks scored only through them (instruct, code), have no per-example
    # outputs of their own to pair
    own = metrics["task"].map(lambda t: not t.startswith("lm-eval:") and has_suite_data(t))
    primary = metrics[metrics["is_primary"] & own.astype(bool)]
    comparisons = []
    for stage, baseline in (("prune", "dare"), ("quantize", "rtn")):
        rows = primary[primary["stage"] == stage]
        base = rows[(rows["method"] == baseline) & (rows["variant"] == baseline)]
        for variant, part in rows[rows["variant"] != baseline].groupby("variant", sort=True):
            comparisons.append(compare(part, base))
    comparisons = [c for c in comparisons if len(c)]
    if not comparisons:
        return []
    tests = pd.concat(comparisons, ignore_index=True)
    setting = [f"p = {p:g}" if pd.notna(p) else f"{int(b)}-bit" for p, b in zip(tests["drop_rate"], tests["bits"])]
    calibration = ["–" if pd.isna(c) else str(int(c)) for c in tests["calibration_seed"]]
    tests = tests.assign(setting=setting, comparison=tests["a"] + " vs " + tests["b"],
                         **{"calibration seed": calibration})
    runs = ["model", "task", "finetune", "setting", "comparison", "seed", "calibration seed"]
    long = tests.melt(id_vars=runs,
                      value_vars=["score_a", "score_b", "difference", "ci_low", "ci_high", "p_value"],
                      var_name="column", value_name="value")
    names = {"score_a": "A", "score_b": "B", "difference": "A − B", "ci_low": "CI low", "ci_high": "CI high",
             "p_value": "p"}
    long["column"] = long["column"].map(names)
    scale = {c: (1.0 if c == "p" else 100.0) for c in names.values()}
    digits = {c: (3 if c == "p" else 1) for c in names.values()}
    table = wide_table(long, runs, "column",
                       column_order=list(names.values()), scale=scale, digits=digits)
    significant = int((tests["p_value"] < 0.05).sum())
    return ["## Is the difference real?", "",
            "Paired approximate-randomization tests on the test examples (1,000 permutations; the CI of A − B "
            "is the paired bootstrap's 95% interval), with the evaluator's own metric code, so MCC and "
            "Pearson/Spearman are tested as reported. Each pruning method is compared with DARE at the same "
            "drop rate and mask seed, each quantizer with RTN at the same code width. p-values are per "
            f"comparison and uncorrected ({significant} of {len(tests)} below 0.05); they cover test-set "
            "sampling, not seed variation.", "", write_table(table, report_dir, "significance"), ""]


def cost_section(results_dir: Path, metrics: pd.DataFrame, report_dir: Path) -> list[str]:
    """Compute spent per variant: the jobs that produced it and those that evaluated it (variants
    of this experiment's table only: a results folder can hold leftovers of earlier configs)."""
    costs = collect_costs(results_dir)
    if not len(costs):
        return []
    per_variant = cost_per_variant(costs)
    current = set(zip(metrics["stage"], metrics["variant"]))
    per_variant = per_variant[[stage == "pretrain" or (stage, variant) in current
                               for stage, variant in zip(per_variant["stage"], per_variant["variant"])]]
    names = {"instances": "instances", "produce_seconds": "produce s", "evaluate_seconds": "evaluate s",
             "seconds_per_instance": "s per instance", "max_rss_mb": "peak RSS MB"}
    long = per_variant.melt(
        id_vars=["stage", "variant"], value_vars=list(names), var_name="column", value_name="value")
    long["column"] = long["column"].map(names)
    digits = {"instances": 0, "produce s": 1, "evaluate s": 1, "s per instance": 1, "peak RSS MB": 0}
    table = wide_table(long, ["stage", "variant"], "column", column_order=list(names.values()), digits=digits)
    return ["## Cost", "",
            "Wall time and peak memory per variant, from each job's Snakemake benchmark file (the job manifest "
            "where a job has none): *produce* = the jobs that made the variant's instances (fine-tunes, prunes, "
            "quantizations, merges with their hyper-parameter search), *evaluate* = their evaluations; "
            "*s per instance* = (produce + evaluate) / instances. Measured on the machine that ran the "
            "experiment.", "", write_table(table, report_dir, "cost"), ""]


def paper_section(paper_dir: Path, metrics: pd.DataFrame, report_dir: Path) -> list[str]:
    """Published figures (report/paper_numbers, each backed by a research note) next to our runs."""
    numbers = load_paper_numbers(paper_dir)
    comparison = reported_vs_reproduced(numbers, metrics)
    table = comparison_table(comparison)
    write_table(table, report_dir, "paper_numbers")
    matched = comparison[comparison["reproduced"].notna()]
    lines = ["## Reported vs reproduced", "",
             f"{len(numbers)} published figures from {numbers['paper'].nunique()} papers are in `report/paper_numbers/` "
             f"(only figures our research notes verify); {len(matched)} have a matching run in this experiment. "
             "The full comparison is `tables/paper_numbers.{tex,html}`.", ""]
    if len(matched):
        lines += [to_markdown(comparison_table(matched)), ""]
    return lines


# -- the page -----------------------------------------------------------------------------------
def diagnostics_section(recommendation_files: list[str | Path], report_dir: Path) -> list[str]:
    """Delta statistics of each fine-tuned model (the model row of its layers.csv) and the method
    the DAREx decision procedure recommends post hoc at each drop rate."""
    rows = []
    rates: list[float] = []
    for path in recommendation_files:
        path = Path(path)
        record = json.loads(path.read_text())
        model_row = pd.read_csv(path.parent / "layers.csv").iloc[-1]
        post_hoc = {r["drop_rate"]: r for r in record["recommendations"] if r["situation"] == "post hoc"}
        controlled = [r for r in record["recommendations"] if r["situation"] != "post hoc"]
        rates = sorted(post_hoc)
        recommended = [post_hoc[r]["method"] + (f" ({post_hoc[r]['q_rule'].split(' (')[0]})"
                                                if post_hoc[r]["method"] == "darex-q" else "") for r in rates]
        with_control = " + ".join(filter(None, [controlled[-1]["finetune"], controlled[-1]["method"]])) if controlled else "–"
        rows.append([record["model"], record["task"], f"{record['finetune']} (seed {record['seed']})",
                     f"{model_row['max_abs']:.3g}", f"{model_row['mean']:.2e}", f"{model_row['var'] ** 0.5:.2e}",
                     f"{model_row['norm_of_delta']:.3g}", f"{model_row['delta_of_norm']:.3g}",
                     f"{model_row.get('dare_output_std_max', float('nan')):.3g}", *recommended, with_control])
    if not rows:
        return []
    # one series per fine-tuned model: several optimizers (or seeds) can fine-tune the same model on one task
    layers = pd.concat([pd.read_csv(Path(p).parent / "layers.csv").assign(model=r[0], task=r[1], finetune=r[2])
                        for p, r in zip(recommendation_files, rows)])
    delta_diagnostics_plot(layers, report_dir / "delta_diagnostics", series=["model", "task", "finetune"])
    header = (["model", "task", "fine-tune", "max abs δ", "mean δ", "std δ", "NOD ‖δ‖", "DON", "DARE out std"]
              + [f"post hoc, p = {r:g}" for r in rates] + [f"controlling fine-tuning, p = {rates[-1]:g}"])
    return ["## Delta diagnostics", "",
            "Statistics of each fine-tuned model's delta over the tensors the papers prune (NOD = Σ‖δ‖ over "
            "tensors, DON = Σ(‖θ_ft‖ − ‖θ₀‖), after DONOD; *DARE out std* = the largest predicted standard "
            "deviation of a layer output under DARE at the highest drop rate, √(p/(1−p)·Σ_j c_ij²) with "
            "c = δ·x̄, the DAREx variance term), and the method the DAREx decision procedure recommends "
            "(`methods/prune/diagnostics.py: recommend`; the flowchart is reconstructed from the paper's text). "
            "Per-tensor and per-layer tables: `…/diagnostics/{tensors,layers}.csv` next to each fine-tuned model.",
            "", markdown_grid(header, rows), "", "![delta statistics per layer](delta_diagnostics.png)", ""]


def write_report(metrics: pd.DataFrame, experiment: str, report_dir: Path, diagnostics: list[str | Path] = (),
                 results_dir: Path | None = None, paper_dir: Path | None = None) -> None:
    """``report_dir``/README.md with its plots (PNG + PDF) and ``tables/`` (LaTeX, HTML); the cost
    section reads the job benchmarks under ``results_dir``, the comparison with published figures
    ``paper_dir``."""
    report_dir = Path(report_dir)
    split = metrics["split"].iloc[0]
    seeds = {axis: sorted(metrics[axis].dropna().astype(int).unique().tolist()) for axis in SEED_AXES}
    lines = [
        f"# Experiment `{experiment}`",
        "",
        f"Headline metric of each task on the `{split}` split, ×100; mean ± 95% confidence interval (Student t) over "
        f"fine-tuning seeds {seeds['seed']} and mask seeds {seeds['mask_seed']} where there is more than one run. "
        "Every table is also in `tables/` as LaTeX (booktabs) and HTML; plots are PNG and PDF.",
        "",
        "## Delta-parameter pruning",
        "",
        "Drop rate 0 is the fine-tuned model itself (no pruning job runs for it).",
        "",
    ]
    prune = metrics[metrics["stage"] == "prune"]
    # Drop rate 0 prunes nothing: every pruning variant starts from the fine-tuned model's score.
    unpruned = [metrics[metrics["stage"] == "finetune"].assign(variant=variant, drop_rate=0.0)
                for variant in prune["variant"].unique()]
    if not unpruned:  # nothing pruned (a quantization-only paper config): the fine-tuned models at p = 0
        unpruned = [metrics[metrics["stage"] == "finetune"].assign(variant="none", drop_rate=0.0)]
    with_unpruned = pd.concat([prune, *unpruned])
    score_vs_drop_rate(with_unpruned[with_unpruned["is_primary"]], report_dir / "score_vs_drop_rate",
                       method=["finetune", "variant"])
    lines += [write_table(prune_table(primary_scores(with_unpruned, ["variant", "drop_rate"])), report_dir, "prune"),
              "", "![score vs drop rate](score_vs_drop_rate.png)", ""]
    if (with_unpruned["metric"] == "perplexity").any():
        perplexity = prune_table(primary_scores(with_unpruned, ["variant", "drop_rate"], "perplexity"), scale=1.0,
                                 digits=2)
        lines += ["### Decoder perplexity on held-out text", "",
                  "Perplexity (lower is better) of each decoder variant on the configured text "
                  "(`evaluate.perplexity`), in the row of the task it was fine-tuned on.", "",
                  write_table(perplexity, report_dir, "prune_perplexity"), ""]
    lines += diagnostics_section(list(diagnostics), report_dir)
    quantized = quantize_scores(metrics)
    if len(quantized):
        lines += ["## Weight quantization", "",
                  "Linear weights inside the transformer blocks quantized (embeddings, heads, norms and biases "
                  "kept); score ×100, best in bold. *bits/param* is the storage of the quantized layers per "
                  "parameter, measured from the packed artifact (codes + scales + zero-points + method "
                  "metadata). Variants with `target: delta` quantize θ_ft − θ_base and count only the delta's "
                  "storage.", ""]
        for model in sorted(quantized["model"].unique()):
            table = quantize_table(metrics, quantized, model)
            lines += [f"### {model}", "", write_table(table, report_dir, f"quantize_{model}"), ""]
        tasks = set(zip(quantized["model"], quantized["task"]))
        rows = metrics[metrics["is_primary"] & metrics["stage"].isin(["quantize", "finetune"])]
        rows = rows[[pair in tasks for pair in zip(rows["model"], rows["task"])]]
        score_vs_bits(rows, report_dir / "score_vs_bits")
        lines += ["![score vs bits per parameter](score_vs_bits.png)", ""]
    lines += storage_section(metrics, report_dir)
    merged = metrics[metrics["stage"] == "merge"]
    if len(merged):
        lines += ["## Merging", "",
                  "Each model's fine-tuned checkpoints (one per task) merged into one. Encoders merge the body and "
                  "keep each task's own head; decoders merge every tensor. Hyper-parameters were chosen on the "
                  f"`{merged['selected_on'].iloc[0]}` split (mean normalized score over the tasks), never on "
                  f"`{split}`. Normalized = merged score / the fine-tuned model's score on the same task, averaged "
                  "over tasks (the raw score where the fine-tuned score is ≤ 0).", ""]
        for model in sorted(merged["model"].unique()):
            header, rows = merge_table(metrics, model)
            (report_dir / "tables").mkdir(parents=True, exist_ok=True)
            with atomic_file(report_dir / "tables" / f"merge_{model}.tex") as f:
                f.write(grid_latex(header, rows))
            with atomic_file(report_dir / "tables" / f"merge_{model}.html") as f:
                f.write(grid_html(header, rows))
            lines += [f"### {model}", "", markdown_grid(header, rows), ""]
    lines += significance_section(metrics, report_dir)
    if paper_dir is not None:
        lines += paper_section(Path(paper_dir), metrics, report_dir)
    if results_dir is not None:
        lines += cost_section(Path(results_dir), metrics, report_dir)
    lines += ["## Tasks", ""]
    for task in dict.fromkeys(metrics.sort_values(["model", "task"])["task"]):
        if task.startswith("lm-eval:"):
            lines.append(f"- **{task}**: lm-evaluation-harness's own task, run by name (evaluate.harness_tasks)")
            continue
        spec = get_task(task)
        lines.append(f"- **{task}** ({spec.arch}, {spec.kind}; headline `{spec.primary}`): {spec.description}")
    lines += ["", f"Generated from `results/{experiment}/metrics.csv` ({len(metrics)} metric rows)."]
    with atomic_file(report_dir / "README.md") as f:
        f.write("\n".join(lines) + "\n")
