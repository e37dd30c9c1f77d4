"""Job costs from Snakemake benchmark files and job manifests (methods/report/cost.py), on a
results tree laid out like the workflow's."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from methods.report.cost import (COLUMNS, CostRecordError, collect_costs, cost_per_variant, parse_job_path,
                                 read_benchmark)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
FT = "tiny-bert/zoo-sentiment/ft~adamw/seed~0"
PRUNE = FT + "/prune~dare_rate~0.9_mseed~1"
QUANT = FT + "/quant~rtn_bits~4_cseed~0"
MERGE = "tiny-bert/merged/ft~adamw/seed~0/merge~ties_mseed~0"


def benchmark(root: Path, relative: str, *rows: tuple) -> None:
    """rows: (seconds, max_rss, cpu_time), numbers or "NA"."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{s}\t0:00:{int(float(s)) if s != 'NA' else 0:02d}\t{rss}\t900.0\t300.0\t310.0\t0.1\t0.1\t50.0\t{cpu}\n"
             for s, rss, cpu in rows]
    path.write_text(HEADER + "".join(lines))


def manifest(root: Path, relative: str, **record) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"method": "x", "params": {}, "parents": {"base": {"path": "elsewhere"}}, **record}))


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results" / "exp"
    benchmark(root, "benchmarks/pretrain/tiny-bert.tsv", (3.5, 400.0, 3.8))
    manifest(root, "tiny-bert/pretrained/manifest.json", stage="pretrain", wall_time_s=0.2, peak_rss_mb=390.0)
    # fine-tuning came from the between-workflow cache: a manifest, no benchmark
    manifest(root, f"{FT}/checkpoint/manifest.json", stage="finetune", wall_time_s=11.0, peak_rss_mb=410.0,
             peak_gpu_mb=812.5)
    benchmark(root, f"{FT}/evaluate.benchmark.tsv", (5.0, 500.0, 4.0))
    benchmark(root, f"{PRUNE}/prune.benchmark.tsv", (8.0, "NA", "NA"))          # ended before the first sample
    manifest(root, f"{PRUNE}/checkpoint/manifest.json", stage="prune", wall_time_s=1.5, peak_rss_mb=370.0)
    benchmark(root, f"{PRUNE}/evaluate.benchmark.tsv", (12.0, 520.0, 5.0))
    benchmark(root, f"{QUANT}/quantize.benchmark.tsv", (4.0, 490.0, 3.0), (6.0, 495.0, 5.0))   # repeat: 2 rows
    benchmark(root, f"{QUANT}/evaluate.benchmark.tsv", (5.0, 501.0, 4.5))
    benchmark(root, f"{MERGE}/merge.benchmark.tsv", (9.0, 502.0, 4.9))
    manifest(root, f"{MERGE}/checkpoint/manifest.json", stage="merge", wall_time_s=1.0, peak_rss_mb=480.0)
    benchmark(root, f"{MERGE}/eval~zoo-rating/evaluate.benchmark.tsv", (11.0, 500.7, 5.3))
    benchmark(root, f"{MERGE}/eval~zoo-sentiment/evaluate.benchmark.tsv", (12.0, 500.2, 5.2))
    # neither benchmarks nor job manifests: logs, metrics, a quantized artifact's metadata
    (root / f"{QUANT}/quantize.log").write_text("log\n")
    (root / f"{QUANT}/artifact").mkdir()
    (root / f"{QUANT}/artifact/artifact.json").write_text("{}")
    return root


