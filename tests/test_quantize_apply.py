"""Model-level quantization: which tensors, weights vs deltas, and decoding an artifact's records."""

import pytest
import torch

from conftest import tiny_llama, token_batches
from methods.quantize.apply import materialize, quantizable, quantize_model
from methods.quantize.grids import GridSpec, rtn


def test_only_linear_weights_inside_blocks_are_targets():
    model = tiny_llama()
    names = quantizable(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(".layers." in n and n.endswith(".weight") for n in names)
    assert "lm_head.weight" not in names and not any("embed" in n or "norm" in n for n in names)
    assert quantizable(model, exclude=[r"mlp\."]) == [n for n in names if "mlp." not in n]
    with pytest.raises(ValueError, match="no Linear layer"):
        quantizable(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_weights_target_decodes_to_rtn_of_each_weight():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = quantize_model(model, "rtn", {"bits": 3, "scheme": "asym", "group_size": -1, "scale_dtype": "float16",
                                            "mse_clip": False})
    decoded = materialize(records)
    for name, value in decoded.items():
        assert torch.equal(value, rtn(state[name], GridSpec(3, "asym", -1, "float16"))[1])


def test_delta_target_keeps_the_base_and_pruned_zeros():
    model = tiny_llama()
    finetuned = model.state_dict()
    base = {k: v - 0.01 * torch.randn_like(v) for k, v in finetuned.items()}
    names = quantizable(model)
    # prune half of each delta to exact zeros, as a DARE variant would
    with torch.no_grad():
        for name in names:
            delta = finetuned[name] - base[name]
            finetuned[name].copy_(base[name] + delta * (torch.arange(delta.numel()).reshape(delta.shape) % 2))
    records = quantize_model(model, "rtn", {"bits": 4, "scheme": "sym-full", "group_size": -1,
                                            "scale_dtype": "float32", "mse_clip": False},
                             target="delta", base=base)
    decoded = materialize(records, base)
    for name in names:
        delta = finetuned[name] - base[name]
        assert torch.equal(decoded[name][delta == 0], base[name][delta == 0])
        step = records[name].scale.max()
        assert (decoded[name] - finetuned[name]).abs().max() <= step  # within a grid step of the weight
    with pytest.raises(ValueError, match="needs the base"):
        quantize_model(model, "rtn", {"bits": 4, "scheme": "asym", "group_size": -1, "scale_dtype": "float16",
                                      "mse_clip": False}, target="delta")


def test_data_driven_methods_get_the_calibration_batches():
    model = tiny_llama()
    batches = token_batches(64, 2, 8, 2, seed=0, padding=(slice(0, 1), slice(0, 2)))
    params = {"bits": 4, "scheme": "asym", "group_size": -1, "scale_dtype": "float16", "blocksize": 128,
              "percdamp": 0.01, "actorder": False, "static_groups": False, "true_sequential": True,
              "preserve_zeros": False, "on_cholesky_failure": "raise"}
    records = quantize_model(model, "gptq", params, batches=batches, is_encoder=False)
    assert set(records) == set(quantizable(model))
    assert all(r.codes.device.type == "cpu" for r in records.values())
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama(), "gptq", params)
