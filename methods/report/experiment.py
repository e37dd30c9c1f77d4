"""An experiment's report from its tidy metrics table: one Markdown page with a section per stage
(delta pruning: method x rate by task, and its plot; merging: method by task with average and
normalized average) and the task descriptions."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from methods.evaluate.multitask import normalized  # noqa: E402
from methods.io.checkpoint import atomic_file  # noqa: E402
from methods.tasks import get_task  # noqa: E402

SEED_AXES = ["seed", "mask_seed"]


def primary_scores(metrics: pd.DataFrame, keys: list[str], metric: str | None = None) -> pd.DataFrame:
    """Mean, standard deviation and count of each task's headline metric (or of ``metric``) over seeds."""
    primary = metrics[metrics["is_primary"] if metric is None else metrics["metric"] == metric]
    keys = ["model", "task", "metric", "finetune"] + keys
    return primary.groupby(keys, sort=True, dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()


def _cell(mean: float, std: float, count: int, scale: float = 100.0, digits: int = 1) -> str:
    if count > 1 and pd.notna(std):
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _task_column(frame: pd.DataFrame) -> pd.Series:
    return frame["task"] + " (" + frame["metric"] + ")"


# -- delta pruning ------------------------------------------------------------------------------
def prune_table(scores: pd.DataFrame, scale: float = 100.0, digits: int = 1) -> str:
    cells = [_cell(m, s, c, scale, digits) for m, s, c in zip(scores["mean"], scores["std"], scores["count"])]
    scores = scores.assign(column=_task_column(scores), method=scores["finetune"] + " → " + scores["variant"],
                           cell=cells)
    order = list(dict.fromkeys(scores.sort_values(["model", "task"])["column"]))  # tasks grouped by model
    table = scores.pivot_table(index=["method", "drop_rate"], columns="column", values="cell", aggfunc="first")
    table = table.sort_index()[order]
    rows = [[method, f"{rate:g}"] + [row[c] if isinstance(row[c], str) else "–" for c in order]
            for (method, rate), row in table.iterrows()]
    return _markdown(["method", "drop rate"] + order, rows)


def plot_prune(scores: pd.DataFrame, path: Path) -> None:
    tasks = list(dict.fromkeys(scores.sort_values(["model", "task"])["task"]))
    rates = sorted(scores["drop_rate"].unique())
    position = {rate: i for i, rate in enumerate(rates)}
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        part = scores[scores["task"] == task]
        for (ft, variant), line in part.groupby(["finetune", "variant"]):
            line = line.sort_values("drop_rate")
            ax.errorbar([position[r] for r in line["drop_rate"]], 100 * line["mean"],
                        yerr=100 * line["std"].fillna(0), marker="o", capsize=3, label=f"{ft} → {variant}")
        ax.set_title(task, fontsize=10)
        ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
        ax.set_xlabel("drop rate p")
        ax.set_ylabel(f"{part['metric'].iloc[0]} (×100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle("Score vs delta drop rate", fontsize=12)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# -- merging ------------------------------------------------------------------------------------
def merge_table(metrics: pd.DataFrame, model: str) -> str:
    """Rows: the individually fine-tuned models, then each merge variant; columns: every task's
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
    return _markdown(header, rows)


def _params_text(params_json: str) -> str:
    params = json.loads(params_json)
    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        return "+".join(map(str, value)) if isinstance(value, list) else str(value)

    return ", ".join(f"{k}={text(v)}" for k, v in sorted(params.items())) or "–"


# -- the page -----------------------------------------------------------------------------------
def diagnostics_section(recommendation_files: list[str | Path]) -> list[str]:
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
    header = (["model", "task", "fine-tune", "max abs δ", "mean δ", "std δ", "NOD ‖δ‖", "DON", "DARE out std"]
              + [f"post hoc, p = {r:g}" for r in rates] + [f"controlling fine-tuning, p = {rates[-1]:g}"])
    return ["## Delta diagnostics", "",
            "Statistics of each fine-tuned model's delta over the tensors the papers prune (NOD = Σ‖δ‖ over "
            "tensors, DON = Σ(‖θ_ft‖ − ‖θ₀‖), after DONOD; *DARE out std* = the largest predicted standard "
            "deviation of a layer output under DARE at the highest drop rate, √(p/(1−p)·Σ_j c_ij²) with "
            "c = δ·x̄, the DAREx variance term), and the method the DAREx decision procedure recommends "
            "(`methods/prune/diagnostics.py: recommend`; the flowchart is reconstructed from the paper's text). "
            "Per-tensor and per-layer tables: `…/diagnostics/{tensors,layers}.csv` next to each fine-tuned model.",
            "", _markdown(header, rows), ""]


def write_report(metrics: pd.DataFrame, experiment: str, table_path: Path, plot_path: Path,
                 diagnostics: list[str | Path] = ()) -> None:
    split = metrics["split"].iloc[0]
    seeds = {axis: sorted(metrics[axis].dropna().astype(int).unique().tolist()) for axis in SEED_AXES}
    lines = [
        f"# Experiment `{experiment}`",
        "",
        f"Headline metric of each task on the `{split}` split, ×100; mean ± standard deviation over "
        f"fine-tuning seeds {seeds['seed']} and mask seeds {seeds['mask_seed']} where there is more than one run.",
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
    scores = primary_scores(pd.concat([prune, *unpruned]), ["variant", "drop_rate"])
    plot_prune(scores, plot_path)
    lines += [prune_table(scores), "", f"![score vs drop rate]({plot_path.name})", ""]
    with_text = pd.concat([prune, *unpruned])
    if (with_text["metric"] == "perplexity").any():
        lines += ["### Decoder perplexity on held-out text", "",
                  "Perplexity (lower is better) of each decoder variant on the configured text "
                  "(`evaluate.perplexity`), in the row of the task it was fine-tuned on.", "",
                  prune_table(primary_scores(with_text, ["variant", "drop_rate"], "perplexity"), scale=1.0, digits=2), ""]
    lines += diagnostics_section(list(diagnostics))
    merged = metrics[metrics["stage"] == "merge"]
    if len(merged):
        lines += ["## Merging", "",
                  "Each model's fine-tuned checkpoints (one per task) merged into one. Encoders merge the body and "
                  "keep each task's own head; decoders merge every tensor. Hyper-parameters were chosen on the "
                  f"`{merged['selected_on'].iloc[0]}` split (mean normalized score over the tasks), never on "
                  f"`{split}`. Normalized = merged score / the fine-tuned model's score on the same task, averaged "
                  "over tasks (the raw score where the fine-tuned score is ≤ 0).", ""]
        for model in sorted(merged["model"].unique()):
            lines += [f"### {model}", "", merge_table(metrics, model), ""]
    lines += ["## Tasks", ""]
    for task in dict.fromkeys(metrics.sort_values(["model", "task"])["task"]):
        if task.startswith("lm-eval:"):
            lines.append(f"- **{task}**: lm-evaluation-harness's own task, run by name (evaluate.harness_tasks)")
            continue
        spec = get_task(task)
        lines.append(f"- **{task}** ({spec.arch}, {spec.kind}; headline `{spec.primary}`): {spec.description}")
    lines += ["", f"Generated from `results/{experiment}/metrics.csv` ({len(metrics)} metric rows)."]
    with atomic_file(table_path) as f:
        f.write("\n".join(lines) + "\n")
