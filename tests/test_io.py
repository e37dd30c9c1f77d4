"""Artifacts are written whole or not at all; unreadable or non-finite weights are named."""

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from methods.io.checkpoint import (CorruptCheckpointError, NonFiniteWeightsError, atomic_dir, atomic_file,
                                   check_finite, load_state_dict)


def test_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "checkpoint") as out:
            (out / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "metrics.json") as f:
            f.write("{")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_successful_write_replaces_the_previous_version(tmp_path):
    for text in ("first", "second"):
        with atomic_dir(tmp_path / "checkpoint") as out:
            (out / "file").write_text(text)
    assert (tmp_path / "checkpoint" / "file").read_text() == "second"
    assert os.listdir(tmp_path) == ["checkpoint"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_named(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 40 + data[40:])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        load_state_dict(tmp_path)


def test_non_finite_weights_are_refused_naming_the_tensor():
    check_finite({"ok": torch.ones(3)}, "here")
    with pytest.raises(NonFiniteWeightsError, match="'layer.bias' has 1 NaN/inf"):
        check_finite({"ok": torch.ones(3), "layer.bias": torch.tensor([1.0, float("nan")])}, "merge x")


def test_full_disk_gives_a_clear_error_and_no_partial_output(tiny_disk):
    with pytest.raises(OSError, match="no space left on the device while writing") as caught:
        with atomic_dir(tiny_disk / "checkpoint") as out:
            save_file({"w": torch.ones(1024, 1024)}, out / "model.safetensors")  # 4 MiB
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="no space left"):
        with atomic_file(tiny_disk / "metrics.json") as f:
            f.write("x" * (2 << 20))
    assert os.listdir(tiny_disk) == []


def test_metric_outside_its_range_stops_the_aggregation(tmp_path):
    import json

    from methods.report.aggregate import MetricOutOfRange, records_to_frame

    record = {"experiment": "e", "model": "m", "arch": "encoder", "task": "zoo-sentiment", "finetune": "adamw",
              "seed": 0, "stage": "finetune", "method": "adamw", "variant": "adamw", "drop_rate": None,
              "mask_seed": None, "params": {}, "selected_on": "", "split": "test", "primary_metric": "accuracy",
              "checkpoint_sha256": "x", "metrics": {"accuracy": 0.9}}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(record))
    bad.write_text(json.dumps({**record, "metrics": {"accuracy": 1.7}}))
    assert records_to_frame([good])["value"].tolist() == [0.9]
    with pytest.raises(MetricOutOfRange, match=r"bad.json: metric accuracy = 1.7 is outside \[0.0, 1.0\]"):
        records_to_frame([good, bad])


def test_base_saved_by_another_model_class_is_aligned_by_name():
    import pytest
    import torch

    from methods.io.checkpoint import align_names

    base = {"embeddings.word_embeddings.weight": torch.zeros(2), "pooler.dense.weight": torch.ones(2)}
    finetuned = {"bert.embeddings.word_embeddings.weight": torch.ones(2), "bert.pooler.dense.weight": torch.ones(2),
                 "classifier.weight": torch.ones(2)}
    aligned = align_names(base, finetuned, "test")
    assert set(aligned) == {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"}
    assert torch.equal(aligned["bert.embeddings.word_embeddings.weight"], torch.zeros(2))
    same = {"bert.pooler.dense.weight": torch.ones(2)}
    assert align_names(same, finetuned, "test") == same
    with pytest.raises(ValueError, match="no tensor of the fine-tuned model has a counterpart"):
        align_names({"encoder.other": torch.ones(2)}, finetuned, "test")
