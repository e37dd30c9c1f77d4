"""Workstation GPU slots (methods/io/gpu_slots.py): concurrent jobs never share a device, a failed or
killed job frees its slot, and CPU-only runs hide every GPU."""

import multiprocessing
import os
import signal
import sys
import time
import types

import pytest

from methods.io import gpu_slots
from methods.io.gpu_slots import acquire, device_pool, gpu_slots as hold
from methods.io.job import job

FORK = multiprocessing.get_context("fork")


def _worker(slot_dir, devices, record, hold_s, fail):
    """One 'job': take a slot, note which device and when, optionally fail while holding it."""
    env = {}
    try:
        with hold(1, env=env, devices=devices, slot_dir=slot_dir, timeout=60) as allocation:
            start = time.monotonic()
            assert env["CUDA_VISIBLE_DEVICES"] == allocation.cuda_visible_devices
            time.sleep(hold_s)
            with open(record, "a") as f:
                f.write(f"{allocation.cuda_visible_devices} {start} {time.monotonic()} {os.getpid()}\n")
            if fail:
                raise RuntimeError("job failed")
    except RuntimeError:
        os._exit(1)
    os._exit(0)


def test_concurrent_jobs_never_share_a_slot(tmp_path):
    record = tmp_path / "record.txt"
    devices = ["0", "1"]
    # six jobs at once on two devices, every other one failing: each device is held by one job at a time
    procs = [FORK.Process(target=_worker, args=(tmp_path / "slots", devices, record, 0.3, i % 2 == 1))
             for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(p.exitcode for p in procs) == [0, 0, 0, 1, 1, 1]
    rows = [line.split() for line in record.read_text().splitlines()]
    assert len(rows) == 6 and {r[0] for r in rows} == set(devices)
    assert len({r[3] for r in rows}) == 6  # six distinct processes
    for device in devices:
        spans = sorted((float(r[1]), float(r[2])) for r in rows if r[0] == device)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"two jobs held GPU {device} at once: {spans}"
    # at some moment both devices were busy: the two slots were really used concurrently
    spans = [(float(r[1]), float(r[2]), r[0]) for r in rows]
    assert any(a0 < b1 and b0 < a1 and da != db for a0, a1, da in spans for b0, b1, db in spans)


def test_a_failed_job_frees_its_slot(tmp_path):
    slots = tmp_path / "slots"
    env = {}
    with pytest.raises(RuntimeError):
        with hold(1, env=env, devices=["0"], slot_dir=slots, timeout=1):
            assert env["CUDA_VISIBLE_DEVICES"] == "0"
            with pytest.raises(TimeoutError):  # the only slot is taken while the job runs
                acquire(1, ["0"], slots, timeout=0.3)
            raise RuntimeError("the job fails")
    assert "CUDA_VISIBLE_DEVICES" not in env
    again = acquire(1, ["0"], slots, timeout=1)
    assert again.devices == ["0"]
    again.release()


def _hold_forever(slot_dir, ready):
    allocation = acquire(1, ["0"], slot_dir, timeout=10)
    assert allocation.devices == ["0"]
    ready.set()
    time.sleep(600)


def test_a_killed_job_frees_its_slot(tmp_path):
    slots = tmp_path / "slots"
    ready = FORK.Event()
    proc = FORK.Process(target=_hold_forever, args=(slots, ready))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(TimeoutError):
        acquire(1, ["0"], slots, timeout=0.3)
    os.kill(proc.pid, signal.SIGKILL)  # an OOM kill or kill -9: no cleanup code runs
    proc.join(30)
    allocation = acquire(1, ["0"], slots, timeout=5)
    assert allocation.devices == ["0"]
    allocation.release()


def test_allocation_is_all_or_nothing(tmp_path):
    slots = tmp_path / "slots"
    first = acquire(1, ["0", "1"], slots, timeout=1)
    with pytest.raises(TimeoutError):
        acquire(2, ["0", "1"], slots, timeout=0.3)
    other = acquire(1, ["0", "1"], slots, timeout=1)  # the waiting two-slot job kept nothing
    assert sorted(first.devices + other.devices) == ["0", "1"]
    first.release(), other.release()
    both = acquire(2, ["0", "1"], slots, timeout=1)
    assert both.cuda_visible_devices == "0,1"
    both.release()
    with pytest.raises(ValueError):
        acquire(3, ["0", "1"], slots, timeout=1)


def test_cpu_only_fallback_hides_gpus(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with hold(0, env=env, slot_dir=tmp_path) as allocation:  # the job asked for no GPU
        assert allocation.devices == [] and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    env = {}
    with hold(1, env=env, devices=[], slot_dir=tmp_path) as allocation:  # a machine without GPUs
        assert allocation.devices == [] and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not list(tmp_path.iterdir())  # nothing locked, nothing written


def test_slurm_jobs_keep_slurms_devices(tmp_path):
    env = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2"}
    with hold(1, env=env, devices=["0", "1"], slot_dir=tmp_path) as allocation:
        assert allocation.devices == ["2"] and env["CUDA_VISIBLE_DEVICES"] == "2"


def test_device_pool(monkeypatch):
    assert device_pool({"CUDA_VISIBLE_DEVICES": "3,5,6"}) == ["3", "5", "6"]
    assert device_pool({"CUDA_VISIBLE_DEVICES": "3,5,6", "DCBENCH_GPU_POOL": "2"}) == ["3", "5"]
    assert device_pool({"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setattr(gpu_slots, "physical_devices", lambda: ["0", "1", "2", "3"])
    assert device_pool({"DCBENCH_GPU_POOL": "2"}) == ["0", "1"]
    assert device_pool({}) == ["0", "1", "2", "3"]


def test_job_wrapper_takes_the_jobs_gpu_resource(tmp_path, monkeypatch):
    """workflow/scripts/* call job(); it reads the gpu resource of the Snakemake job it runs in."""
    fake = types.SimpleNamespace(resources={"gpu": 1})
    monkeypatch.setattr(sys.modules["__main__"], "snakemake", fake, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    monkeypatch.setenv("DCBENCH_GPU_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with job(tmp_path / "a.log"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    assert "GPU(s) 4" in (tmp_path / "a.log").read_text()
    other = acquire(1, ["4", "7"], tmp_path / "slots", timeout=1)  # another job holds device 4
    with job(tmp_path / "b.log"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    other.release()
    with pytest.raises(RuntimeError):
        with job(tmp_path / "c.log"):
            raise RuntimeError("the job fails")
    with job(tmp_path / "d.log"):  # the failed job's slot is free again
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    fake.resources = {"gpu": 0}
    with job(None):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,7"
