"""The report's index page (methods/report/provenance.py): links to what exists, the git state,
the configuration as a YAML block that loads back, seeds and versions."""

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from methods.report.provenance import (config_block, git_state, index_page, read_config_block, write_index)

VERSIONS = {"python": "3.11.7", "torch": "2.13.0"}
DATE = "2025-01-31"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def metrics() -> pd.DataFrame:
    return pd.DataFrame({"seed": [1, 0, 1, 2], "mask_seed": [np.nan, 3.0, 0.0, np.nan], "value": [0.1] * 4})


def report_dir(tmp_path):
    root = tmp_path / "report" / "exp"
    (root / "tables").mkdir(parents=True)
    for name in ["README.md", "paper.md", "score_vs_drop_rate.png", "score_vs_drop_rate.pdf", "score_vs_bits.png",
                 "notes.txt", ".score_vs_bits.pdf.tmp-x1", "tables/prune.tex", "tables/prune.html",
                 "tables/quantize tiny.tex", "tables/.prune.tex.tmp-y"]:
        (root / name).write_text("x")
    return root


def links(page: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", page)


def page(tmp_path, **options) -> str:
    root = report_dir(tmp_path)
    return index_page("exp", root, {"experiment": "exp"}, metrics(), {"Reported vs reproduced": "paper.md"},
                      repo=tmp_path, date=DATE, versions=VERSIONS, **options)


def test_links_every_page_plot_and_table_that_exists(tmp_path):
    text = page(tmp_path)
    root = tmp_path / "report" / "exp"
    targets = links(text)
    assert targets == ["README.md", "paper.md", "score_vs_bits.png", "score_vs_drop_rate.pdf",
                       "score_vs_drop_rate.png", "tables/prune.html", "tables/prune.tex",
                       "tables/quantize%20tiny.tex"]
    from urllib.parse import unquote
    assert all((root / unquote(t)).is_file() for t in targets)
    assert "tmp-" not in text and "notes.txt" not in text      # temporaries and other files are not linked
    assert "- score_vs_drop_rate: [PDF](score_vs_drop_rate.pdf) · [PNG](score_vs_drop_rate.png)" in text
    assert "- prune: [HTML](tables/prune.html) · [LaTeX](tables/prune.tex)" in text


def test_missing_pieces(tmp_path):
    root = tmp_path / "bare"
    root.mkdir()
    text = index_page("exp", root, {}, metrics(), repo=tmp_path, date=DATE, versions=VERSIONS)
    assert links(text) == [] and "Report page `README.md`: not written" in text
    assert text.count("None.") == 2
    with pytest.raises(FileNotFoundError, match=r"extra page\(s\) \['Costs \(cost.md\)'\] do not exist"):
        index_page("exp", root, {}, metrics(), {"Costs": "cost.md"}, repo=tmp_path, date=DATE, versions=VERSIONS)
    with pytest.raises(FileNotFoundError, match="no such report directory"):
        index_page("exp", tmp_path / "absent", {}, metrics(), repo=tmp_path, date=DATE, versions=VERSIONS)


def test_seeds_rows_date_and_versions(tmp_path):
    text = page(tmp_path)
    assert "- Fine-tuning seeds: 0, 1, 2; mask seeds: 0, 3" in text
    assert "`results/exp/metrics.csv`, 4 rows" in text and f"- Generated: {DATE}" in text
    assert "- Libraries: python 3.11.7, torch 2.13.0" in text
    no_seeds = index_page("exp", report_dir(tmp_path / "b"), {}, metrics().drop(columns=["mask_seed"]),
                          repo=tmp_path, date=DATE, versions=VERSIONS)
    assert "mask seeds: –" in no_seeds


def test_default_versions_are_the_installed_ones(tmp_path):
    import torch
    text = index_page("exp", report_dir(tmp_path), {}, metrics(), repo=tmp_path, date=DATE)
    assert f"torch {torch.__version__}" in text and "pandas " in text


@needs_git
def test_commit_and_tree_state_in_a_git_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    assert git_state(repo) == "unknown (the repository has no commit yet)"
    (repo / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("results/\n")
    git("add", "a.py", ".gitignore")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD").strip()
    (repo / "results").mkdir()
    (repo / "results" / "metrics.csv").write_text("ignored output\n")
    assert git_state(repo) == f"{head} (clean)"
    text = index_page("exp", report_dir(tmp_path), {}, metrics(), repo=repo, date=DATE, versions=VERSIONS)
    assert f"- Code: git commit {head} (clean)" in text
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new_method.py").write_text("y = 1\n")
    assert git_state(repo) == f"{head} (dirty: 2 paths changed)"


@needs_git
def test_commit_is_unknown_outside_a_repository(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    if subprocess.run(["git", "-C", str(outside), "rev-parse"], capture_output=True).returncode == 0:
        pytest.skip("the temporary directory lies inside a git work tree")
    assert git_state(outside) == "unknown (not a git repository)"
    text = index_page("exp", report_dir(tmp_path), {}, metrics(), repo=outside, date=DATE, versions=VERSIONS)
    assert "- Code: git commit unknown (not a git repository)" in text
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_state(outside) == "unknown (git is not installed)"


def test_config_round_trips_through_the_yaml_block(tmp_path):
    config = {"experiment": "exp", "zoo": {"seed": 0, "task_sizes": {"train": 200}},
              "prune": [{"method": "dare", "drop_rates": [0.0, 0.9, 0.99], "mask_seeds": (0, 1)},
                        {"method": "darex-q", "q_rule": {"rule": "fixed", "q": {0.9: 0.15}}}],
              "tricky": ["yes", "no", "on", "null", "0.9", "1e-4", "", "δ ≠ θ", "a: b", "#x", "```", "x ```` y"],
              "numbers": [1e-4, 3, -0.0, True, None], "data": {"glue": {"path": "../shared/data/glue"}}}
    text = index_page("exp", report_dir(tmp_path), config, metrics(), repo=tmp_path, date=DATE, versions=VERSIONS)
    expected = {**config, "prune": [{**config["prune"][0], "mask_seeds": [0, 1]}, config["prune"][1]]}
    assert read_config_block(text) == expected
    assert "`````yaml" in text        # the fence outgrows the four backticks inside a value
    assert list(read_config_block(text)) == list(config)      # the config's own key order


def test_config_that_yaml_cannot_hold_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"config\.prune\[1\]\.q: a object cannot be written"):
        config_block({"prune": [{}, {"q": object()}]})
    with pytest.raises(ValueError, match="no ```yaml block"):
        read_config_block("# nothing here\n")


def test_write_index_writes_the_page_atomically(tmp_path):
    root = report_dir(tmp_path)
    options = {"repo": tmp_path, "date": DATE, "versions": VERSIONS}
    path = write_index("exp", root, {"experiment": "exp"}, metrics(), {"Paper": "paper.md"}, **options)
    assert path == root / "index.md"
    assert path.read_text() == index_page("exp", root, {"experiment": "exp"}, metrics(), {"Paper": "paper.md"},
                                          **options)
    assert not list(root.glob(".index.md.tmp-*"))
