"""Where jobs compute (methods/device.py) and the GPU check script of the delta benchmark
(bench/gpu_check.sh), which a machine without a GPU can run on its CPU as a dry run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from methods.device import DEVICE_ENV, cache_key, compute_device, divide, strict_float32


def test_auto_is_the_visible_gpu_else_the_cpu(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert compute_device() == expected
    assert compute_device("auto") == expected
    assert compute_device(" CPU ") == torch.device("cpu")
    assert compute_device(torch.device("cpu")) == torch.device("cpu")


def test_the_workflow_config_reaches_the_job_through_the_environment(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert compute_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match=r"config key `device`.*'tpu'"):
        compute_device()


@pytest.mark.parametrize("name", ["cuda:x", "gpu", "cuda:-1", "cpu:0"])
def test_names_that_are_no_device_are_refused(name):
    with pytest.raises(ValueError, match="is not a device"):
        compute_device(name, where="test")


def test_asking_for_a_gpu_without_one_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="no CUDA support.*'auto'"):
        compute_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # what a job without a GPU slot gets
    with pytest.raises(RuntimeError, match=r"holds no GPU.*--resources gpu=N"):
        compute_device("cuda:0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        compute_device("cuda")


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert compute_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="only 1 CUDA device"):
        compute_device("cuda:1")


def test_strict_float32_turns_tf32_off():
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        strict_float32()
        assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]


def _gpu_check(tmp_path, *args):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ON_CPU": "1"}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--params", "2e7", "--hidden", "128",
                           "--layers", "2", "--workdir", str(tmp_path), "--no-drop-caches", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The GPU check is one command; on a machine without a GPU it runs its CPU dry run end to
    end (a tiny set instead of 7B) and prints the benchmark's table."""
    result = _gpu_check(tmp_path, "--ops", "floor-N,ta,ties")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on the CPU (dry run)" in result.stdout
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert {"floor-N", "ta", "ties"} <= set(rows)
    saved = json.loads(next(tmp_path.glob("results-*.json")).read_text())
    assert saved["args"]["device"] == "cpu" and saved["skipped"] == []
    assert saved["results"]["ta"]["wall_s"] > 0 and saved["results"]["ta"]["peak_gpu_gb"] is None


def test_gpu_check_refuses_a_machine_without_a_gpu_and_keeps_to_its_budget(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ON_CPU": "0"}
    if not torch.cuda.is_available():
        refused = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                                 env=env, timeout=120)
        assert refused.returncode != 0 and "sees no CUDA device" in refused.stderr
    for limit in ("--time-budget", "--time-limit"):   # none started / each stopped at once
        result = _gpu_check(tmp_path, "--ops", "floor-N,ta", limit, "1e-9")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "skipped or stopped" in result.stdout
        assert json.loads(next(tmp_path.glob("results-*.json")).read_text())["skipped"] == ["floor-N", "ta"]
    assert "was stopped at the time limit" in result.stdout


def test_gpu_results_are_cached_apart_and_cpu_keys_stay():
    assert cache_key(torch.device("cpu")) == {}
    assert cache_key(torch.device("cuda", 1)) == {"device": "cuda"}


def test_divide_is_the_cpu_division_bit_for_bit():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    for divisor in (0.1, 1 - 0.9, 3.0, 7, 1e-30):
        assert torch.equal(divide(x, divisor).view(torch.int32), (x / divisor).view(torch.int32))
    out = torch.empty_like(x)
    assert divide(x, 0.3, out=out) is out
