"""End to end: config/test.yaml through the whole DAG in a temporary directory."""

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, run_snakemake
from methods.io.checkpoint import load_state_dict, read_json

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    config = str(REPO / "config" / "test.yaml")
    result = run_snakemake(workdir, "--configfile", config, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config


def test_report_files_and_metric_rows(finished_run):
    workdir, _ = finished_run
    report = (workdir / "report" / "test" / "README.md").read_text()
    assert "| method | drop rate |" in report and "| adamw → dare | 0.9 |" in report
    assert (workdir / "report" / "test" / "score_vs_drop_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = pd.read_csv(workdir / "results" / "test" / "metrics.csv")
    config = yaml.safe_load(open(REPO / "config" / "test.yaml"))
    rates = config["prune"][0]["drop_rates"]
    # tiny-bert: sentiment (accuracy) + rating (pearson, spearman, mean); tiny-llama: review (acc)
    assert len(metrics) == (1 + 3 + 1) * len(rates)
    assert set(metrics["drop_rate"]) == set(rates)
    primary = metrics[metrics["is_primary"]]
    assert sorted(primary["task"].unique()) == ["zoo-rating", "zoo-review", "zoo-sentiment"]
    assert metrics["value"].between(-1, 1).all()


def test_second_invocation_schedules_no_job(finished_run):
    workdir, config = finished_run
    result = run_snakemake(workdir, "--configfile", config, "--cores", "2", "-n")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_rate_zero_variant_equals_the_fine_tuned_model(finished_run):
    workdir, _ = finished_run
    ft_dir = workdir / "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0"
    finetuned = load_state_dict(ft_dir / "checkpoint")
    unpruned = load_state_dict(ft_dir / "prune~dare_rate~0_mseed~0/checkpoint")
    assert finetuned.keys() == unpruned.keys()
    assert all(torch.equal(finetuned[k], unpruned[k]) for k in finetuned)


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
