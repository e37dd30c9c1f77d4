"""The report's front page, ``report/<experiment>/index.md``: what there is to read, and what made it.

Numbers in a report are only worth as much as one's ability to say where they came from. The
index therefore links every page, plot and table of the report directory, and records the
configuration (as a YAML block that loads back to the same dict), the code (git commit and
whether the working tree had uncommitted changes), the library versions, the seeds behind the
metrics and the date. Unlike ``metrics.csv``, this page is not meant to be byte-identical between
two runs: the date and the commit are the point of it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Mapping
from urllib.parse import quote

import pandas as pd
import yaml

from methods.io.checkpoint import atomic_file
from methods.io.manifest import library_versions

INDEX = "index.md"
REPORT_PAGE = "README.md"
SEED_COLUMNS = ("seed", "mask_seed")
# Beyond manifest.library_versions (what touches the weights): what made the tables and plots.
REPORT_PACKAGES = ("numpy", "pandas", "matplotlib", "pyyaml", "snakemake", "lm-eval")
REPO = Path(__file__).resolve().parents[2]


def _link(text: str, target: str) -> str:
    return f"[{text}]({quote(target)})"


def git_state(repo: str | Path = REPO) -> str:
    """``<commit>`` plus ``(clean)`` or ``(dirty: N paths changed)`` for the repository holding
    ``repo``; ``unknown (<why>)`` when it is not a git work tree or git is unavailable. Untracked
    files count as changes (a new, uncommitted method file changes what ran); ignored files, such
    as results/, do not."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # GIT_* variables of an enclosing git process would point git at another repository
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60, env=env)

    try:
        head = git("rev-parse", "--verify", "HEAD")
    except FileNotFoundError:
        return "unknown (git is not installed)"
    except subprocess.TimeoutExpired:
        return "unknown (git did not answer within 60 s)"
    if head.returncode != 0:
        inside = git("rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0:
            return "unknown (not a git repository)"
        return "unknown (the repository has no commit yet)"
    status = git("status", "--porcelain")
    if status.returncode != 0:
        return f"{head.stdout.strip()} (working-tree state unknown: {status.stderr.strip()})"
    changed = [line for line in status.stdout.splitlines() if line.strip()]
    return f"{head.stdout.strip()} ({f'dirty: {len(changed)} paths changed' if changed else 'clean'})"


def report_versions() -> dict[str, str]:
    """Versions of the libraries behind the weights (manifest.library_versions) and the report."""
    versions = dict(library_versions())
    for package in REPORT_PACKAGES:
        try:
            versions.setdefault(package, importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _plain(value, key: str = "config"):
    """The config as YAML-safe plain data; a value YAML cannot hold is named by its key path."""
    if isinstance(value, Mapping):
        # keys stay as they are: a fixed q_rule maps drop rates (floats) to q values
        bad = [k for k in value if not (k is None or isinstance(k, (bool, int, float, str)))]
        if bad:
            raise TypeError(f"{key}: key {bad[0]!r} cannot be written to the config block; use plain data")
        return {k: _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{key}: a {type(value).__name__} cannot be written to the config block; use plain data")


def config_block(config: Mapping) -> str:
    """The config as a fenced YAML block (keys in the config's order). The fence is longer than
    any run of backticks inside, so no string value can end the block early."""
    text = yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True, default_flow_style=False)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}yaml\n{text}{fence}"


def read_config_block(page: str) -> dict:
    """The config back from an index page (the first ``yaml`` fenced block)."""
    lines = page.split("\n")
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if stripped.startswith("```") and stripped.endswith("yaml") and set(stripped[:-4]) == {"`"}:
            fence = stripped[:-4]
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == fence)
            return yaml.safe_load("\n".join(lines[i + 1:end]))
    raise ValueError("the page has no ```yaml block")


def _seeds(metrics: pd.DataFrame, column: str) -> str:
    if column not in metrics.columns:
        return "–"
    values = sorted({int(v) for v in metrics[column] if not (v is None or (isinstance(v, float) and math.isnan(v)))})
    return ", ".join(map(str, values)) or "–"


def _files(report_dir: Path, pattern: str) -> dict[str, list[str]]:
    """Files matching ``pattern`` grouped by stem → sorted suffixes, e.g. {"prune": [".html", ".tex"]}."""
    groups: dict[str, list[str]] = {}
    for path in sorted(report_dir.glob(pattern)):
        if path.is_file() and not path.name.startswith("."):   # skip atomic-write temporaries
            groups.setdefault(path.relative_to(report_dir).with_suffix("").as_posix(), []).append(path.suffix)
    return groups


