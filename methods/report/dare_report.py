"""Score-vs-drop-rate report: a Markdown table (rows = method x rate, columns = tasks) and a plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from methods.io.checkpoint import atomic_file  # noqa: E402
from methods.tasks import get_task  # noqa: E402

SEED_AXES = ["seed", "mask_seed"]


def primary_scores(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of each task's headline metric over seeds."""
    primary = metrics[metrics["is_primary"]]
    keys = ["model", "task", "metric", "finetune", "prune", "drop_rate"]
    return (primary.groupby(keys, sort=True)["value"].agg(["mean", "std", "count"]).reset_index())


def _cell(row) -> str:
    if row["count"] > 1:
        return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
    return f"{100 * row['mean']:.1f}"


def markdown_table(scores: pd.DataFrame) -> str:
    scores = scores.assign(column=scores["task"] + " (" + scores["metric"] + ")",
                           variant=scores["finetune"] + " → " + scores["prune"],
                           cell=scores.apply(_cell, axis=1))
    table = scores.pivot_table(index=["variant", "drop_rate"], columns="column", values="cell", aggfunc="first")
    order = list(dict.fromkeys(scores.sort_values(["model", "task"])["column"]))  # tasks grouped by model
    table = table.sort_index()[order]
    header = ["method", "drop rate"] + list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (variant, rate), row in table.iterrows():
        lines.append("| " + " | ".join([variant, f"{rate:g}"] + [row[c] if isinstance(row[c], str) else "–"
                                                               for c in table.columns]) + " |")
    return "\n".join(lines)


def plot_scores(scores: pd.DataFrame, path: Path) -> None:
    tasks = list(dict.fromkeys(scores["task"]))
    rates = sorted(scores["drop_rate"].unique())
    position = {rate: i for i, rate in enumerate(rates)}
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        part = scores[scores["task"] == task]
        for (ft, prune), line in part.groupby(["finetune", "prune"]):
            line = line.sort_values("drop_rate")
            x = [position[r] for r in line["drop_rate"]]
            ax.errorbar(x, 100 * line["mean"], yerr=100 * line["std"].fillna(0), marker="o", capsize=3,
                        label=f"{ft} → {prune}")
        ax.set_title(f"{task}", fontsize=10)
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


def write_report(metrics: pd.DataFrame, experiment: str, table_path: Path, plot_path: Path) -> None:
    scores = primary_scores(metrics)
    plot_scores(scores, plot_path)
    tasks = list(dict.fromkeys(scores["task"]))
    seeds = {axis: sorted(metrics[axis].unique().tolist()) for axis in SEED_AXES}
    lines = [
        f"# Experiment `{experiment}`: delta-parameter pruning",
        "",
        f"Headline metric of each task on the `{metrics['split'].iloc[0]}` split, ×100; "
        f"mean ± standard deviation over fine-tuning seeds {seeds['seed']} and mask seeds {seeds['mask_seed']} "
        "where there is more than one run. Drop rate 0 is the fine-tuned model itself.",
        "",
        markdown_table(scores),
        "",
        f"![score vs drop rate]({plot_path.name})",
        "",
        "## Tasks",
        "",
    ]
    for task in tasks:
        spec = get_task(task)
        lines.append(f"- **{task}** ({spec.arch}, {spec.kind}; headline `{spec.primary}`): {spec.description}")
    lines += ["", f"Generated from `results/{experiment}/metrics.csv` ({len(metrics)} metric rows)."]
    with atomic_file(table_path) as f:
        f.write("\n".join(lines) + "\n")
