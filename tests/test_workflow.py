"""End to end: config/test.yaml through the whole DAG in a temporary directory."""

import pandas as pd
import pytest
import yaml

from conftest import REPO, run_snakemake
from methods.io.checkpoint import read_json

pytestmark = pytest.mark.workflow


def test_report_files_and_metric_rows(finished_run):
    workdir, _ = finished_run
    report = (workdir / "report" / "test" / "README.md").read_text()
    assert "| method | drop rate |" in report and "| adamw → dare | 0.9 |" in report
    assert (workdir / "report" / "test" / "score_vs_drop_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = pd.read_csv(workdir / "results" / "test" / "metrics.csv")
    config = yaml.safe_load(open(REPO / "config" / "test.yaml"))
    rates = config["prune"][0]["drop_rates"]
    # tiny-bert: sentiment (accuracy) + rating (pearson, spearman, mean); tiny-llama: review (acc) and
    # its perplexity on the held-out text
    per_variant = 1 + 3 + 1 + 1
    prune = metrics[metrics["stage"] == "prune"]
    rates = [r for r in rates if r > 0]  # rate 0 is the fine-tuned model (stage "finetune")
    dare = prune[prune["variant"] == "dare"]
    assert len(dare) == per_variant * len(rates)
    assert set(dare["drop_rate"]) == set(rates)
    # the other variants prune only the tasks they name (zoo-sentiment: one metric)
    others = prune[prune["variant"] != "dare"]
    assert set(others["variant"]) == {"darex-q", "importance"} and set(others["task"]) == {"zoo-sentiment"}
    assert len(others) == 2
    assert len(metrics[metrics["stage"] == "finetune"]) == per_variant
    perplexity = metrics[metrics["metric"] == "perplexity"]
    assert set(perplexity["model"]) == {"tiny-llama"} and (perplexity["value"] > 1).all()
    assert "### Decoder perplexity on held-out text" in report
    # merges: only tiny-bert has two tasks; each variant is scored on both with the task's own head
    merged = metrics[metrics["stage"] == "merge"]
    assert set(merged["model"]) == {"tiny-bert"}
    assert set(merged["variant"]) == {v["method"] for v in config["merge"]["methods"]}
    assert len(merged) == (1 + 3) * len(config["merge"]["methods"])
    assert (merged["selected_on"] == "validation").all()
    assert metrics[metrics["metric"] != "perplexity"]["value"].between(-1, 1).all()
    assert "## Merging" in report and "| fine-tuned, one model per task |" in report


def test_second_invocation_schedules_no_job(finished_run):
    workdir, config = finished_run
    result = run_snakemake(workdir, "--configfile", config, "--cores", "2", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_rate_zero_is_the_fine_tuned_model_without_a_pruning_job(finished_run):
    workdir, _ = finished_run
    ft_dir = workdir / "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0"
    assert not (ft_dir / "prune~dare_rate~0_mseed~0").exists()
    metrics = pd.read_csv(workdir / "results" / "test" / "metrics.csv")
    finetuned = metrics[(metrics["stage"] == "finetune") & (metrics["task"] == "zoo-sentiment")]["value"].item()
    report = (workdir / "report" / "test" / "README.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| adamw → dare | 0 |"))
    assert f"{100 * finetuned:.1f}" in row


def test_manifests_record_provenance(finished_run):
    workdir, _ = finished_run
    variant = workdir / "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0/prune~dare_rate~0.9_mseed~0"
    manifest = read_json(variant / "checkpoint" / "manifest.json")
    assert manifest["method"] == "dare" and manifest["params"]["drop_rate"] == 0.9
    assert manifest["seeds"] == {"mask": 0}
    assert set(manifest["parents"]) == {"base", "finetuned"}
    assert manifest["tensors"]["classifier.weight"]["pruned"] is False
    kept = [s["kept_fraction"] for s in manifest["tensors"].values() if s["pruned"]]
    assert 0.05 < sum(kept) / len(kept) < 0.15


def test_merge_selection_uses_validation_and_records_the_grid(finished_run):
    workdir, _ = finished_run
    selection = read_json(workdir / "results/test/tiny-bert/merged/ft~adamw/seed~0/merge~task-arithmetic_mseed~0"
                          / "checkpoint" / "selection.json")
    assert selection["selected_on"] == "validation"
    scores = [t["validation_score"] for t in selection["trials"]]
    assert [t["params"]["scale"] for t in selection["trials"]] == [0.5, 1.0]
    assert selection["params"] == selection["trials"][scores.index(max(scores))]["params"]
    assert set(selection["reference_scores"]) == {"zoo-sentiment", "zoo-rating"}


def test_data_driven_pruning_records_what_it_chose(finished_run):
    workdir, _ = finished_run
    ft_dir = workdir / "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0"
    darex = read_json(ft_dir / "prune~darex-q_rate~0.9_mseed~0" / "checkpoint" / "manifest.json")
    fitted = darex["fitted"]
    assert fitted["q_rule"] == "validation" and 0.1 - 1e-9 <= fitted["q"] <= 1.0
    assert "0.1" in fitted["scan"]  # DARE's q = 1 - p is the scan's first point
    importance = read_json(ft_dir / "prune~importance_rate~0.9_mseed~0" / "checkpoint" / "manifest.json")
    assert importance["fitted"]["calibrated_linears"] > 0 and "norms" not in importance["params"]


def test_delta_diagnostics_and_recommendation_in_the_report(finished_run):
    workdir, _ = finished_run
    diagnostics = workdir / "results/test/tiny-llama/zoo-review/ft~adamw/seed~0/diagnostics"
    layers = pd.read_csv(diagnostics / "layers.csv")
    assert layers["layer"].iloc[-1] == "model" and (layers["max_abs"] > 0).all()
    recommendation = read_json(diagnostics / "recommendation.json")
    assert {r["situation"] for r in recommendation["recommendations"]} == {"post hoc", "fine-tuning under our control"}
    report = (workdir / "report" / "test" / "README.md").read_text()
    assert "## Delta diagnostics" in report and "| tiny-llama | zoo-review |" in report


def test_quantized_variants_record_measured_storage(finished_run):
    workdir, _ = finished_run
    metrics = pd.read_csv(workdir / "results" / "test" / "metrics.csv")
    quantized = metrics[metrics["stage"] == "quantize"]
    # rtn at 2 and 4 bits on both tasks, gptq at 4 bits and the DARE-delta rtn on zoo-sentiment
    assert set(zip(quantized["variant"], quantized["bits"])) == {("rtn", 2), ("rtn", 4), ("gptq", 4),
                                                               ("dare-rtn-delta", 4)}
    for bits, bpp in zip(quantized["bits"], quantized["bpp"]):
        # codes at b bits plus a float16 scale (and a b-bit zero) per row of 32 or 64 inputs
        assert bits < bpp < bits + (16 + bits) / 32 + 1e-9
    assert (quantized["model_bpp"] > quantized["bpp"]).all()  # embeddings and heads stay float32
    # gptq runs on two calibration samples; the data-free rtn has the one default seed
    assert sorted(quantized[quantized["variant"] == "gptq"]["calibration_seed"]) == [0, 1]
    assert set(quantized[quantized["variant"] == "rtn"]["calibration_seed"]) == {0}
    composed = quantized[quantized["variant"] == "dare-rtn-delta"]
    assert (composed["drop_rate"] == 0.9).all()
    artifact = (workdir / "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0/quant~dare-rtn-delta_bits~4_cseed~0"
                / "artifact")
    from methods.quantize.artifact import load_artifact

    records, _, metadata = load_artifact(artifact)
    assert metadata["params"]["target"] == "delta"
    # the pruned delta's zeros survive Grid S quantization exactly
    zero_fraction = sum(int((r.dequantize() == 0).sum()) for r in records.values()) / sum(
        r.codes.numel() for r in records.values())
    assert zero_fraction > 0.85


def test_report_has_index_tables_and_plots(finished_run):
    workdir, _ = finished_run
    report_dir = workdir / "report" / "test"
    page = (report_dir / "README.md").read_text()
    for section in ("## Weight quantization", "## Is the difference real?", "## Reported vs reproduced", "## Cost"):
        assert section in page
    for plot in ("score_vs_drop_rate", "score_vs_bits", "pareto", "delta_diagnostics"):
        assert (report_dir / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report_dir / f"{plot}.pdf").read_bytes()[:5] == b"%PDF-"
    for table in ("prune", "quantize_tiny-bert", "merge_tiny-bert", "significance", "cost", "paper_numbers",
                  "storage"):
        assert "\\toprule" in (report_dir / "tables" / f"{table}.tex").read_text()
        assert "<table" in (report_dir / "tables" / f"{table}.html").read_text()
    index = (report_dir / "index.md").read_text()
    assert "[Report: tables and plots](README.md)" in index and "pareto: [PDF](pareto.pdf)" in index
    assert "experiment: test" in index


def test_pruned_and_merged_variants_are_stored_as_deltas(finished_run):
    """variant_storage: delta (the default): a pruned variant is a delta checkpoint equal bit for bit
    to the in-memory pruning, at most a quarter of a full copy at p = 0.9; merges too; the report
    puts every stored variant on one Pareto plot."""
    import torch

    from methods.io.checkpoint import align_names, load_state_dict
    from methods.io.delta_artifact import is_delta_checkpoint, materialize_delta, storage_summary
    from methods.merge.apply import load_merged
    from methods.prune.apply import exclusion, prune_state_dict

    workdir, _ = finished_run
    ft_dir = workdir / "results/test/tiny-llama/zoo-review/ft~adamw/seed~0"
    variant = ft_dir / "prune~dare_rate~0.9_mseed~0" / "checkpoint"
    assert is_delta_checkpoint(variant) and not (variant / "model.safetensors").exists()
    finetuned = load_state_dict(ft_dir / "checkpoint")
    base = align_names(load_state_dict(workdir / "results/test/tiny-llama/pretrained"), finetuned, "test")
    expected, _ = prune_state_dict(base, finetuned, "dare", {"drop_rate": 0.9, "rescale": True}, 0,
                                   exclusion({}, "decoder"))
    rebuilt = materialize_delta(variant, base=base)
    assert set(rebuilt) == set(expected)
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
    assert storage_summary(variant)["size_ratio"] <= 0.25
    merge = next((workdir / "results/test/tiny-bert").rglob("merge~dare-ties*/checkpoint"))
    assert is_delta_checkpoint(merge) and load_merged(merge)
    metrics = pd.read_csv(workdir / "results" / "test" / "metrics.csv")
    stored = metrics[metrics["stage"].isin(["prune", "merge"])]
    assert (stored["model_bpp"] > 0).all() and (stored[stored["drop_rate"] == 0.9]["model_bpp"] < 8.1).all()
    page = (workdir / "report" / "test" / "README.md").read_text()
    assert "## Storage: every variant and the Pareto front" in page
    assert "\\toprule" in (workdir / "report" / "test" / "tables" / "storage.tex").read_text()