def index_page(experiment: str, report_dir: str | Path, config: Mapping, metrics: pd.DataFrame,
               extra_pages: Mapping[str, str] | None = None, *, repo: str | Path = REPO,
               date: str | None = None, versions: Mapping[str, str] | None = None) -> str:
    """Markdown of ``report/<experiment>/index.md``.

    Links: the report page (README.md), each page of ``extra_pages`` (title → path relative to
    ``report_dir``), every plot (``*.png`` / ``*.pdf`` in ``report_dir``) and every table
    (``tables/*.tex`` / ``*.html``) present; a listed extra page that does not exist is an error
    (it would be a dead link). Provenance: git commit of ``repo`` and tree state, library
    versions (``versions``, default: those installed), the seeds and the number of rows of
    ``metrics``, and ``date`` (default: today, UTC, ISO 8601)."""
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise FileNotFoundError(f"{report_dir}: no such report directory")
    extra_pages = dict(extra_pages or {})
    missing = [f"{title} ({path})" for title, path in extra_pages.items() if not (report_dir / path).is_file()]
    if missing:
        raise FileNotFoundError(f"{report_dir}: extra page(s) {missing} do not exist; write them before the index")
    date = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    versions = dict(versions) if versions is not None else report_versions()

    lines = [f"# Experiment `{experiment}`: index", "", "## Pages", ""]
    if (report_dir / REPORT_PAGE).is_file():
        lines.append(f"- {_link('Report: tables and plots', REPORT_PAGE)}")
    else:
        lines.append(f"- Report page `{REPORT_PAGE}`: not written")
    lines += [f"- {_link(title, path)}" for title, path in extra_pages.items()]

    plots = {stem: suffixes for stem, suffixes in _files(report_dir, "*").items()
             if set(suffixes) & {".png", ".pdf"}}
    lines += ["", "## Plots", ""]
    for stem, suffixes in plots.items():
        links = [_link(suffix[1:].upper(), stem + suffix) for suffix in suffixes if suffix in (".png", ".pdf")]
        lines.append(f"- {stem}: {' · '.join(links)}")
    if not plots:
        lines.append("None.")

    tables = {stem: suffixes for stem, suffixes in _files(report_dir, "tables/*").items()
              if set(suffixes) & {".tex", ".html"}}
    lines += ["", "## Tables", ""]
    names = {".tex": "LaTeX", ".html": "HTML"}
    for stem, suffixes in tables.items():
        links = [_link(names[suffix], stem + suffix) for suffix in suffixes if suffix in names]
        lines.append(f"- {stem.split('/', 1)[1]}: {' · '.join(links)}")
    if not tables:
        lines.append("None.")

    lines += ["", "## Provenance", "",
              f"- Experiment: `{experiment}`",
              f"- Generated: {date}",
              f"- Code: git commit {git_state(repo)}",
              f"- Metrics: `results/{experiment}/metrics.csv`, {len(metrics)} rows",
              f"- Fine-tuning seeds: {_seeds(metrics, 'seed')}; mask seeds: {_seeds(metrics, 'mask_seed')}",
              "- Libraries: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
              "", "## Configuration", "",
              "The configuration this report was made with; it loads back with `yaml.safe_load` and can be "
              "passed to `snakemake --configfile` to rerun the experiment.", "",
              config_block(config), ""]
    return "\n".join(lines)


def write_index(experiment: str, report_dir: str | Path, config: Mapping, metrics: pd.DataFrame,
                extra_pages: Mapping[str, str] | None = None, **options) -> Path:
    """Write ``index_page(...)`` to ``report_dir/index.md`` atomically; return its path. A paper
    config (a ``paper`` section, config/paper/*.yaml) first gets its page ``paper.md``, the paper's
    own tables filled from ``metrics`` and its published figures (methods/report/paper.py), linked
    from the index."""
    if config.get("paper"):
        from methods.report.paper import PAPER_PAGE, write_paper_page

        write_paper_page(config, metrics, report_dir, REPO / "report" / "paper_numbers")
        extra_pages = {f"Paper reproduction: {config['paper']['title']}": PAPER_PAGE, **dict(extra_pages or {})}
    text = index_page(experiment, report_dir, config, metrics, extra_pages, **options)
    target = Path(report_dir) / INDEX
    with atomic_file(target) as f:
        f.write(text)
    return target