def test_one_row_per_job_with_wildcards_as_columns(results):
    costs = collect_costs(results)
    assert list(costs.columns) == COLUMNS and len(costs) == 10
    assert costs["path"].tolist() == sorted(costs["path"])
    by_path = costs.set_index("path")
    prune = by_path.loc[f"{PRUNE}/prune.benchmark.tsv"]
    assert (prune["stage"], prune["variant_stage"], prune["model"], prune["task"], prune["finetune"]) == \
        ("prune", "prune", "tiny-bert", "zoo-sentiment", "adamw")
    assert (prune["seed"], prune["variant"], prune["drop_rate"], prune["mask_seed"]) == (0, "dare", 0.9, 1.0)
    assert math.isnan(prune["bits"]) and prune["instance"] == PRUNE
    quant_eval = by_path.loc[f"{QUANT}/evaluate.benchmark.tsv"]
    assert (quant_eval["stage"], quant_eval["variant_stage"], quant_eval["variant"], quant_eval["bits"]) == \
        ("evaluate", "quantize", "rtn", 4.0)
    merge_eval = by_path.loc[f"{MERGE}/eval~zoo-rating/evaluate.benchmark.tsv"]
    assert (merge_eval["variant_stage"], merge_eval["task"], merge_eval["variant"], merge_eval["instance"]) == \
        ("merge", "zoo-rating", "ties", MERGE)
    merge = by_path.loc[f"{MERGE}/merge.benchmark.tsv"]
    assert math.isnan(merge["task"]) and merge["mask_seed"] == 0.0
    ft_eval = by_path.loc[f"{FT}/evaluate.benchmark.tsv"]
    assert (ft_eval["variant_stage"], ft_eval["variant"], ft_eval["instance"]) == ("finetune", "adamw", FT)
    assert str(costs["seed"].dtype) == "Int64" and pd.isna(by_path.loc["benchmarks/pretrain/tiny-bert.tsv", "seed"])


def test_benchmark_and_manifest_are_merged_per_job(results):
    by_path = collect_costs(results).set_index("path")
    pretrain = by_path.loc["benchmarks/pretrain/tiny-bert.tsv"]
    # the benchmark covers the whole job (start-up included): its numbers win over the manifest's
    assert (pretrain["stage"], pretrain["source"], pretrain["seconds"], pretrain["max_rss_mb"]) == \
        ("pretrain", "benchmark+manifest", 3.5, 400.0)
    assert pretrain["manifest"] == "tiny-bert/pretrained/manifest.json"
    assert pretrain["instance"] == "tiny-bert/pretrained"
    # cached fine-tuning: only its manifest, with the GPU peak it recorded
    finetune = by_path.loc[f"{FT}/checkpoint/manifest.json"]
    assert (finetune["stage"], finetune["source"], finetune["seconds"], finetune["max_rss_mb"],
            finetune["peak_gpu_mb"]) == ("finetune", "manifest", 11.0, 410.0, 812.5)
    assert math.isnan(finetune["cpu_seconds"]) and finetune["instance"] == FT
    # a benchmark without memory samples (NA) borrows the manifest's peak; its time stays the benchmark's
    prune = by_path.loc[f"{PRUNE}/prune.benchmark.tsv"]
    assert (prune["source"], prune["seconds"], prune["max_rss_mb"]) == ("benchmark+manifest", 8.0, 370.0)
    assert math.isnan(prune["cpu_seconds"])
    # repeat(): mean time, largest memory
    quantize = by_path.loc[f"{QUANT}/quantize.benchmark.tsv"]
    assert (quantize["seconds"], quantize["max_rss_mb"], quantize["cpu_seconds"]) == (5.0, 495.0, 4.0)
    assert quantize["source"] == "benchmark" and math.isnan(quantize["peak_gpu_mb"])


def test_cost_per_variant_sums_producing_and_evaluating(results):
    table = cost_per_variant(collect_costs(results)).set_index(["stage", "variant"])
    merge = table.loc[("merge", "ties")]
    assert (merge["instances"], merge["jobs"]) == (1, 3)
    assert (merge["produce_seconds"], merge["evaluate_seconds"], merge["total_seconds"]) == (9.0, 23.0, 32.0)
    assert merge["seconds_per_instance"] == 32.0 and merge["max_rss_mb"] == 502.0
    assert merge["cpu_seconds"] == pytest.approx(4.9 + 5.3 + 5.2)
    finetune = table.loc[("finetune", "adamw")]
    assert (finetune["produce_seconds"], finetune["evaluate_seconds"], finetune["peak_gpu_mb"]) == (11.0, 5.0, 812.5)
    quantize = table.loc[("quantize", "rtn")]
    assert (quantize["produce_seconds"], quantize["evaluate_seconds"], quantize["instances"]) == (5.0, 5.0, 1)
    pretrain = cost_per_variant(collect_costs(results)).query("stage == 'pretrain'")
    assert pretrain["produce_seconds"].tolist() == [3.5] and pretrain["evaluate_seconds"].isna().all()


