"""Workflow scale: how long Snakemake takes to build the DAG of a large experiment, and to decide
that a finished experiment has nothing to do.

    python bench/dag_scale.py                        # ~2,000+ job config, dry run, timed
    python bench/dag_scale.py --noop config/config.yaml   # no-op re-run of a finished experiment

The large config is generated from config/pruning.yaml: every pruning method and q rule on every
zoo task after four kinds of fine-tuning, plus the quantization study's variants, with enough mask
seeds to pass ``--jobs`` jobs. Nothing runs: ``snakemake -n`` only builds and prints the DAG. Timing
includes Python start-up and config validation, i.e. what a user waits for.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def large_config() -> dict:
    """config/pruning.yaml plus the quantization study's variants of the fine-tuned models."""
    config = yaml.safe_load((REPO / "config" / "pruning.yaml").read_text())
    quantization = yaml.safe_load((REPO / "config" / "quantization.yaml").read_text())
    config["experiment"] = "dag-scale"
    config["quantize"] = [v for v in quantization["quantize"] if "after" not in v]
    return config


def dry_run(config_path: Path, workdir: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    result = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
                             str(config_path), "-n", "--cores", "2", "--quiet", "rules"],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed:\n{output[-3000:]}")
    match = re.search(r"^total\s+(\d+)", output, re.MULTILINE)
    return elapsed, int(match.group(1)) if match else 0, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="least number of jobs of the generated config")
    parser.add_argument("--noop", type=Path, help="time a no-op re-run of this (finished) config in the repository")
    args = parser.parse_args()
    if args.noop:
        started = time.perf_counter()
        result = subprocess.run([*SNAKEMAKE, "--configfile", str(args.noop), "--cores", "2"], cwd=REPO,
                                capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        done = "Nothing to be done" in result.stdout + result.stderr
        print(f"| no-op re-run of {args.noop} | {elapsed:.1f} s | {'nothing to do' if done else 'JOBS RAN'} |")
        return
    with tempfile.TemporaryDirectory() as tmp:
        config, seeds = large_config(), 1
        while True:
            path = Path(tmp) / "large.yaml"
            path.write_text(yaml.safe_dump(config))
            elapsed, jobs, _ = dry_run(path, Path(tmp))
            if jobs >= args.jobs:
                break
            seeds += 1  # more mask seeds until the DAG is large enough
            config["prune"] = [dict(v, mask_seeds=list(range(seeds))) for v in config["prune"]]
        print("| config | jobs | dry-run wall time |\n|---|---|---|")
        print(f"| generated (pruning.yaml + quantization variants, {seeds} mask seed(s)) | {jobs} | {elapsed:.1f} s |")


if __name__ == "__main__":
    main()
