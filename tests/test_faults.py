"""Fault injection on the real workflow (config/test.yaml): a second run in the same directory is
refused; kill -9 of a fine-tuning job and of a pruning job while they write leaves no partial
output, the re-run redoes only the killed work, and the metrics of the targets equal, byte for byte, those of
an undisturbed run in another directory; a corrupt checkpoint is named."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.workflow

CONFIG = str(REPO / "config" / "test.yaml")
FT = "results/test/tiny-bert/zoo-sentiment/ft~adamw/seed~0"
PRUNE = FT + "/prune~dare_rate~0.9_mseed~0"
# The part of the DAG the faults hit (pre-training, two fine-tunes, a pruning, their evaluations):
# the whole of config/test.yaml would triple the test's time without exercising anything more.
TARGETS = [FT + "/metrics.json", PRUNE + "/metrics.json", "results/test/tiny-bert/zoo-rating/ft~adamw/seed~0/metrics.json"]


def _snakemake(workdir: Path, *args: str, env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", CONFIG, "--cores", "2", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=full_env)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=full_env,
                            start_new_session=True)  # its own process group, to kill -9 it whole


def _kill_while_writing(workdir: Path, target_dir: str) -> subprocess.Popen:
    """Start the workflow with writes to ``target_dir/checkpoint`` held before their final rename;
    kill -9 the whole run once the complete weights sit in the temporary directory."""
    run = _snakemake(workdir, "--rerun-incomplete", *TARGETS, env={"DCBENCH_FAULT_COMMIT_DELAY": "120",
                                   "DCBENCH_FAULT_COMMIT_MATCH": target_dir + "/checkpoint"}, wait=False)
    deadline = time.time() + 300
    while not list((workdir / target_dir).glob(".checkpoint.tmp-*/*.safetensors")):
        assert run.poll() is None, "the workflow ended before the write could be interrupted"
        assert time.time() < deadline, "the job never reached its write"
        time.sleep(0.2)
    return run


def _finished_outputs(workdir: Path) -> dict[str, float]:
    results = workdir / "results"
    return {str(p): p.stat().st_mtime for p in results.rglob("*")
            if p.name in ("metrics.json", "model.safetensors", "merged.safetensors", "delta.safetensors")
            and ".tmp-" not in str(p)}


def test_kill_resume_lock_and_identical_results(tmp_path, finished_run):
    workdir = tmp_path / "run"
    workdir.mkdir()

    # 1. kill -9 a fine-tuning job mid-write; meanwhile a second invocation is refused
    run = _kill_while_writing(workdir, FT)
    second = _snakemake(workdir)
    assert second.returncode != 0
    assert "cannot be locked" in (second.stdout + second.stderr)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (workdir / FT / "checkpoint").exists()  # only the hidden temporary, never an output
    assert _snakemake(workdir, "--unlock").returncode == 0

    # 2. resume; this time kill -9 a pruning job mid-write
    before = _finished_outputs(workdir)
    run = _kill_while_writing(workdir, PRUNE)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert (workdir / FT / "checkpoint" / "model.safetensors").exists()
    assert not (workdir / PRUNE / "checkpoint").exists()
    assert _snakemake(workdir, "--unlock").returncode == 0

    # 3. resume to the end: nothing finished before a kill is redone, nothing temporary is left.
    # With 2 cores one other job may be in flight at each kill; if it had already renamed its
    # output, Snakemake had not yet recorded it as complete and rightly redoes it: at most one
    # tracked output (one per job) per kill.
    middle = _finished_outputs(workdir)
    done = _snakemake(workdir, "--rerun-incomplete", *TARGETS)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _finished_outputs(workdir)
    rebuilt = {p for p, mtime in before.items() if middle.get(p) != mtime or after[p] != mtime}
    rebuilt |= {p for p, mtime in middle.items() if after[p] != mtime}
    assert len(rebuilt) <= 2, f"finished work was redone: {sorted(rebuilt)}"
    assert not [p for p in (workdir / "results").rglob("*.tmp-*")]

    # 4. deterministic: byte-identical metrics to the undisturbed run in another directory
    reference, _ = finished_run
    for target in TARGETS:
        assert (workdir / target).read_bytes() == (reference / target).read_bytes(), target

    # 5. a corrupt fine-tuned checkpoint is detected and named when it is read
    weights = workdir / FT / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    broken = _snakemake(workdir, "--force", "--show-failed-logs", PRUNE + "/checkpoint")
    assert broken.returncode != 0
    assert f"{weights.relative_to(workdir)}: cannot read the safetensors file" in broken.stdout + broken.stderr