def test_cost_per_variant_counts_instances_and_missing_times(results):
    costs = collect_costs(results)
    second = costs[costs["variant_stage"] == "prune"].assign(
        instance=lambda f: f["instance"].str.replace("mseed~1", "mseed~2"), mask_seed=2.0,
        seconds=[float("nan"), 10.0])
    table = cost_per_variant(pd.concat([costs, second]), by=["mask_seed"]).set_index(["stage", "variant", "mask_seed"])
    assert table.loc[("prune", "dare", 2.0), "jobs_without_time"] == 1
    assert table.loc[("prune", "dare", 2.0), "total_seconds"] == 10.0
    overall = cost_per_variant(pd.concat([costs, second])).set_index(["stage", "variant"]).loc[("prune", "dare")]
    assert (overall["instances"], overall["jobs"], overall["total_seconds"]) == (2, 4, 8.0 + 12.0 + 10.0)
    assert overall["seconds_per_instance"] == 15.0
    with pytest.raises(KeyError, match="variant_stage"):
        cost_per_variant(costs.drop(columns=["variant_stage"]))


def test_path_patterns():
    assert parse_job_path("benchmarks/pretrain/m.tsv")["instance"] == "m/pretrained"
    other = parse_job_path("benchmarks/zoo_corpus/all.tsv")
    assert (other["stage"], other["instance"]) == ("zoo_corpus", "benchmarks/zoo_corpus/all")
    rate = parse_job_path("m/t/ft~lora/seed~3/prune~darex-q_rate~1e-05_mseed~0/prune.benchmark.tsv")
    assert (rate["drop_rate"], rate["finetune"], rate["seed"], rate["variant"]) == (1e-05, "lora", 3, "darex-q")
    diagnostics = parse_job_path("m/t/ft~adamw/seed~0/diagnostics.benchmark.tsv")
    assert (diagnostics["stage"], diagnostics["variant_stage"]) == ("diagnostics", "finetune")


@pytest.mark.parametrize("content, message", [
    ("s\tmax_rss\n1.0\t2.0\n", r"missing column\(s\) \['cpu_time'\]"),
    (HEADER, "no benchmark row"),
    (HEADER + "1.0\t0:00:01\tlots\t1\t1\t1\t0\t0\t1\t1\n", r"line 2: column 'max_rss' = 'lots' is not a number"),
    ("", "not a Snakemake benchmark TSV"),
])
def test_unreadable_benchmarks_are_named(tmp_path, content, message):
    root = tmp_path / "exp"
    path = root / FT / "evaluate.benchmark.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(CostRecordError, match=message) as error:
        collect_costs(root)
    assert str(path) in str(error.value)


def test_unreadable_manifests_are_named(tmp_path):
    root = tmp_path / "exp"
    manifest(root, f"{FT}/checkpoint/manifest.json", stage="finetune", wall_time_s="eleven")
    with pytest.raises(CostRecordError, match=r"manifest.json: wall_time_s = 'eleven' is not a number"):
        collect_costs(root)
    (root / f"{FT}/checkpoint/manifest.json").write_text("{truncated")
    with pytest.raises(CostRecordError, match="not a readable manifest"):
        collect_costs(root)
    with pytest.raises(FileNotFoundError, match="no such results directory"):
        collect_costs(tmp_path / "nothing")


def test_a_real_benchmark_file_of_the_test_experiment():
    files = sorted((REPO / "results" / "test").rglob("*.benchmark.tsv"))
    if not files:
        pytest.skip("results/test has not been run here")
    record = read_benchmark(files[0])
    assert record["seconds"] > 0 and record["max_rss_mb"] > 0 and record["cpu_seconds"] >= 0
