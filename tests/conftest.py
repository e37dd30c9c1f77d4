import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_llama(initializer_range: float = 0.02):
    """A 2-block Llama (hidden 32, vocab 64) with fixed random weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         initializer_range=initializer_range)
    return LlamaForCausalLM(config).eval()


def token_batches(vocab: int, rows: int, length: int, count: int, seed: int, padding: tuple[slice, slice]) -> list[dict]:
    """``count`` batches of random token ids with an attention mask that is 0 at ``padding``
    (e.g. ``(slice(0, 1), slice(0, 5))``: left padding in the first row)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[padding] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


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


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be made."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", f"dcbench-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
