"""Execution profiles (README "Profiles"): resources that grow with the attempt, the GPU switch, the
SLURM profile's site block, and the between-workflow cache shared by two experiments."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_snakemake
from methods.io.checkpoint import read_json

FT = "tiny-bert/zoo-sentiment/ft~adamw/seed~0"


def planned_resources(workdir, *args) -> dict[str, dict[str, str]]:
    """The resources a dry run of config/test.yaml shows, per rule (first job of each rule; a dry run
    indents the jobs of a group)."""
    result = run_snakemake(workdir, "-n", "-F", "--configfile", str(REPO / "config" / "test.yaml"), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    found = {}
    for rule, line in re.findall(r"^ *(?:local)?rule (\w+):\n(?: +.*\n)*? +resources: (.*)$", result.stdout, re.M):
        found.setdefault(rule, dict(item.split("=", 1) for item in line.split(", ")))
    return found


RULES = ("pretrain", "finetune", "prune", "merge", "evaluate", "evaluate_finetuned", "evaluate_merge",
         "delta_diagnostics", "zoo_corpus", "zoo_heldout_text", "task_data", "aggregate", "report")


def test_resources_grow_with_the_attempt_and_gpus_follow_the_run(tmp_path):
    first = planned_resources(tmp_path, "--cores", "2")
    for rule in RULES:
        assert {"mem_mb", "runtime", "cpus_per_task", "gpu"} <= set(first[rule]), rule
        assert first[rule]["gpu"] == "0", rule  # no --resources gpu=N: CPU only
    assert first["finetune"]["mem_mb"] == "4000" and first["finetune"]["runtime"] == "120"
    assert first["finetune"]["cpus_per_task"] == "2" and first["evaluate"]["cpus_per_task"] == "1"
    retry = planned_resources(tmp_path, "--cores", "2", "--attempt", "3", "--resources", "gpu=2")
    assert retry["finetune"]["mem_mb"] == "12000" and retry["finetune"]["runtime"] == "360"
    assert retry["evaluate"]["mem_mb"] == "6000" and retry["evaluate"]["runtime"] == "90"
    assert retry["finetune"]["gpu"] == retry["evaluate"]["gpu"] == "1"
    assert retry["zoo_corpus"]["gpu"] == retry["aggregate"]["gpu"] == "0"


def test_profiles_keep_site_settings_in_one_block():
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert set(slurm["default-resources"]) == {"slurm_partition", "slurm_account"}  # + constraint, commented
    assert "constraint" in (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    assert slurm["group-components"] == {"evaluation": 16} and slurm["retries"] >= 1
    assert slurm["slurm-logdir"] == "results/slurm-logs" and slurm["slurm-keep-successful-logs"]
    workstation = yaml.safe_load((REPO / "profiles" / "workstation" / "config.yaml").read_text())
    for profile in (slurm, workstation):
        assert profile["cache"] == []  # --cache without rule names (workflow/rules/common.smk)
    evaluate = (REPO / "workflow" / "rules" / "evaluate.smk").read_text()
    assert evaluate.count('group:\n        "evaluation"') == 3


def _experiment(tmp_path, name: str, prune: list) -> str:
    """A one-task experiment from config/test.yaml; experiments differ in name and pruning only."""
    base = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    config = {"experiment": name, "zoo": base["zoo"], "finetune": base["finetune"], "prune": prune,
              "models": {"tiny-bert": {**base["models"]["tiny-bert"], "tasks": ["zoo-sentiment"]}},
              "evaluate": {"split": "test", "batch_size": 32}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.workflow
def test_two_experiments_share_one_fine_tune(tmp_path):
    workdir = tmp_path / "work"
    first = _experiment(tmp_path, "first", [{"method": "dare", "drop_rates": [0.9]}])
    second = _experiment(tmp_path, "second", [{"method": "magnitude", "drop_rates": [0.5]}])
    profile = ("--workflow-profile", str(REPO / "profiles" / "workstation"), "--cores", "2")
    # the first experiment also runs as on a 2-GPU workstation (devices 0 and 1; torch here is a CPU
    # build and the methods never move tensors, so nothing touches a GPU): GPU jobs take slots
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                             str(workdir), f"results/first/{FT}/metrics.json", *profile, "--resources", "gpu=2",
                             "--configfile", first], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = workdir / "results" / "first"
    for log in ("logs/pretrain/tiny-bert.log", f"{FT}/finetune.log", f"{FT}/evaluate.log"):
        assert re.search(r"GPU\(s\) [01] \(CUDA_VISIBLE_DEVICES\)", (logs / log).read_text()), log
    assert "GPU(s)" not in (logs / "logs" / "zoo_corpus.log").read_text()  # a CPU job holds no slot
    assert (workdir / ".snakemake" / "gpu_slots" / "gpu-0.lock").is_file()
    result = run_snakemake(workdir, f"results/second/{FT}/metrics.json",
                           f"results/second/{FT}/prune~magnitude_rate~0.5_mseed~0/metrics.json",
                           *profile, "--configfile", second)
    assert result.returncode == 0, result.stderr[-4000:]
    cache = workdir / "results" / ".cache"
    entries = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(entries) == 2  # one pre-training, one fine-tuning: computed once, by the first experiment
    for log in (f"logs/pretrain/tiny-bert.log", f"{FT}/finetune.log"):
        assert "between-workflow cache: stored entry" in (workdir / "results" / "first" / log).read_text()
        second_log = (workdir / "results" / "second" / log).read_text()
        assert "between-workflow cache: reused entry" in second_log
        assert "pre-trained" not in second_log and "fine-tuned" not in second_log  # no training ran
    # the second experiment's checkpoint is the first one's files (hard links into the entry)
    weights = [workdir / "results" / name / FT / "checkpoint" / "model.safetensors" for name in ("first", "second")]
    assert os.stat(weights[0]).st_ino == os.stat(weights[1]).st_ino
    assert read_json(weights[1].parent / "manifest.json")["weights_sha256"]
    scores = [read_json(workdir / "results" / name / FT / "metrics.json") for name in ("first", "second")]
    assert scores[0]["metrics"] == scores[1]["metrics"]
    assert scores[0]["checkpoint_sha256"] == scores[1]["checkpoint_sha256"]
    # nothing is left to do in either experiment
    for config, target in ((first, f"results/first/{FT}/metrics.json"), (second, f"results/second/{FT}/metrics.json")):
        dry = run_snakemake(workdir, target, *profile, "--configfile", config, "-n")
        assert "Nothing to be done" in dry.stdout + dry.stderr


def test_cache_key_follows_content_not_paths(tmp_path):
    from methods.io.store import digest, entry_key

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
        (d / ".snakemake_timestamp").write_text("")
    (a / "manifest.json").write_text('{"wall_time_s": 1}')
    (b / "manifest.json").write_text('{"wall_time_s": 2}')
    assert digest(a) == digest(b)  # same weights, different provenance and paths
    key = entry_key("finetune", {"seed": 0}, {"base": a}, code="c")
    assert key == entry_key("finetune", {"seed": 0}, {"base": b}, code="c")
    assert key != entry_key("finetune", {"seed": 1}, {"base": b}, code="c")
    assert key != entry_key("finetune", {"seed": 0}, {"base": b}, code="other code")
    (b / "model.safetensors").write_bytes(b"other weights")
    assert key != entry_key("finetune", {"seed": 0}, {"base": b}, code="c")
    assert entry_key("finetune", {}, {"base": "org/model"}, code="c") != entry_key(
        "finetune", {}, {"base": "org/other"}, code="c")  # a hub id is keyed by its value
