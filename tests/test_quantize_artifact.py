"""The packed artifact: b-bit packing, bit-exact save/load, and bits per parameter counted from the written
files equal to the spec quantization.md §7 formulas."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from methods.io.checkpoint import CorruptCheckpointError, atomic_dir
from methods.quantize.artifact import (JSON_FILE, TENSORS_FILE, ArtifactWriter, OffGridError, artifact_hash,
                                       assert_on_grid, bit_accounting, index_bits, load_artifact, pack_bits,
                                       save_artifact, unpack_bits)
from methods.quantize.common import QuantizedTensor
from methods.quantize.grids import GridSpec
from methods.quantize.rtn import rtn_tensor
from methods.quantize.statsq import statsq_tensor


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# ------------------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip_for_every_width(bits):
    gen = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 8, 9, 1001):
        values = torch.randint(0, 2 ** bits, (count,), generator=gen)
        if count:
            values[0] = 2 ** bits - 1     # the extremes must survive
            values[-1] = 0
        packed = pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.int32))


@pytest.mark.parametrize("bits", (3, 16))
def test_pack_round_trip_across_chunks_and_shapes(bits):
    values = torch.randint(0, 2 ** bits, (2 ** 18 + 13,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(values, bits), bits, values.numel()), values.to(torch.int32))
    matrix = values[:7 * 11].reshape(7, 11).to(torch.int32)   # 2-D input is packed row-major
    assert torch.equal(unpack_bits(pack_bits(matrix, bits), bits, 77).reshape(7, 11), matrix)


def test_bit_stream_is_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    # 5 = 101b -> stream bits 0..2, 7 -> bits 3..5, 1 -> bits 6..8 (bit 8 is bit 0 of the second byte)
    assert pack_bits(torch.tensor([5, 7, 1]), 3).tolist() == [0b01111101, 0b0]
    assert pack_bits(torch.tensor([0xABC]), 12).tolist() == [0xBC, 0x0A]


@pytest.mark.parametrize("bits", (1, 2, 4, 8, 3, 5))
def test_packing_follows_the_bit_stream_definition(bits):
    """Code i at stream bits [i·b, (i+1)·b), least significant first, stream bit j = bit j mod 8 of
    byte j // 8: written out bit by bit here, against both packing paths (whole codes per byte
    when b divides 8, the general bit stream otherwise) and back."""
    values = torch.randint(0, 2 ** bits, (37,), generator=torch.Generator().manual_seed(bits))
    stream = [(int(v) >> k) & 1 for v in values for k in range(bits)]
    expected = [sum(bit << (j % 8) for j, bit in enumerate(stream) if j // 8 == byte)
                for byte in range((len(stream) + 7) // 8)]
    assert pack_bits(values, bits).tolist() == expected
    assert torch.equal(unpack_bits(torch.tensor(expected, dtype=torch.uint8), bits, 37), values.to(torch.int32))


def test_packing_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match=r"outside \[0, 7\] for bits=3"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="integers"):
        pack_bits(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)


# ------------------------------------------------------------------------------------------ save/load

def records() -> dict[str, QuantizedTensor]:
    w = gaussian(8, 128, seed=1)
    out = {
        "asym.g32.fp16": rtn_tensor(w, GridSpec(4, "asym", 32, "float16")),
        "symfull.channel.bf16": rtn_tensor(w, GridSpec(3, "sym-full", -1, "bfloat16")),
        "symr.tensor.fp32": rtn_tensor(w, GridSpec(5, "sym-restricted", 0, "float32")),
        "asym.16bit": rtn_tensor(w, GridSpec(16, "asym", 64, "float16")),
        "statsq.2bit": statsq_tensor(w, 2, "float16"),
    }
    # act-order style record: groups over permuted columns (g_idx), power decode with an exponent
    gen = torch.Generator().manual_seed(2)
    g_idx = (torch.randperm(128, generator=gen) // 16).to(torch.int32)   # 8 groups of 16 columns
    out["power.gidx"] = QuantizedTensor(
        codes=torch.randint(0, 8, (8, 128), generator=gen, dtype=torch.int32), bits=3,
        scale=torch.rand(8, 8, generator=gen).to(torch.float16), zero=None, implicit_zero=3.0, width=16,
        decode="power", extras={"g_idx": g_idx, "exponent": torch.tensor([0.72])}, info={"method": "toy", "a": [1, 2]})
    # a float zero-point that is not an integer code (HQQ/quanto style) is stored raw
    out["floatzero"] = QuantizedTensor(
        codes=torch.randint(0, 16, (4, 64), generator=gen, dtype=torch.int32), bits=4,
        scale=torch.rand(4, 2, generator=gen).to(torch.float16),
        zero=(torch.rand(4, 2, generator=gen) * 15).to(torch.float16), implicit_zero=None, width=32)
    return out


def assert_same_record(a: QuantizedTensor, b: QuantizedTensor) -> None:
    for field in ("codes", "scale"):
        assert getattr(a, field).dtype == getattr(b, field).dtype
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert (a.zero is None) == (b.zero is None)
    if a.zero is not None:
        assert a.zero.dtype == b.zero.dtype and torch.equal(a.zero, b.zero)
    assert (a.bits, a.implicit_zero, a.width, a.decode, a.info) == (b.bits, b.implicit_zero, b.width, b.decode, b.info)
    assert set(a.extras) == set(b.extras)
    for key in a.extras:
        assert a.extras[key].dtype == b.extras[key].dtype and torch.equal(a.extras[key], b.extras[key])
    assert torch.equal(a.dequantize(), b.dequantize())


def test_save_load_round_trip_is_bit_exact(tmp_path):
    quantized = records()
    passthrough = {"embed": gaussian(10, 16).to(torch.bfloat16), "norm.weight": torch.ones(16, dtype=torch.float16),
                   "head.bias": gaussian(1, 5)[0], "position_ids": torch.arange(7)}
    metadata = {"model": "toy", "grid": {"bits": 4}, "seed": 0}
    accounting = save_artifact(tmp_path / "art", quantized, passthrough, metadata)
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == sorted([JSON_FILE, TENSORS_FILE])
    loaded, loaded_passthrough, loaded_metadata = load_artifact(tmp_path / "art")
    assert loaded_metadata == {**metadata, "bits": accounting} and set(loaded) == set(quantized)
    assert accounting == bit_accounting(tmp_path / "art")
    for name in quantized:
        assert_same_record(quantized[name], loaded[name])
    assert set(loaded_passthrough) == set(passthrough)
    for name, tensor in passthrough.items():
        assert loaded_passthrough[name].dtype == tensor.dtype and torch.equal(loaded_passthrough[name], tensor)
    # codes, integer zero-points and g_idx are stored packed, not as int32
    stored = load_file(tmp_path / "art" / TENSORS_FILE)
    assert stored["quantized/asym.g32.fp16/codes"].dtype == torch.uint8
    assert stored["quantized/asym.g32.fp16/codes"].numel() == 8 * 128 * 4 // 8
    assert stored["quantized/asym.g32.fp16/zero"].numel() == (8 * 4 * 4 + 7) // 8
    assert stored["quantized/power.gidx/extra/g_idx"].numel() == 128 * 3 // 8
    assert stored["quantized/floatzero/zero"].dtype == torch.float16


def test_artifact_writer_writes_what_save_artifact_writes(tmp_path):
    """Tensor by tensor (every record and passthrough kind above) into one file: the same records,
    accounting and hash; a failure leaves the previous artifact, a tensor beyond the names it was
    sized for is refused."""
    quantized = records()
    passthrough = {"embed": gaussian(10, 16).to(torch.bfloat16), "position_ids": torch.arange(7)}
    metadata = {"model": "toy"}
    accounting = save_artifact(tmp_path / "ref", quantized, passthrough, metadata)
    names = ["embed", *quantized, "position_ids"]
    with ArtifactWriter(tmp_path / "art", metadata, names) as writer:
        writer.add_passthrough("embed", passthrough["embed"])
        for name, record in quantized.items():
            writer.add(name, record)
        sink = writer.passthrough_sink("position_ids", torch.int64, (7,))
        for chunk in torch.arange(7).split(3):
            sink.write(chunk)
        sink.close()
        with pytest.raises(ValueError, match="added twice"):
            writer.add("embed", quantized["statsq.2bit"])
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == sorted([JSON_FILE, TENSORS_FILE])
    assert bit_accounting(tmp_path / "art") == accounting
    assert artifact_hash(tmp_path / "art") == artifact_hash(tmp_path / "ref")
    loaded, loaded_passthrough, _ = load_artifact(tmp_path / "art")
    for name in quantized:
        assert_same_record(quantized[name], loaded[name])
    assert all(torch.equal(loaded_passthrough[k], v) for k, v in passthrough.items())
    with pytest.raises(TypeError, match="JSON"):
        with ArtifactWriter(tmp_path / "art", {"run": object()}, names) as writer:
            writer.add_passthrough("embed", passthrough["embed"])
    with pytest.raises(ValueError, match="does not fit the single file"):
        with ArtifactWriter(tmp_path / "art", metadata, ["w"]) as writer:
            for i in range(200):
                writer.add_passthrough(f"a rather long tensor name that was never announced {i}", torch.ones(1))
    assert artifact_hash(tmp_path / "art") == artifact_hash(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ref"]


def test_a_failed_save_leaves_the_previous_artifact(tmp_path):
    quantized = {"w": rtn_tensor(gaussian(4, 64), GridSpec(4))}
    save_artifact(tmp_path / "art", quantized, {}, {"run": 1})
    with pytest.raises(TypeError, match="JSON"):
        save_artifact(tmp_path / "art", quantized, {}, {"run": object()})
    bad = QuantizedTensor(codes=torch.full((4, 64), 16, dtype=torch.int32), bits=4, scale=torch.ones(4, 1),
                          zero=None, implicit_zero=8.0, width=64)
    with pytest.raises(ValueError, match=r"quantized\['w'\].codes.*outside \[0, 15\]"):
        save_artifact(tmp_path / "art", {"w": bad}, {}, {"run": 2})
    with pytest.raises(ValueError, match="'bits'"):
        save_artifact(tmp_path / "art", quantized, {}, {"bits": 4})
    assert load_artifact(tmp_path / "art")[2]["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["art"]   # no temporary directory left behind
    save_artifact(tmp_path / "art", quantized, {}, {"run": 3})   # overwriting replaces it
    assert load_artifact(tmp_path / "art")[2]["run"] == 3


def test_whole_state_dict_as_passthrough_inside_a_callers_atomic_dir(tmp_path):
    """The workflow passes the source state dict as passthrough from inside its own atomic_dir: the
    quantized weights are stored once (as codes) and the rest at their dtype."""
    w = gaussian(4, 64)
    embed = gaussian(3, 8).half()
    state = {"layer.0.weight": w, "layer.0.bias": torch.zeros(4), "embed": embed, "head": embed}   # tied

    quantized = {"layer.0.weight": rtn_tensor(w, GridSpec(4, "sym-full", 32))}
    with atomic_dir(tmp_path / "artifact") as out:
        accounting = save_artifact(out, quantized, state, {"params": {"target": "weights"}})
    assert sorted(accounting["passthrough"]) == ["embed", "head", "layer.0.bias"]   # tied: counted twice
    assert accounting["model_bits"] == 4 * 64 * 4 + 4 * 2 * 16 + 4 * 32 + 2 * 24 * 16
    loaded, passthrough, metadata = load_artifact(tmp_path / "artifact")
    assert sorted(passthrough) == ["embed", "head", "layer.0.bias"] and metadata["params"] == {"target": "weights"}
    assert torch.equal(passthrough["head"], embed)
    assert metadata["bits"]["model_bpp"] == accounting["model_bpp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_artifact_hash_follows_the_weights_not_the_metadata(tmp_path):
    qt = rtn_tensor(gaussian(4, 64), GridSpec(4))
    save_artifact(tmp_path / "a", {"w": qt}, {}, {"run": 1})
    save_artifact(tmp_path / "b", {"w": qt}, {}, {"run": 2, "time": "later"})
    assert artifact_hash(tmp_path / "a") == artifact_hash(tmp_path / "b")
    changed = QuantizedTensor(codes=qt.codes.clone(), bits=qt.bits, scale=qt.scale, zero=qt.zero,
                              implicit_zero=qt.implicit_zero, width=qt.width, info=qt.info)
    changed.codes[0, 0] = (changed.codes[0, 0] + 1) % 16
    save_artifact(tmp_path / "c", {"w": changed}, {}, {"run": 1})
    assert artifact_hash(tmp_path / "c") != artifact_hash(tmp_path / "a")


# ------------------------------------------------------------------------------------------ bit accounting

def bpp_of(tmp_path, qt: QuantizedTensor, passthrough=None) -> dict:
    save_artifact(tmp_path / "bpp", {"w": qt}, passthrough or {}, {})
    return bit_accounting(tmp_path / "bpp")


def test_discquant_3_25_bits(tmp_path):
    """g64 symmetric 3-bit with float16 scales: exactly 3 + 16/64 = 3.25 (spec §7, §9 check 26)."""
    acc = bpp_of(tmp_path, rtn_tensor(gaussian(16, 256), GridSpec(3, "sym-full", 64, "float16")))
    assert acc["quantized_bpp"] == 3.25 and acc["model_bpp"] == 3.25
    t = acc["tensors"]["w"]
    assert (t["code_bits"], t["scale_bits"], t["zero_bits"], t["extra_bits"]) == (16 * 256 * 3, 16 * 4 * 16, 0, 0)


@pytest.mark.parametrize("bits", (3, 4))
def test_asym_per_channel_stores_a_b_bit_zero(tmp_path, bits):
    """n = 4096 per channel asym: b + (16 + b)/4096 (float16 scale, zero packed at b bits; the spec table's
    b + 32/n row assumes a 16-bit zero)."""
    acc = bpp_of(tmp_path, rtn_tensor(gaussian(4, 4096), GridSpec(bits, "asym", -1, "float16")))
    assert acc["quantized_bpp"] == bits + (16 + bits) / 4096


@pytest.mark.parametrize("bits", (3, 4))
def test_g128_formulas(tmp_path, bits):
    w = gaussian(8, 512)
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(bits, "asym", 128)))["quantized_bpp"] == bits + (16 + bits) / 128
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(bits, "sym-full", 128)))["quantized_bpp"] == bits + 16 / 128
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(bits, "sym-full", 32)))["quantized_bpp"] == bits + 16 / 32
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(bits, "sym-full", 128, "float32")))["quantized_bpp"] == \
        bits + 32 / 128


def test_per_row_and_per_tensor_scales(tmp_path):
    w = gaussian(4, 4096)
    assert bpp_of(tmp_path, statsq_tensor(w, 3))["quantized_bpp"] == 3 + 16 / 4096
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(4, "sym-restricted", 0)))["quantized_bpp"] == 4 + 16 / (4 * 4096)
    assert bpp_of(tmp_path, rtn_tensor(w, GridSpec(4, "asym", 0)))["quantized_bpp"] == 4 + (16 + 4) / (4 * 4096)


def test_g_idx_and_exponent_are_counted(tmp_path):
    qt = records()["power.gidx"]     # 8 x 128, 3 bits, 8 groups per row, fp16 scales, g_idx, fp32 exponent
    t = bpp_of(tmp_path, qt)["tensors"]["w"]
    assert index_bits(8) == 3 and index_bits(9) == 4 and index_bits(2) == 1 and index_bits(1) == 1
    assert t["extra_bits"] == 128 * 3 + 32
    assert t["total_bits"] == 8 * 128 * 3 + 64 * 16 + 128 * 3 + 32
    assert t["bpp"] == 3 + 16 / 16 + (128 * 3 + 32) / (8 * 128)


def test_model_bpp_counts_passthrough_at_their_stored_width(tmp_path):
    qt = rtn_tensor(gaussian(8, 4096), GridSpec(3, "sym-full", 64))
    passthrough = {"embed.weight": gaussian(100, 64).half(), "head.bias": torch.zeros(64)}
    acc = bpp_of(tmp_path, qt, passthrough)
    quantized_bits = 8 * 4096 * 3.25
    assert acc["passthrough"]["embed.weight"] == {"numel": 6400, "dtype": "float16", "total_bits": 6400 * 16}
    assert acc["passthrough"]["head.bias"]["total_bits"] == 64 * 32
    assert acc["quantized_bpp"] == 3.25
    assert acc["model_numel"] == 8 * 4096 + 6400 + 64
    assert acc["model_bpp"] == (quantized_bits + 6400 * 16 + 64 * 32) / (8 * 4096 + 6400 + 64)
    only = bpp_of(tmp_path, qt, {})   # passthrough-free: both numbers agree
    assert only["model_bpp"] == only["quantized_bpp"] == 3.25


def test_accounting_reads_the_written_files(tmp_path):
    save_artifact(tmp_path / "art", {"w": rtn_tensor(gaussian(4, 64), GridSpec(4))}, {"b": torch.zeros(3)}, {})
    path = tmp_path / "art" / TENSORS_FILE
    tensors = load_file(path)
    tensors["passthrough/b"] = torch.zeros(3, dtype=torch.float64)       # re-stored wider: counted wider
    save_file(tensors, path)
    assert bit_accounting(tmp_path / "art")["passthrough"]["b"]["total_bits"] == 3 * 64
    tensors["quantized/w/codes"] = tensors["quantized/w/codes"][:-1]     # a truncated code stream
    save_file(tensors, path)
    with pytest.raises(CorruptCheckpointError, match="packed 'quantized/w/codes'"):
        bit_accounting(tmp_path / "art")
    with pytest.raises(CorruptCheckpointError, match="cannot hold exactly"):
        load_artifact(tmp_path / "art")
    document = json.loads((tmp_path / "art" / JSON_FILE).read_text())
    document["version"] = 99
    (tmp_path / "art" / JSON_FILE).write_text(json.dumps(document))
    with pytest.raises(CorruptCheckpointError, match="version 99"):
        bit_accounting(tmp_path / "art")
    with pytest.raises(FileNotFoundError, match="not a quantized artifact"):
        load_artifact(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ on-grid check

def test_assert_on_grid_on_records_and_plain_tensors():
    for name, qt in records().items():
        assert assert_on_grid(qt, name=name) <= 2 ** qt.bits
    out_of_range = QuantizedTensor(codes=torch.full((2, 8), 8, dtype=torch.int32), bits=3,
                                   scale=torch.ones(2, 1), zero=None, implicit_zero=4.0, width=8)
    with pytest.raises(OffGridError, match="codes span"):
        assert_on_grid(out_of_range, name="w")
    # every row holds 4 values (fine per row at 2 bits) but the whole tensor holds 8
    w = torch.arange(8, dtype=torch.float32).reshape(2, 4).repeat_interleave(3, dim=1)
    assert assert_on_grid(w, 2, group_size=-1) == 4
    assert assert_on_grid(w, 2, group_size=6) == 2
    with pytest.raises(OffGridError, match="8 distinct values, more than 2\\^2"):
        assert_on_grid(w, 2, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        assert_on_grid(w, 2, group_size=5)
