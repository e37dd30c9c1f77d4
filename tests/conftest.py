import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run_snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this repository's workflow with `workdir` as its working directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def shared_data() -> Path:
    """Real public data in ../shared/data; tests that need it skip cleanly without it."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """config/test.yaml run to completion once per session in a fresh directory."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = str(REPO / "config" / "test.yaml")
    result = run_snakemake(workdir, "--configfile", config, "--cores", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config
