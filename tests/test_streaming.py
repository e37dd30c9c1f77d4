"""Streaming checkpoint I/O and delta operations (methods/io/streaming.py, methods/stream.py).

The streamed results must be bit-identical to the in-memory implementations
(``prune_state_dict``, ``merge_state_dicts``) on small random checkpoints sharded into several
files, with chunk sizes that split tensors into many chunks; memory must stay bounded by the
chunk size, not the model size.
"""

import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from methods.io.checkpoint import (WEIGHTS, WEIGHTS_INDEX, CorruptCheckpointError, NonFiniteWeightsError,
                                   align_names, load_state_dict)
from methods.io.streaming import LazyCheckpoint, ShardedWriter, chunk_ranges
from methods.merge import common as mc
from methods.merge.apply import merge_state_dicts
from methods.prune.apply import prune_state_dict
from methods import stream as streaming_ops
from methods.stream import _Buffers, _Selection, _WindowSearch, stream_merge, stream_prune, stream_quantize
from methods import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("ft_b", "ft_a", "ft_c")  # deliberately not sorted


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"tensors differ: {bad}"


def shapes(vocab: int = 50):
    return {
        "model.embed_tokens.weight": (vocab, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.mlp.up_proj.weight": (40, 16),
        "model.layers.1.mlp.down_proj.weight": (16, 40),
        "model.norm.weight": (16,),
        "lm_head.weight": (vocab, 16),
    }


def write_sharded(state: dict, path, shards: int, config: dict | None = None) -> None:
    """A transformers-style checkpoint written by safetensors itself, in ``shards`` files."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(state, path / WEIGHTS, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in group}, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
        (path / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")


def make_zoo(root, dtype=torch.bfloat16, shards=3, majority_negative=False, quantized=True, vocab=50):
    """A base and three fine-tunes: quantised noise (ties in |δ|), exact sign cancellations between
    models (γ = 0 with non-zero trimmed entries), an int buffer and a head only the models have."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes(vocab).items()}
    base["model.position_ids"] = torch.arange(8)
    models = {}
    shared = {k: torch.randint(-4, 5, s, generator=g).float() * 2.0**-7 for k, s in shapes(vocab).items()}
    for i, name in enumerate(NAMES):
        sd = {}
        for k, s in shapes(vocab).items():
            noise = torch.randint(-4, 5, s, generator=g).float() * 2.0**-7 if quantized \
                else 0.01 * torch.randn(s, generator=g)
            if majority_negative:
                noise = -noise.abs() - 2.0**-7 * (torch.rand(s, generator=g) < 0.5)
            if i == 1:  # cancel model 0's noise on a third of the entries
                noise = torch.where(torch.rand(s, generator=g) < 0.33, -shared[k], noise)
            elif i == 0:
                noise = torch.where(torch.rand(s, generator=g) < 0.33, shared[k], noise)
            sd[k] = (base[k].float() + noise).to(dtype)
        sd["model.position_ids"] = torch.arange(8)
        sd["score.weight"] = torch.randn(2, 16, generator=g).to(dtype)  # a head the base lacks
        models[name] = sd
    write_sharded(base, root / "base", shards)
    for name, sd in models.items():
        write_sharded(sd, root / name, shards)
    return base, models


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_zoo")
    base, models = make_zoo(root)
    return root, base, models


# --- LazyCheckpoint / ShardedWriter -------------------------------------------------------------

def test_lazy_checkpoint_reads_what_safetensors_reads(zoo):
    root, base, _ = zoo
    ckpt = LazyCheckpoint(root / "base")
    assert sorted(ckpt.names) == sorted(base)
    ref = load_state_dict(root / "base")
    for name in ckpt.names:
        assert ckpt.dtype(name) == ref[name].dtype and ckpt.shape(name) == ref[name].shape
        assert same_bits(ckpt.get(name), ref[name])
        flat = ref[name].reshape(-1)
        for a, b in chunk_ranges(flat.numel(), 7):
            assert same_bits(ckpt.read(name, a, b), flat[a:b])
    with safe_open(str(ckpt.info("lm_head.weight").file), "pt") as f:
        assert same_bits(ckpt.get("lm_head.weight"), f.get_tensor("lm_head.weight"))
        assert same_bits(ckpt.read("lm_head.weight", 16 * 3, 16 * 9), f.get_slice("lm_head.weight")[3:9].reshape(-1))
    # one file: the directory or the file itself
    single = root / "single"
    write_sharded(base, single, 1)
    assert sorted(LazyCheckpoint(single).names) == sorted(base)
    assert sorted(LazyCheckpoint(single / WEIGHTS).names) == sorted(base)
    with pytest.raises(IndexError):
        ckpt.read("model.norm.weight", 0, 17)


def test_lazy_checkpoint_reports_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        LazyCheckpoint(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"\x10\x00")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        LazyCheckpoint(tmp_path)
    save_file({"a": torch.ones(100)}, tmp_path / WEIGHTS)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        LazyCheckpoint(tmp_path)


def test_sharded_writer_shards_index_template_and_readers(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = {f"t{i}": torch.randn(10, 3 + i, generator=g).to(torch.bfloat16) for i in range(6)}
    state["odd"] = torch.randn(1, generator=g).to(torch.bfloat16)   # misaligns what follows
    state["f32"] = torch.randn(5, generator=g)
    state["ids"] = torch.arange(4)
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4)
    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text("{}")
    (template / "model.safetensors").write_text("not copied")
    (template / "manifest.json").write_text("not copied")
    with ShardedWriter(tmp_path / "out", max_shard_bytes=150, template_dir=template) as writer:
        for name, tensor in state.items():
            if name == "t2":  # chunk by chunk
                sink = writer.tensor(name, tensor.dtype, tensor.shape)
                for a, b in chunk_ranges(tensor.numel(), 7):
                    sink.write(tensor.reshape(-1)[a:b])
                sink.close()
            else:
                writer.add(name, tensor)
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert files == sorted(shards + [WEIGHTS_INDEX, "config.json"])
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        loaded = load_file(out / shard)
        assert sum(t.numel() * t.element_size() for t in loaded.values()) <= 150 or len(loaded) == 1
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert_same_state(load_state_dict(out), state)
    assert_same_state({n: LazyCheckpoint(out).get(n) for n in state}, state)
    # one shard → model.safetensors without an index
    with ShardedWriter(tmp_path / "one") as writer:
        writer.add("a", state["t0"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [WEIGHTS]


def test_sharded_writer_commits_atomically(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(target, max_shard_bytes=8) as writer:
            writer.add("a", torch.ones(4))
            writer.add("b", torch.ones(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []          # nothing left: no target, no temporary
    with ShardedWriter(target) as writer:
        writer.add("a", torch.ones(4))
    before = (target / WEIGHTS).read_bytes()
    with pytest.raises(NonFiniteWeightsError, match="'bad'"):
        with ShardedWriter(target) as writer:
            writer.add("a", torch.zeros(4))
            writer.add("bad", torch.tensor([1.0, float("nan")]))
    assert (target / WEIGHTS).read_bytes() == before  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="needs"):
        with ShardedWriter(tmp_path / "short") as writer:
            sink = writer.tensor("a", torch.float32, (4,))
            sink.write(torch.ones(3))
            sink.close()
    with pytest.raises(RuntimeError, match="not finished"):
        with ShardedWriter(tmp_path / "open") as writer:
            writer.tensor("a", torch.float32, (4,)).write(torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_header_reservation_starts_a_new_shard(tmp_path):
    with ShardedWriter(tmp_path / "out", header_bytes=256) as writer:
        for i in range(12):
            writer.add(f"tensor.with.a.long.name.{i}", torch.full((2,), float(i)))
    out = load_state_dict(tmp_path / "out")
    assert len(json.loads((tmp_path / "out" / WEIGHTS_INDEX).read_text())["weight_map"]) == 12
    assert len(set(json.loads((tmp_path / "out" / WEIGHTS_INDEX).read_text())["weight_map"].values())) > 1
    assert all(float(out[f"tensor.with.a.long.name.{i}"][0]) == i for i in range(12))


# --- exact threshold selection ------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.2, 0.5, 0.013, 0.999, 1 / 3000])
def test_streamed_threshold_equals_kthvalue(density):
    g = torch.Generator().manual_seed(3)
    # many ties, zeros, negative zeros, subnormals and a wide range of exponents
    pieces = [torch.randint(-20, 21, (2, 1000), generator=g).float() * 2.0**-9,
              torch.randn(2, 777, generator=g) * torch.exp2(torch.randint(-40, 10, (2, 777), generator=g).float()),
              torch.zeros(2, 50), -torch.zeros(2, 30), torch.full((2, 20), 1e-40)]
    selection = _Selection(2, density)
    selection.numel = sum(p.shape[1] for p in pieces)
    if selection.needs_search():
        for p in pieces:
            selection.add_hi(p)
        selection.locate()
        for p in pieces:
            selection.add_lo(p)
    got = selection.finish()
    full = torch.cat(pieces, dim=1)
    assert got == [mc.magnitude_threshold(full[t].abs(), density) for t in range(2)]


# --- pruning ------------------------------------------------------------------------------------

def _prune_ref(root, model, method, params, seed, exclude):
    ft = load_state_dict(root / model)
    base = align_names(load_state_dict(root / "base"), ft, "ref")
    return prune_state_dict(base, ft, method, params, seed, exclude)


@pytest.mark.parametrize("params", [
    {"drop_rate": 0.9}, {"drop_rate": 0.5, "rescale": False}, {"drop_rate": 0.0}, {"drop_rate": 1.0},
    {"drop_rate": 0.7, "rescale_rule": "l1-match"},
])
@pytest.mark.parametrize("chunk", [37, 1 << 20])
def test_stream_dare_equals_in_memory(zoo, tmp_path, params, chunk):
    root, _, _ = zoo
    params = registry.get("prune", "dare").resolve(params, "test")
    exclude = [r"norm"]
    want, want_stats = _prune_ref(root, "ft_a", "dare", params, 5, exclude)
    stats = stream_prune(root / "base", root / "ft_a", tmp_path / "out", "dare", params, 5, exclude,
                         chunk_elements=chunk, read_elements=2 * chunk, max_shard_bytes=3000)
    assert_same_state(load_state_dict(tmp_path / "out"), want)
    assert sorted(stats) == sorted(want_stats)
    for name, s in want_stats.items():
        assert stats[name].keys() == s.keys()
        for key, value in s.items():
            assert stats[name][key] == (pytest.approx(value, rel=1e-5, abs=1e-7) if isinstance(value, float) else value)
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert stats["score.weight"] == {"pruned": False, "reason": "absent from base (new head)"}
    assert stats["model.norm.weight"]["reason"] == "excluded by pattern"


def test_stream_prune_other_methods_whole_tensor(zoo, tmp_path):
    root, _, _ = zoo
    params = registry.get("prune", "magnitude").resolve({"drop_rate": 0.8}, "test")
    want, _ = _prune_ref(root, "ft_b", "magnitude", params, 0, [])
    stream_prune(root / "base", root / "ft_b", tmp_path / "out", "magnitude", params, 0, chunk_elements=50)
    assert_same_state(load_state_dict(tmp_path / "out"), want)


def test_stream_prune_output_independent_of_input_layout(zoo, tmp_path):
    root, base, models = zoo
    write_sharded(base, tmp_path / "base1", 1)
    write_sharded(models["ft_a"], tmp_path / "ft1", 2)
    params = registry.get("prune", "dare").resolve({"drop_rate": 0.9}, "test")
    stream_prune(root / "base", root / "ft_a", tmp_path / "x", "dare", params, 1, chunk_elements=100)
    stream_prune(tmp_path / "base1", tmp_path / "ft1", tmp_path / "y", "dare", params, 1, chunk_elements=33)
    assert_same_state(load_state_dict(tmp_path / "x"), load_state_dict(tmp_path / "y"))


def test_stream_prune_refuses_shape_mismatch_before_writing(zoo, tmp_path):
    root, base, models = zoo
    bad = dict(models["ft_a"])
    bad["model.norm.weight"] = torch.ones(17, dtype=torch.bfloat16)
    write_sharded(bad, tmp_path / "bad", 2)
    with pytest.raises(ValueError, match="cannot share a delta"):
        stream_prune(root / "base", tmp_path / "bad", tmp_path / "out", "dare", {"drop_rate": 0.5}, 0)
    assert not (tmp_path / "out").exists()


# --- merging ------------------------------------------------------------------------------------

def _merge_ref(root, method, params, seed=0, exclude=(), models=NAMES):
    loaded = {n: load_state_dict(root / n) for n in models}
    base = align_names(load_state_dict(root / "base"), next(iter(loaded.values())), "ref")
    params = registry.get("merge", method).resolve(params, "test")
    return merge_state_dicts(method, base, loaded, params, seed=seed, exclude=exclude), base


MERGES = [
    ("task-arithmetic", {"scale": 0.7}),
    ("task-arithmetic", {"scale": 1.0}),
    ("average", {}),
    ("ties", {"density": 0.2, "scale": 1.0, "granularity": "model"}),
    ("ties", {"density": 0.35, "scale": 0.8, "granularity": "tensor"}),
    ("ties", {"density": 1.0, "granularity": "model"}),
    ("ties", {"density": 0.0, "granularity": "model"}),
    ("ties", {"density": 0.3, "semantics": "mergekit"}),
    ("dare-ta", {"drop_rate": 0.6, "scale": 0.9}),
    ("dare-ties", {"drop_rate": 0.5, "density": 0.5, "granularity": "tensor"}),
]


@pytest.mark.parametrize("method,params", MERGES)
@pytest.mark.parametrize("chunk", [29, 1 << 20])
def test_stream_merge_equals_in_memory(zoo, tmp_path, method, params, chunk):
    root, _, _ = zoo
    exclude = [r"embed_tokens"]
    (want, want_info), base = _merge_ref(root, method, params, seed=3, exclude=exclude)
    info = stream_merge(method, root / "base", {n: root / n for n in NAMES}, tmp_path / "out", params, seed=3,
                        exclude=exclude, chunk_elements=chunk, read_elements=3 * chunk, max_shard_bytes=2500)
    got = load_state_dict(tmp_path / "out")
    assert_same_state({k: got[k] for k in want}, want)
    # unmerged base tensors are copied; heads only the models have are not written
    assert sorted(set(got) - set(want)) == ["model.embed_tokens.weight", "model.position_ids"]
    assert same_bits(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert info == want_info
    assert (tmp_path / "out" / "config.json").exists()


def test_stream_reads_and_computes_in_separate_buffer_sets(zoo, tmp_path, monkeypatch):
    """Beside a GPU the reads land in host buffers apart from the computation's: with a separate
    host set on the CPU too, every route still gives the in-memory bits (no route computes on
    what it read without copying it where the computation runs, or writes a device buffer)."""
    root, _, _ = zoo
    hosts = []

    def separate_host(self):
        if self._host is None or self._host is self:
            self._host = _Buffers()
            hosts.append(self._host)
        return self._host
    monkeypatch.setattr(_Buffers, "host", property(separate_host))
    exclude = [r"embed_tokens"]
    for i, (method, params) in enumerate([("ties", {"density": 0.2, "granularity": "model"}),
                                          ("ties", {"density": 0.35, "granularity": "tensor"}),
                                          ("task-arithmetic", {"scale": 0.7}), ("dare-ta", {"drop_rate": 0.6})]):
        (want, _), _ = _merge_ref(root, method, params, seed=3, exclude=exclude)
        stream_merge(method, root / "base", {n: root / n for n in NAMES}, tmp_path / f"m{i}", params, seed=3,
                     exclude=exclude, chunk_elements=29, read_elements=87, device="cpu")
        got = load_state_dict(tmp_path / f"m{i}")
        assert_same_state({k: got[k] for k in want}, want)
    params = registry.get("prune", "dare").resolve({"drop_rate": 0.9}, "test")
    want, _ = _prune_ref(root, "ft_a", "dare", params, 5, [])
    stream_prune(root / "base", root / "ft_a", tmp_path / "p", "dare", params, 5, chunk_elements=37,
                 read_elements=74, device="cpu")
    assert_same_state(load_state_dict(tmp_path / "p"), want)
    assert hosts


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("method,params", MERGES)
def test_stream_merge_on_cuda_equals_cpu(zoo, tmp_path, method, params):
    """On a GPU: element-wise merges give the CPU's bits; TIES sums three models, which CUDA may
    reduce in another order (within float32 rounding, so within one bf16 step)."""
    root, _, _ = zoo
    (want, _), _ = _merge_ref(root, method, params, seed=3)
    stream_merge(method, root / "base", {n: root / n for n in NAMES}, tmp_path / "out", params, seed=3,
                 chunk_elements=29, read_elements=87, device="cuda")
    got = load_state_dict(tmp_path / "out")
    if method in streaming_ops.ELEMENTWISE_MERGES:
        assert_same_state({k: got[k] for k in want}, want)
    else:
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-2, atol=1e-2)


@cuda
@pytest.mark.parametrize("params", [{"drop_rate": 0.9}, {"drop_rate": 0.7, "rescale_rule": "l1-match"}])
def test_stream_dare_on_cuda_equals_cpu(zoo, tmp_path, params):
    """DARE on a GPU: the masks come from the CPU generator, the arithmetic is element-wise."""
    root, _, _ = zoo
    params = registry.get("prune", "dare").resolve(params, "test")
    want, _ = _prune_ref(root, "ft_a", "dare", params, 5, [])
    stream_prune(root / "base", root / "ft_a", tmp_path / "out", "dare", params, 5, device="cuda")
    assert_same_state(load_state_dict(tmp_path / "out"), want)


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_stream_ties_majority_negative(tmp_path, granularity):
    """The majority sign is −1 and γ = 0 entries with non-zero trimmed values exist, so the
    elements merged with majority +1 must be patched once the vote is complete."""
    base, models = make_zoo(tmp_path, dtype=torch.float32, shards=2, majority_negative=True)
    params = {"density": 0.5, "granularity": granularity}
    (want, _), _ = _merge_ref(tmp_path, "ties", params)
    trimmed_total = 0
    ref_base = load_state_dict(tmp_path / "base")
    names = sorted(NAMES)
    keys = [k for k in ref_base if ref_base[k].is_floating_point()]
    loaded = [load_state_dict(tmp_path / n) for n in names]
    stacks = {k: mc.stack_deltas(ref_base, loaded, k) for k in keys}
    thresholds = [mc.magnitude_threshold(torch.cat([stacks[k][t].abs().reshape(-1) for k in keys]), 0.5)
                  for t in range(3)]
    ambiguous = 0
    for k in keys:
        trimmed = torch.stack([mc.trim_to_threshold(stacks[k][t], thresholds[t]) for t in range(3)])
        gamma = mc.elect_sign(trimmed)
        trimmed_total += int(gamma.sum())
        ambiguous += int(((gamma == 0) & (trimmed != 0).any(dim=0)).sum())
    assert trimmed_total < 0 and ambiguous > 0
    stream_merge("ties", tmp_path / "base", {n: tmp_path / n for n in NAMES}, tmp_path / "out", params,
                 chunk_elements=41, read_elements=82)
    got = load_state_dict(tmp_path / "out")
    assert_same_state({k: got[k] for k in want}, want)


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("mode", ["window", "tiny-sample", "miss"])
def test_stream_ties_window_and_histogram_fallback(tmp_path, monkeypatch, granularity, mode):
    """The one-pass window search and the histogram passes it falls back to (when a window, from
    a sample of 8 values or deliberately misplaced, misses the threshold) give the in-memory
    result."""
    root = tmp_path / "smooth"   # Gaussian deltas, all sampled: a window from the sample can hit
    make_zoo(root, dtype=torch.float32, shards=2, quantized=False, vocab=4000)
    monkeypatch.setattr(_WindowSearch, "SAMPLE_STRIDE", 1)
    params = {"density": 0.3, "granularity": granularity}
    (want, _), _ = _merge_ref(root, "ties", params)
    outcomes = []
    resolve = _WindowSearch.resolve
    monkeypatch.setattr(_WindowSearch, "resolve", lambda self: outcomes.append(resolve(self)) or outcomes[-1])
    if mode == "tiny-sample":
        monkeypatch.setattr(_WindowSearch, "CAP", 8)
    if mode == "miss":
        set_window = _WindowSearch.set_window

        def shifted(self):
            set_window(self)
            self.lo_bits = torch.full_like(self.lo_bits, 0x7F800000)   # [inf, inf]: above every threshold
            self.hi_bits = self.lo_bits.clone()
        monkeypatch.setattr(_WindowSearch, "set_window", shifted)
    stream_merge("ties", root / "base", {n: root / n for n in NAMES}, tmp_path / "out", params, chunk_elements=5000,
                 read_elements=10000)
    got = load_state_dict(tmp_path / "out")
    assert_same_state({k: got[k] for k in want}, want)
    assert outcomes
    if mode != "tiny-sample":
        assert all((o is not None) == (mode == "window") for o in outcomes)


def test_stream_merge_vocabulary_rows_sliced_like_in_memory(zoo, tmp_path):
    root, base, models = zoo
    g = torch.Generator().manual_seed(9)
    bigger = dict(models["ft_c"])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        bigger[k] = torch.cat([models["ft_c"][k], torch.randn(3, 16, generator=g).to(torch.bfloat16)])
    write_sharded(bigger, tmp_path / "ft_c", 2)
    for n in ("ft_a", "ft_b"):
        write_sharded(models[n], tmp_path / n, 2)
    write_sharded(base, tmp_path / "base", 1)
    (want, want_info), _ = _merge_ref(tmp_path, "task-arithmetic", {"scale": 0.5})
    info = stream_merge("task-arithmetic", tmp_path / "base", {n: tmp_path / n for n in NAMES}, tmp_path / "out",
                        {"scale": 0.5}, chunk_elements=64)
    got = load_state_dict(tmp_path / "out")
    assert_same_state({k: got[k] for k in want}, want)
    assert info["vocab_aligned"] == want_info["vocab_aligned"] != {}


def test_stream_merge_refuses_unstreamable(zoo, tmp_path):
    root, _, _ = zoo
    with pytest.raises(NotImplementedError, match="soup-greedy"):
        stream_merge("soup-greedy", root / "base", {n: root / n for n in NAMES}, tmp_path / "out")
    with pytest.raises(NotImplementedError, match="granularity"):
        stream_merge("dare-ties", root / "base", {n: root / n for n in NAMES}, tmp_path / "out",
                     {"granularity": "model"})
    assert not (tmp_path / "out").exists()


# --- bounded memory -----------------------------------------------------------------------------

def _peak_buffer_bytes(monkeypatch, run) -> int:
    """Peak of the bytes held by every live ``_Buffers`` set (reader slots and kernel buffers)
    while ``run()`` streams."""
    import methods.stream as stream

    live, peak = [0], [0]
    original = stream._Buffers.__call__

    def counting(self, tag, shape, dtype):
        before = sum(t.numel() for t in self._store.values())
        out = original(self, tag, shape, dtype)
        grown = sum(t.numel() for t in self._store.values()) - before
        if grown:
            live[0] += grown
            peak[0] = max(peak[0], live[0])
            weakref.finalize(self, lambda n=grown: live.__setitem__(0, live[0] - n))
        return out

    monkeypatch.setattr(stream._Buffers, "__call__", counting)
    run()
    return peak[0]


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.2, "granularity": "model"}),
                                           ("ties", {"density": 0.2, "granularity": "tensor"}),
                                           ("task-arithmetic", {})])
def test_buffers_do_not_grow_with_the_model(tmp_path, monkeypatch, method, params):
    """The same chunk size streams a model 6 times larger with the same buffers (the small
    model's large tensors already span more reads than the reader keeps in flight)."""
    small, large = tmp_path / "small", tmp_path / "large"
    for root, vocab in ((small, 800), (large, 6400)):
        g = torch.Generator().manual_seed(0)
        base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes(vocab).items()}
        write_sharded(base, root / "base", 2)
        for name in NAMES:
            write_sharded({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                           for k, v in base.items()}, root / name, 2)
    # one worker thread: how many threads a pool of several has spawned depends on timing, and
    # each holds its own scratch (a loaded machine once made the small run spawn one of two)
    peaks = [_peak_buffer_bytes(monkeypatch, lambda r=root: stream_merge(
        method, r / "base", {n: r / n for n in NAMES}, r / "out", params, chunk_elements=256, read_elements=512,
        workers=1))
        for root in (small, large)]
    sizes = [sum(LazyCheckpoint(r / n).total_bytes for n in ("base",) + NAMES) for r in (small, large)]
    assert sizes[1] > 6 * sizes[0]
    assert 0 < peaks[1] <= peaks[0] * 1.1, (peaks, sizes)   # 6.5 times the data, the same buffers


def test_dare_buffers_do_not_grow_with_the_model(zoo, tmp_path, monkeypatch):
    root, base, models = zoo
    big = tmp_path / "big"
    write_sharded({k: v.repeat(8, *([1] * (v.dim() - 1))) if v.is_floating_point() else v for k, v in base.items()},
                  big / "base", 2)
    write_sharded({k: v.repeat(8, *([1] * (v.dim() - 1))) if v.is_floating_point() and k in base else v
                   for k, v in models["ft_a"].items()}, big / "ft", 2)
    params = {"drop_rate": 0.9, "rescale": True, "rescale_rule": "inverse-keep"}
    peaks = [_peak_buffer_bytes(monkeypatch, lambda b=b, f=f, o=o: stream_prune(b, f, o, "dare", params, 0,
                                                                                chunk_elements=128,
                                                                                read_elements=256))
             for b, f, o in ((root / "base", root / "ft_a", tmp_path / "o1"),
                             (big / "base", big / "ft", tmp_path / "o2"))]
    assert 0 < peaks[1] <= peaks[0] * 1.3, peaks   # 8 times the data, (about) the same buffers


def test_streaming_rss_stays_flat(tmp_path):
    """Streaming a 400 MB pair (base + one fine-tune, 200 MB each in bf16) grows the process's
    peak RSS by far less than one checkpoint (the in-memory path needs both plus float32 copies)."""
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=g).to(torch.bfloat16) for i in range(6)}
    state["embed.weight"] = torch.randn(800, 2048, generator=g).to(torch.bfloat16)
    write_sharded(state, tmp_path / "base", 2)
    for k in state:
        state[k] = (state[k].float() + 1e-3).to(torch.bfloat16)
    write_sharded(state, tmp_path / "ft", 2)
    del state
    script = textwrap.dedent(f"""
        import resource, sys, time, torch
        sys.path.insert(0, {REPO!r})
        from methods.stream import stream_prune, stream_merge

        def rss(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

        def measure(fn):
            try:  # reset the peak RSS (VmHWM) to the current RSS
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            before = rss("VmRSS:")
            fn()
            return rss("VmHWM:") - before

        torch.ones(1) + 1
        print(measure(lambda: stream_prune({str(tmp_path / 'base')!r}, {str(tmp_path / 'ft')!r},
                                           {str(tmp_path / 'p')!r}, "dare",
                                           {{"drop_rate": 0.9, "rescale": True, "rescale_rule": "inverse-keep"}}, 0,
                                           max_shard_bytes=60_000_000, chunk_elements=1 << 18, read_elements=1 << 18)))
        print(measure(lambda: stream_merge("ties", {str(tmp_path / 'base')!r}, {{"ft": {str(tmp_path / 'ft')!r}}},
                                           {str(tmp_path / 'm')!r}, {{"density": 0.2}}, max_shard_bytes=60_000_000,
                                           chunk_elements=1 << 18, read_elements=1 << 18)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = [int(x) for x in result.stdout.split()[-2:]]
    # fixed whatever the model size (test_buffers_do_not_grow_with_the_model): the direct-I/O
    # read-ahead windows (2 x 8 MiB per input) and staging buffers (2 x 4 MiB), the per-job slots
    # and per-worker scratch of chunks of 256K elements (1 MB per float32 buffer), the TIES window
    # histogram (8 MB per model), allocator arenas of the threads: 60-110 MB. One checkpoint is
    # 200 MB, its float32 copy 400 MB.
    assert max(growth) < 200e6, f"peak RSS grew by {[g / 1e6 for g in growth]} MB while streaming 2 x 200 MB"
    assert len(LazyCheckpoint(tmp_path / "p").names) == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_on_bits(dtype):
    from methods.io.streaming import all_finite

    x = torch.tensor([0.0, -0.0, 1.0, -3.5, 1e-30, 6e4], dtype=torch.float32).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[3] = bad
        assert not all_finite(y)


def test_branch_free_selections_equal_torch_where():
    from methods.stream import _masked, _trim_

    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.0, -3.0, 2.0**-9, -(2.0**-9)]),
                   torch.randn(1000, generator=g) * 1e-3, torch.randint(-3, 4, (37,), generator=g) * 2.0**-9])
    for threshold in (None, 0.0, 1e-45, 2.0**-9, 1e-3, 3.0, float("inf")):
        assert same_bits(_trim_(x.clone(), threshold), mc.trim_to_threshold(x, threshold)), threshold
    for n in (0, 1, 7, 8, 9, 64, 1037):
        mask = torch.rand(n, generator=g) < 0.05
        values = torch.randn(3, n, generator=g)
        assert torch.equal(_masked(values, mask), values[:, mask])
        assert torch.equal(_masked(values[1], mask), values[1][mask])
        shifted = torch.zeros(n + 3, dtype=torch.bool)[3:]   # a mask that is not 8-byte aligned
        shifted.copy_(mask)
        assert torch.equal(_masked(values, shifted), values[:, mask])


def test_branch_free_where_equal_and_count_equal_torch():
    from methods.stream import _count_nonzero, _where_equal_

    g = torch.Generator().manual_seed(5)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e-45, 1e-38, 3.0, -3.0, 3.0e38, -3.0e38, 2.0**-9])
    a = torch.cat([special.repeat_interleave(len(special)), torch.randn(997, generator=g)])
    b = torch.cat([special.repeat(len(special)), a[-997:].clone()])
    b[-997::3] = torch.randn(333, generator=g)              # a == b on two thirds of the random part
    a[-5:], b[-5:] = torch.tensor([1e-45] * 5), torch.tensor([1e-45 / 0.8] * 5)  # subnormals that round equal
    x, out = torch.randn(a.numel(), generator=g), torch.randn(a.numel(), generator=g)
    x[:50], out[50:100] = -0.0, -0.0
    want = torch.where(a == b, x, out)
    assert same_bits(_where_equal_(out.clone(), a, b, x, torch.empty_like(a)), want)
    for values in (a, b, x, torch.zeros(9), -torch.zeros(9), torch.empty(0)):
        assert _count_nonzero(values, torch.empty_like(values)) == int(torch.count_nonzero(values))


def test_stream_merge_output_independent_of_model_order_and_layout(zoo, tmp_path):
    root, base, models = zoo
    for n in NAMES:
        write_sharded(models[n], tmp_path / n, 1)
    params = {"density": 0.2, "granularity": "model"}
    stream_merge("ties", root / "base", {n: root / n for n in NAMES}, tmp_path / "x", params, chunk_elements=50)
    stream_merge("ties", root / "base", {n: tmp_path / n for n in reversed(NAMES)}, tmp_path / "y", params,
                 chunk_elements=77)
    x, y = tmp_path / "x", tmp_path / "y"
    assert sorted(p.name for p in x.iterdir()) == sorted(p.name for p in y.iterdir())
    for p in x.iterdir():   # same bytes: the output layout follows the base, not the models
        assert p.read_bytes() == (y / p.name).read_bytes(), p.name


def test_sharded_writer_patch(tmp_path):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(300_000, generator=g).to(torch.bfloat16)
    b = torch.randn(1000, generator=g)
    with ShardedWriter(tmp_path / "out", max_shard_bytes=10_000) as writer:
        writer.add("a", a)
        writer.add("b", b)                     # the open shard
        dense = torch.arange(1000, 1500)       # a dense run: read-modify-write
        sparse = torch.tensor([0, 70_000, 299_999])
        index = torch.cat([dense, sparse]).sort().values
        writer.patch("a", index, torch.full((index.numel(),), 7.0).to(torch.bfloat16))
        writer.patch("b", torch.tensor([3, 999]), torch.tensor([1.5, -2.5]))
        with pytest.raises(ValueError, match="indices"):
            writer.patch("b", torch.tensor([3]), torch.tensor([1.5, 2.0]))
    got = load_state_dict(tmp_path / "out")
    a[index] = 7.0
    b[torch.tensor([3, 999])] = torch.tensor([1.5, -2.5])
    assert same_bits(got["a"], a) and same_bits(got["b"], b)


# --- delta quantization -------------------------------------------------------------------------

QUANTIZERS = [
    ("rtn", {"bits": 3, "scheme": "asym", "group_size": 16}),
    ("rtn", {"bits": 4, "scheme": "sym-full", "group_size": -1, "mse_clip": True}),
    ("statsq", {"bits": 2}),
    ("nupes", {"bits": 4, "mode": "data-free", "exponent_scope": "layer"}),
]


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama fine-tune and its base as bf16 checkpoints of several shards."""
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("quant_pair")
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(root / "ft", max_shard_size="20KB")
    g = torch.Generator().manual_seed(1)
    base = {k: (v.float() - 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in model.state_dict().items()}
    write_sharded(base, root / "base", 2)
    return root


@pytest.mark.parametrize("method,params", QUANTIZERS)
@pytest.mark.parametrize("target", ["delta", "weights"])
def test_stream_quantize_equals_quantize_model_and_save_artifact(llama_pair, tmp_path, method, params, target):
    from transformers import AutoModelForCausalLM

    from methods.quantize.apply import quantizable, quantizable_names, quantize_model
    from methods.quantize.artifact import artifact_hash, bit_accounting, load_artifact, save_artifact

    root = llama_pair
    assert len(list((root / "ft").glob("*.safetensors"))) > 1
    params = registry.get("quantize", method).resolve(params, "test")
    model = AutoModelForCausalLM.from_pretrained(root / "ft", dtype=torch.float32)
    names = quantizable(model, exclude=[r"\.0\.mlp\.down"])
    assert quantizable_names(root / "ft", exclude=[r"\.0\.mlp\.down"]) == names   # from the config alone
    base = align_names(load_state_dict(root / "base"), model.state_dict(), "ref") if target == "delta" else None
    quantized = quantize_model(model, method, params, target=target, base=base, exclude=[r"\.0\.mlp\.down"], seed=2)
    metadata = {"method": method, "target": target}
    want = save_artifact(tmp_path / "ref", quantized, load_state_dict(root / "ft"), metadata)
    got = stream_quantize(root / "ft", tmp_path / "out", method, params, names, metadata=metadata, seed=2,
                          base=root / "base" if target == "delta" else None, read_elements=100)
    assert got == want == bit_accounting(tmp_path / "out")
    assert artifact_hash(tmp_path / "out") == artifact_hash(tmp_path / "ref")
    records, passthrough, meta = load_artifact(tmp_path / "out")
    ref_records, ref_passthrough, ref_meta = load_artifact(tmp_path / "ref")
    assert meta == ref_meta and sorted(records) == sorted(names) and list(records) == list(ref_records)
    assert_same_state(passthrough, ref_passthrough)
    for name, record in records.items():
        assert same_bits(record.dequantize(), ref_records[name].dequantize())


def test_stream_quantize_refuses_what_cannot_stream(llama_pair, tmp_path):
    root = llama_pair
    name = "model.layers.0.self_attn.q_proj.weight"
    for method, params in [("gptq", {}), ("nupes", {"exponent_scope": "global"}), ("nupes", {"mode": "data-driven"})]:
        with pytest.raises(NotImplementedError, match="cannot stream"):
            stream_quantize(root / "ft", tmp_path / "x", method, params, [name])
    with pytest.raises(KeyError, match="no tensors"):
        stream_quantize(root / "ft", tmp_path / "x", "rtn", {}, ["model.layers.9.mlp.up_proj.weight"])
    write_sharded({k: v for k, v in load_state_dict(root / "base").items() if k != name}, tmp_path / "nobase", 1)
    with pytest.raises(KeyError, match="delta against"):
        stream_quantize(root / "ft", tmp_path / "x", "rtn", {}, [name], base=tmp_path / "nobase")
    assert not (tmp_path / "x").exists()
