"""Streaming delta operations: prune, merge and quantize checkpoints of any size in bounded memory.

``stream_prune`` is ``methods.prune.apply.prune_state_dict`` followed by ``save_like``,
``stream_merge`` is ``methods.merge.apply.merge_state_dicts`` followed by writing the merged
tensors, and ``stream_quantize`` is ``methods.quantize.apply.quantize_model`` followed by
``save_artifact`` (for quantizers that need nothing but the target: RTN, StatsQ, NUPES
data-free, one target at a time, in float32, the rest copied block by block into an
``ArtifactWriter``). The first two read the inputs block by block (``read_elements`` per
tensor and input) from sharded safetensors (``methods.io.streaming.LazyCheckpoint``), compute on
chunks of ``chunk_elements`` and write the output shard by shard, atomically (``ShardedWriter``). Memory is
a fixed set of reused buffers sized by those two numbers — a few tens of MB — whatever the model
size. A reader thread reads the next blocks and prepares them (task arithmetic: float32
conversion; DARE: its random numbers come from a third thread) while the main thread computes and
writes the current one; TIES, whose arithmetic outweighs the reading, computes whole blocks in
``workers`` threads at once (``compute_workers``) and the main thread only writes them, in order.
Every intermediate lives in a reused buffer (``_Buffers``), because fresh tensors per chunk make
the allocator return memory to the system and fault it in again, which costs more than the
arithmetic. Reading and writing go through ``O_DIRECT`` where the file system has it
(``methods.io.direct``): a streamed file is read once, so filling the page cache is pure cost.

Results are bit-identical to the in-memory implementations (tests/test_streaming.py compares
them on sharded random checkpoints with chunk sizes that split every tensor): the per-tensor math
is the in-memory code's, either called on whole tensors or re-expressed with float32 operations
that give the same bits (in-place, or integer/float arithmetic instead of boolean masks, which
are several times slower on CPU; each such rewrite says why it is exact):

* ``stream_prune`` with ``dare`` (``inverse-keep`` rescale or DropOnly): chunked. A tensor's mask
  is ``torch.rand(shape, generator=cpu_generator("dare-mask", seed, name)) >= p``; the CPU
  generator is sequential, so drawing the flat tensor block after block from one generator gives
  the same numbers as one draw. Every other prune method (and ``l1-match``, whose rescale is a
  float32 sum over the whole tensor) calls ``prune_state_dict`` on one whole tensor at a time:
  memory is then bounded by the largest tensor, not by the model.
* ``stream_merge``: ``task-arithmetic`` and ``average`` are element-wise, computed chunk by chunk.
  ``ties`` (``semantics: paper``) is streamed exactly at both granularities. The trim threshold
  of each task vector — the ``keep_count``-th largest |δ| over the whole model (``granularity:
  model``) or one tensor (``tensor``) — comes from a window search (``_WindowSearch``): a sample
  pass over a small part of the data (~4M values) brackets it, one full pass counts the |δ|
  above the window and histograms the float32 bit patterns inside it (non-negative floats order like their bits), and
  the threshold is read off exactly — or, if it fell outside the window, from the exact two-pass
  radix selection (``_Selection``). The merge pass then trims, elects, takes the disjoint mean
  and writes; since the majority sign that breaks γ = 0 is only known at the end of that pass,
  chunks are merged with majority +1 and the few elements whose value depends on it (Σ τ̂ = 0
  with non-zero τ̂) are spilled to a temporary file and rewritten in place
  (``ShardedWriter.patch``) if the majority turns out −1. A tensor that fits one read block
  (``granularity: tensor``) gets its thresholds in memory. ``ties`` with ``semantics:
  mergekit``, ``dare-ta`` and ``dare-ties`` (per tensor) run the registered function on one whole
  tensor at a time; so does every method on tensors of at most one chunk.

Module placement: the drivers span the prune and merge packages (and, later, delta
quantization); ``methods.prune`` must not import ``methods.merge`` (prune/common.py), so they live
in this top-level module instead of inside either package.

Outputs: ``stream_prune`` writes every tensor of the fine-tuned model (pruned or kept) plus the
fine-tuned model's config/tokenizer files, like the prune rule. ``stream_merge`` writes the merged
tensors in the base's dtypes and, with ``keep_unmerged`` (default), the base's value of every other
base tensor (names aligned to the models' as ``align_names`` does) plus the base's (or
``template_dir``'s) config files, so the output is a complete checkpoint; the returned info is
``merge_state_dicts``' info. Tensors are written in the base's (prune: the fine-tuned model's)
storage order, so the output's bytes do not depend on the models' shard layout or order.

Differences: statistics of chunked DARE tensors are combined from the chunks (max exact; norms as
the square root of the float64 sum of squared chunk norms; keep fraction from exact counts), so
they can differ from ``prune_state_dict``'s in the last digits; the weights do not. Inputs must be
finite (the rewrites assume it; a NaN would reach the output and be refused by the writer, where
the in-memory TIES would silently trim it away).

Devices: ``device="cuda"`` runs the float32 arithmetic on a GPU; reading, the DARE mask
generator (a CPU generator, so masks do not depend on the device) and writing stay on the CPU.
Each ``_Buffers`` set then holds its scratch on the GPU and, beside it, page-locked host buffers
that the reads land in and the results are copied to before they are written. Chunks are larger
there (``ACCELERATOR_CHUNK_ELEMENTS``): a GPU spends per chunk on kernel launches and
synchronisations what a CPU spends on cache misses. Every operation of the chunk kernels is an
IEEE float32 operation or integer/bit arithmetic, which CUDA rounds as the CPU does (divisions
by a tensor: CUDA turns x / c for a Python number c into x · (1/c), ``methods.device.divide``), so a GPU
gives the CPU's bits wherever a sum runs over at most two terms in a fixed order (DARE, task
arithmetic of up to two models); sums over more models may be reduced in another order there
(tests/test_streaming.py checks CUDA against the CPU where a GPU is present).

Threads: the functions leave ``torch.set_num_threads`` alone. On a 2-core machine one torch
thread plus the reader thread is the fast configuration (bench/README.md); TIES's ``workers``
default fills the cores the process may use with torch threads (two on a 2-core machine with one
torch thread each).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from methods import registry
from methods.device import divide
from methods.io.checkpoint import align_names
from methods.io.streaming import DEFAULT_SHARD_BYTES, LazyCheckpoint, ShardedWriter, chunk_ranges
from methods.merge import common as mc
from methods.merge.apply import _RESERVED, VOCAB_RULES, _select
from methods.prune.apply import excluded, prune_state_dict
from methods.prune.common import RESCALE_RULES, check_drop_rate
from methods.seeding import cpu_generator

DEFAULT_CHUNK_ELEMENTS = 1 << 18    # 1 MiB of float32 per intermediate: the working set stays in cache
DEFAULT_READ_ELEMENTS = 1 << 18     # elements per read (512 KiB of bf16 per input): buffers stay in cache
DEFAULT_PREFETCH = 2                # reads ahead of the computation, in the reader thread
# TIES jobs go to a pool of worker threads: fewer, larger jobs (4 chunks each) spend less on
# futures and GIL hand-offs (at 1B: 11.4-12.6 s against 13.4-14.4 s with one chunk per job)
TIES_READ_ELEMENTS = 1 << 20
# On a GPU each chunk is one read and a few dozen kernel launches (~10 µs each) plus a few
# synchronisations: 4M elements (16 MiB of float32 per intermediate) keep that overhead small
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22

# merge methods whose result at an element depends only on that element of the inputs
ELEMENTWISE_MERGES = ("task-arithmetic", "average")
# merge methods whose result for a tensor depends only on that tensor (whole-tensor route)
PER_TENSOR_MERGES = ("dare-ta", "ties", "dare-ties")

_F32 = torch.float32
_ABS_BITS = 0x7FFFFFFF


# --- branch-free float32 selections (CPU ``torch.where`` with a random mask mispredicts branches
# and runs ~10x slower than integer operations that give the same bits) ----------------------

def _f32_bits(value: float) -> int:
    """The bit pattern of a float32 value as a signed int32."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _trim_(x: torch.Tensor, threshold: float | None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """In place: ``trim_to_threshold(x, threshold)`` = where(|x| >= threshold, x, +0.0) for finite
    float32 ``x`` and threshold ≥ 0 (or None = keep all, +inf = keep none). For non-negative
    floats the order of the bit patterns is the order of the values, so |x| < threshold is the
    sign of (bits(|x|) − bits(threshold)). ``scratch``: an int32 buffer of x's shape."""
    if threshold is None:
        return x
    bits = x.view(torch.int32)
    drop = bits.bitwise_and(_ABS_BITS) if scratch is None else torch.bitwise_and(bits, _ABS_BITS, out=scratch)
    drop.sub_(_f32_bits(threshold)).bitwise_right_shift_(31)          # -1 where |x| < threshold
    bits.bitwise_and_(drop.bitwise_not_())
    return x


def _where_equal_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor,
                  scratch: torch.Tensor) -> torch.Tensor:
    """In place: ``out = torch.where(a == b, x, out)`` for finite float32 tensors (``scratch``: a
    float32 buffer of their size), without a boolean mask (``eq`` + ``where`` cost ~2x more on
    CPU). For finite floats a − b is ±0 exactly when a == b (gradual underflow; torch leaves
    flush-to-zero off) and ±1 after ``sign`` otherwise; shifting out the sign bit and the
    exponent's top bit turns the bits of ±1.0 (0x3F800000 | sign) into −1 and ±0 into 0: the mask
    of a != b. Then out = x ^ ((x ^ out) & mask) selects bit patterns, so signed zeros are kept."""
    mask = torch.sign(torch.sub(a, b, out=scratch), out=scratch).view(torch.int32)
    mask.bitwise_left_shift_(2).bitwise_right_shift_(31)
    bits, x_bits = out.view(torch.int32), x.view(torch.int32)
    bits.bitwise_xor_(x_bits).bitwise_and_(mask).bitwise_xor_(x_bits)
    return out


def _count_nonzero(x: torch.Tensor, scratch: torch.Tensor) -> int:
    """``torch.count_nonzero(x)`` for finite float32 ``x`` (``scratch``: a float32 buffer of its
    size): the float32 sum of |sign(x)|. ``count_nonzero`` branches on every element and runs
    ~6x slower on a sparse random pattern such as a DARE mask; the sum of up to 2^24 ones is exact."""
    if x.numel() > 1 << 24:
        return int(torch.count_nonzero(x))
    return int(torch.sign(x, out=scratch).abs_().sum())


def _masked(values: torch.Tensor, mask: torch.Tensor, ws: "_Buffers | None" = None, tag: str = "") -> torch.Tensor:
    """``values[..., mask]`` for a sparse 1-D ``mask`` over the last axis: finds the non-zero
    8-byte words of the mask first, so the cost is a scan of n/8 words plus the hits. With ``ws``
    the intermediates and the result live in its buffers (``tag`` names them): the result is valid
    until the next call with the same tag."""
    n = mask.numel()
    head = n - n % 8
    if mask.storage_offset() % 8:
        mask = mask.clone()
    lead = values.shape[:-1]
    parts = []
    if head:
        words = mask[:head].view(torch.int64)
        index = torch.nonzero(words).squeeze(1)   # small: the hits' words
        if index.numel():
            grouped = values[..., :head].reshape(*lead, head // 8, 8)
            dim = grouped.dim() - 2
            block_mask = mask[:head].view(head // 8, 8)
            if ws is None:
                blocks, block_mask = grouped.index_select(dim, index), block_mask.index_select(0, index)
                parts.append(torch.masked_select(blocks, block_mask).view(*lead, -1))
            else:
                shape = (*lead, index.numel(), 8)
                blocks = torch.index_select(grouped, dim, index, out=ws("masked_blocks" + tag, shape, values.dtype))
                block_mask = torch.index_select(block_mask, 0, index,
                                                out=ws("masked_mask" + tag, (index.numel(), 8), torch.bool))
                hits = int(torch.count_nonzero(block_mask))
                out = ws("masked_out" + tag, (*lead, hits), values.dtype)
                parts.append(torch.masked_select(blocks, block_mask, out=out.view(-1)).view(*lead, hits))
    if head < n:
        parts.append(values[..., head:][..., mask[head:]])
    if not parts:  # a fresh tensor: a view would keep the whole chunk alive
        return torch.empty((*lead, 0), dtype=values.dtype, device=values.device)
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _spec(family: str, name: str) -> registry.MethodSpec:
    """The registered method; importing only its family's package (``registry.get`` imports every
    family, transformers included, which costs a streaming job seconds and ~70 MB)."""
    import methods.merge  # noqa: F401  (registers the merge methods)
    import methods.prune  # noqa: F401  (registers the prune methods)

    if family == "quantize":
        import methods.quantize  # noqa: F401  (registers the quantizers)
    return registry._REGISTRY[family].get(name) or registry.get(family, name)


def _default_chunk(device: torch.device) -> int:
    return DEFAULT_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def _block_size(chunk_elements: int, read_elements: int | None, device: torch.device) -> int:
    """Elements per read: a multiple of the chunk (fewer, larger reads and thread hand-offs)."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be ≥ 1, got {chunk_elements}")
    if read_elements is None:
        read_elements = DEFAULT_READ_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, read_elements // chunk_elements) * chunk_elements


def _sub_ranges(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) in consecutive ranges of at most ``chunk`` (one empty range if empty)."""
    return [(a, min(stop, a + chunk)) for a in range(start, stop, chunk)] or [(start, stop)]


class _Buffers:
    """Reusable buffers, by tag: allocated once at the largest size asked for and handed out as
    views. The per-chunk kernels take every intermediate from here; fresh tensors for each chunk
    make glibc's allocator return memory to the system and fault it in again, chunk after chunk,
    which costs more than the arithmetic. A tag must name one live value at a time.

    The buffers live on ``device`` (the computation's); ``host`` is the CPU set beside them (the
    same set on the CPU; page-locked memory beside a GPU, so that copies to it are fast), for
    what is read, drawn by a CPU generator or written out."""

    def __init__(self, device: torch.device | str = "cpu", *, pinned: bool = False):
        self.device = torch.device(device)
        self.pinned = pinned
        self._store: dict[str, torch.Tensor] = {}
        self._last: dict[str, tuple] = {}   # per tag: (shape, dtype, the view last handed out)
        self._host = self if self.device.type == "cpu" else None

    @property
    def host(self) -> "_Buffers":
        if self._host is None:
            self._host = _Buffers(pinned=True)
        return self._host

    def __call__(self, tag: str, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        last = self._last.get(tag)
        if last is not None and last[0] == shape and last[1] == dtype:
            return last[2]   # a dict lookup instead of three tensor calls: chunks repeat their shapes
        nbytes = math.prod(shape) * dtype.itemsize
        store = self._store.get(tag)
        if store is None or store.numel() < nbytes:
            store = self._store[tag] = torch.empty(max(nbytes, 8), dtype=torch.uint8, device=self.device,
                                                   pin_memory=self.pinned)
        view = store[:nbytes].view(dtype).view(shape)
        self._last[tag] = (shape, dtype, view)
        return view

    def read(self, checkpoint: LazyCheckpoint, tag: str, name: str, start: int, stop: int) -> torch.Tensor:
        """``checkpoint.read`` into this set's host buffer ``tag``."""
        size = checkpoint.info(name).itemsize
        return checkpoint.read(name, start, stop, out=self.host(tag, (stop - start) * size, torch.uint8))

    def to_host(self, tensor: torch.Tensor, tag: str = "host_out") -> torch.Tensor:
        """``tensor`` on the CPU: itself there, else a copy in the host buffer ``tag``."""
        if tensor.device.type == "cpu":
            return tensor
        return self.host(tag, tensor.shape, tensor.dtype).copy_(tensor)


class _ThreadBuffers:
    """One ``_Buffers`` set per thread, for the scratch of the chunks a thread computes (the
    per-job sets of ``_prefetch`` hold only what outlives the computation); dropped with this
    object and the threads."""

    def __init__(self, device: torch.device | str = "cpu"):
        self._local = threading.local()
        self.device = device

    def __call__(self) -> _Buffers:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = _Buffers(self.device)
        return buffers


def _prefetch(jobs: Iterable, read: Callable, depth: int, prepare: Callable | None = None,
              workers: int = 1, device: torch.device | str = "cpu") -> Iterator[tuple]:
    """(job, result) in job order, with up to ``depth`` jobs running ahead of the consumer.

    ``read(job, buffers)`` runs in one reader thread, job after job, so each file is read front
    to back; without ``prepare`` the result is what it returns. With ``prepare``, the result is
    ``prepare(job, read's result, buffers)``, run in a pool of ``workers`` threads (torch releases
    the GIL, so the chunks of several jobs are computed at once). ``buffers`` is one of depth + 2
    ``_Buffers`` sets used in turn: a set is reused only after the consumer has moved past the job
    that was read into it. The sets compute on ``device`` (reads land in their host buffers)."""
    jobs = iter(jobs)
    slots = [_Buffers(device) for _ in range(max(depth, 0) + 2)]
    if depth <= 0:
        for job in jobs:
            result = read(job, slots[0])
            yield job, result if prepare is None else prepare(job, result, slots[0])
        return
    with contextlib.ExitStack() as pools:
        reader = pools.enter_context(ThreadPoolExecutor(1, thread_name_prefix="dcbench-read"))
        pool = None if prepare is None else \
            pools.enter_context(ThreadPoolExecutor(max(workers, 1), thread_name_prefix="dcbench-prepare"))
        pending: deque = deque()
        submitted = 0

        def submit() -> None:
            nonlocal submitted
            job = next(jobs, None)
            if job is not None:
                buffers = slots[submitted % len(slots)]
                future = reader.submit(read, job, buffers)
                if pool is not None:
                    future = pool.submit(lambda j, f, b: prepare(j, f.result(), b), job, future, buffers)
                pending.append((job, future))
                submitted += 1

        for _ in range(depth):
            submit()
        try:
            while pending:
                job, future = pending.popleft()
                submit()
                yield job, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _pool_depth(prefetch: int, workers: int) -> int:
    """Jobs in flight when ``workers`` threads prepare them: the results are taken in order, so
    a worker that finished early needs jobs queued behind the slowest one to stay busy."""
    return prefetch + 4 * workers if prefetch > 0 else 0


def compute_workers() -> int:
    """Threads that compute chunks at once: enough to fill the cores this process may use with
    ``torch.get_num_threads()`` threads each (one torch thread per core: two on a 2-core machine;
    at most 4, beyond which the reading is the limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // max(torch.get_num_threads(), 1)))


def _base_names(base: LazyCheckpoint, reference: LazyCheckpoint, where: str) -> dict[str, str]:
    """Aligned name → base tensor name, as ``align_names(base, reference)`` renames the base."""
    base_meta = base.meta_state()
    original = {id(t): name for name, t in base_meta.items()}
    aligned = align_names(base_meta, reference.meta_state(), where)
    return {name: original[id(t)] for name, t in aligned.items()}


# --- pruning -----------------------------------------------------------------------------------

def _prune_reason(name: str, ft: LazyCheckpoint, base: LazyCheckpoint, base_of: dict[str, str],
                  exclude: list[str]) -> str | None:
    """Why ``prune_state_dict`` keeps a tensor at its fine-tuned value (same checks, same order)."""
    if not ft.meta(name).is_floating_point():
        return "not floating point"
    if excluded(name, exclude):
        return "excluded by pattern"
    if name not in base_of:
        return "absent from base (new head)"
    if base.shape(base_of[name]) != ft.shape(name):
        raise ValueError(f"tensor {name!r}: base shape {tuple(base.shape(base_of[name]))} differs from "
                         f"fine-tuned shape {tuple(ft.shape(name))}; these models cannot share a delta")
    return None


def _chunked_dare_params(method: str, params: dict, pruner) -> dict | None:
    """The DARE parameters when the tensor can be pruned chunk by chunk, else None."""
    if method != "dare" or pruner is not None:
        return None
    rescale, rule = params.get("rescale", True), params.get("rescale_rule", "inverse-keep")
    if rule not in RESCALE_RULES:
        raise ValueError(f"rescale_rule must be one of {list(RESCALE_RULES)}, got {rule!r}")
    if rescale and rule == "l1-match":
        return None  # a float32 sum over the whole tensor
    return {"drop_rate": params["drop_rate"], "rescale": rescale, "rescale_rule": rule}


@dataclass
class _DareTensor:
    """State of one tensor pruned by chunks: its mask generator and running statistics."""
    name: str
    drop_rate: float
    rescale: bool
    rescale_rule: str
    generator: torch.Generator
    numel: int = 0
    max_abs: float = 0.0
    delta_sq: float = 0.0
    pruned_sq: float = 0.0
    nonzero: int = 0
    kept: int = 0

    def prepare(self, n: int, buffers: _Buffers) -> torch.Tensor | None:
        """Reader-thread half of a block (in block order, so the mask stream is drawn in order):
        the block's uniform numbers (None when ``dare_delta`` draws no mask: p = 0 or 1). The
        serial generator (~2 ns per number) is the largest single cost of DARE, so the reader
        thread does only this (and the reading); ``chunk`` does the rest on the main thread."""
        if self.drop_rate in (0.0, 1.0):
            return None
        return torch.rand(n, generator=self.generator, dtype=_F32, out=buffers.host("uniform", n, _F32))

    def chunk(self, base: torch.Tensor, finetuned: torch.Tensor, uniform: torch.Tensor | None,
              dtype: torch.dtype, stats: bool, ws: _Buffers) -> torch.Tensor:
        """prune_state_dict + methods.prune.dare.dare_delta on a flat range of the raw weights: the
        same float32 operations (into reused buffers, and branch-free where that gives the same
        bits), on ``ws``'s device; the result is there too. Overwrites ``uniform``."""
        n = base.numel()
        base_weight = ws("base", n, _F32).copy_(base)
        ft_weight = ws("ft", n, _F32).copy_(finetuned)
        delta = torch.sub(ft_weight, base_weight, out=ws("delta", n, _F32))
        p = self.drop_rate
        if p == 0.0:
            pruned = delta                       # dare_delta: δ.clone() (never modified below)
        elif p == 1.0:
            pruned = ws("pruned", n, _F32).zero_()
        else:
            # rescale_survivors: where(keep, δ/(1−p) or δ, +0.0)
            pruned = ws("pruned", n, _F32)
            if uniform.device != pruned.device:     # drawn on the CPU (the mask's generator)
                uniform = ws("uniform", n, _F32).copy_(uniform)
            if self.rescale:                     # dare_delta's divide: correctly rounded on a GPU too
                divide(delta, 1.0 - p, out=pruned)
            else:
                pruned.copy_(delta)
            # keep_mask: u >= p, as an AND mask: (bits(p) − 1) − bits(u) is negative exactly where
            # u >= p (both bit patterns are those of floats in [0, 1]: no overflow)
            keep = uniform.view(torch.int32).neg_().add_(_f32_bits(p) - 1).bitwise_right_shift_(31)
            pruned.view(torch.int32).bitwise_and_(keep)
        if stats and n:
            low, high = torch.aminmax(delta)
            self.numel += n
            self.max_abs = max(self.max_abs, abs(float(low)), abs(float(high)))
            self.delta_sq += float(torch.linalg.vector_norm(delta)) ** 2
            self.nonzero += _count_nonzero(delta, ws("count", n, _F32))
            self.pruned_sq += float(torch.linalg.vector_norm(pruned)) ** 2
            self.kept += _count_nonzero(pruned, ws("count", n, _F32))
        # torch.where(pruned == delta, ft_weight, base_weight + pruned), computed into base_weight
        base_weight.add_(pruned)
        _where_equal_(base_weight, pruned, delta, ft_weight, ws("same", n, _F32))
        return ws("out", n, dtype).copy_(base_weight)

    def stats(self) -> dict:
        return {"pruned": True, "numel": self.numel, "delta_max_abs": self.max_abs,
                "delta_norm": math.sqrt(self.delta_sq), "pruned_delta_norm": math.sqrt(self.pruned_sq),
                "kept_fraction": self.kept / self.nonzero if self.nonzero else 0.0}


def stream_prune(base: str | Path, finetuned: str | Path, out_dir: str | Path, method: str, params: dict,
                 mask_seed: int, exclude: Iterable[str] = (), *, pruner: Callable | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_elements: int | None = None,
                 template_dir: str | Path | None = None, stats: bool = True,
                 prefetch: int = DEFAULT_PREFETCH, read_elements: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, dict]:
    """Prune a fine-tuned checkpoint against its base into ``out_dir``; returns per-tensor stats.

    Same arguments and results as ``prune_state_dict(base, finetuned, method, params, mask_seed,
    exclude, pruner)`` + ``save_like(state, template_dir or finetuned, out_dir)``; ``params`` must
    be resolved (``registry.get("prune", method).resolve``). ``stats=False`` skips the statistics
    of chunked tensors (cheaper; they come back as ``{"pruned": True}``). ``device``: where the
    float32 arithmetic runs (see "Devices" above); ``chunk_elements`` defaults to the device's."""
    exclude = list(exclude)
    device = torch.device(device)
    chunk_elements = chunk_elements or _default_chunk(device)
    block = _block_size(chunk_elements, read_elements, device)
    with LazyCheckpoint(base) as b, LazyCheckpoint(finetuned) as ft:
        base_of = _base_names(b, ft, f"prune {finetuned}")
        dare_params = _chunked_dare_params(method, params, pruner)
        if dare_params is not None:
            check_drop_rate(dare_params["drop_rate"], "all tensors")
        plan: dict[str, tuple[str, str | None]] = {}  # name -> (route, reason)
        for name in ft.names:
            reason = _prune_reason(name, ft, b, base_of, exclude)
            if reason:
                plan[name] = ("copy", reason)
            elif dare_params is not None:
                plan[name] = ("chunked", None)
            else:
                plan[name] = ("whole", None)
        jobs = [(name, start, stop) for name in ft.names
                for start, stop in (chunk_ranges(ft.numel(name), block) if plan[name][0] != "whole"
                                    else [(0, ft.numel(name))])]

        states: dict[str, _DareTensor] = {}

        def read(job, buffers: _Buffers):  # runs in the reader thread, one job at a time, in order
            name, start, stop = job
            route = plan[name][0]
            if route == "whole":
                return b.read(base_of[name]).to(device), ft.read(name).to(device), None
            if route == "copy":
                return None, buffers.read(ft, "ft_raw", name, start, stop), None
            ft_chunk = buffers.read(ft, "ft_raw", name, start, stop)
            if start == 0:
                states[name] = _DareTensor(name, float(dare_params["drop_rate"]), bool(dare_params["rescale"]),
                                           dare_params["rescale_rule"], cpu_generator("dare-mask", mask_seed, name))
            base_chunk = buffers.read(b, "base_raw", base_of[name], start, stop)
            # drawn on a third thread, in job order (one worker), so reading the next blocks and
            # drawing this one's numbers overlap: each is about as costly as the main thread's work
            return base_chunk, ft_chunk, draws.submit(states[name].prepare, stop - start, buffers)

        out_stats: dict[str, dict] = {}
        prune_fn = None
        sink = None
        ws = _Buffers(device)
        with ShardedWriter(out_dir, max_shard_bytes, template_dir=template_dir or ft.path) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="dare-draws") as draws:
            for (name, start, stop), (base_chunk, ft_chunk, prepared) in _prefetch(jobs, read, prefetch,
                                                                                    device=device):
                route, reason = plan[name]
                dtype, shape, numel = ft.dtype(name), ft.shape(name), ft.numel(name)
                if start == 0:
                    sink = writer.tensor(name, dtype, shape)
                if route == "copy":
                    sink.write(ft_chunk)
                    out_stats[name] = {"pruned": False, "reason": reason}
                elif route == "whole":
                    if prune_fn is None:
                        prune_fn = pruner or _spec("prune", method).fn
                    out, tensor_stats = prune_state_dict({name: base_chunk.reshape(shape)},
                                                         {name: ft_chunk.reshape(shape)}, method, params,
                                                         mask_seed, exclude, pruner=prune_fn)
                    sink.write(out[name].cpu())
                    out_stats[name] = tensor_stats[name]
                else:
                    state = states[name]
                    prepared = prepared.result()
                    for i, j in _sub_ranges(0, stop - start, chunk_elements):
                        uniform = None if prepared is None else prepared[i:j]
                        sink.write(ws.to_host(state.chunk(base_chunk[i:j], ft_chunk[i:j], uniform, dtype, stats, ws)))
                    if stop == numel:
                        out_stats[name] = state.stats() if stats else {"pruned": True}
                        del states[name]
                if stop == numel:
                    sink.close()
        return out_stats


# --- merging -----------------------------------------------------------------------------------

@dataclass
class _MergeInputs:
    base: LazyCheckpoint
    models: list[LazyCheckpoint]          # sorted by name
    names: list[str]
    base_of: dict[str, str]               # aligned key -> base tensor name

    def read(self, key: str, start: int, stop: int, buffers: _Buffers | None, with_models: bool = True):
        if buffers is None:  # a whole tensor, in fresh tensors
            return (self.base.read(self.base_of[key], start, stop),
                    [m.read(key, start, stop) for m in self.models] if with_models else None)
        base_chunk = buffers.read(self.base, "base", self.base_of[key], start, stop)
        models = [buffers.read(m, f"model{t}", key, start, stop) for t, m in enumerate(self.models)] \
            if with_models else None
        return base_chunk, models

    def read_deltas(self, key: str, start: int, stop: int, buffers: _Buffers, chunk: int, subtract: bool = True):
        """Reader-thread preparation of a block: θ₀ in float32 and, for each chunk of at most
        ``chunk`` elements, the contiguous (T, n) float32 stack of θ_t − θ₀ (``stack_deltas``).
        Returns (θ₀ float32 for the block, [(offset, stop, stack), ...]) with block-relative
        offsets; the main thread only merges. ``subtract=False`` leaves f32(θ_t) in the stack (the
        main thread subtracts, when the merge itself is lighter than the reading)."""
        return self.deltas(*self.read(key, start, stop, buffers), buffers, chunk, subtract)

    def deltas(self, base_raw: torch.Tensor, models_raw: list[torch.Tensor], buffers: _Buffers, chunk: int,
               subtract: bool = True):
        """``read_deltas`` of a block already read (``read`` into the same ``buffers``)."""
        n, n_models = base_raw.numel(), len(models_raw)
        base32 = buffers("base32", n, _F32).copy_(base_raw)
        flat = buffers("stacks", n_models * n, _F32)
        parts = []
        for a, c in _sub_ranges(0, n, chunk):
            stack = flat[n_models * a:n_models * c].view(n_models, c - a)
            for t, model in enumerate(models_raw):
                stack[t].copy_(model[a:c])       # f32(θ_t)
                if subtract:
                    stack[t].sub_(base32[a:c])   # − f32(θ₀)
            parts.append((a, c, stack))
        return base32, parts


def _f32_dicts(key: str, base_chunk: torch.Tensor, model_chunks: list[torch.Tensor], device: torch.device):
    return {key: base_chunk.to(device, _F32)}, [{key: m.to(device, _F32)} for m in model_chunks]


def _task_arithmetic_chunk(base32: torch.Tensor, stack: torch.Tensor, scale: float, dtype: torch.dtype,
                           ws: _Buffers) -> torch.Tensor:
    """``apply_delta(base, stack_deltas(base, models).sum(dim=0), scale)`` cast to ``dtype`` (the
    registered task_arithmetic on one chunk), into reused buffers."""
    n = base32.numel()
    merged = torch.sum(stack, dim=0, out=ws("merged", n, _F32))
    if scale != 1.0:               # λ·τ (× 1.0 gives the same bits, signed zeros included)
        merged.mul_(scale)
    merged.add_(base32)            # θ₀ + λ·τ
    return ws("out", n, dtype).copy_(merged)


# exact k-th largest |δ| by radix selection on float32 bit patterns -----------------------------

_HI_BINS, _LO_BINS = 1 << 15, 1 << 16   # |δ| has sign bit 0: the top 16 bits are < 2**15


def _abs_bits(stack: torch.Tensor) -> torch.Tensor:
    """Bit patterns of |stack| as int32: for non-negative floats, ordered like the values."""
    return stack.abs().view(torch.int32)


def _kth_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest counted element (1-based) and its rank inside that bin."""
    hist = hist.cpu()
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    bin_ = hist.numel() - 1 - j
    return bin_, k - (int(from_top[j]) - int(hist[bin_]))


@dataclass
class _Selection:
    """Exact ``magnitude_threshold`` of T task vectors streamed in chunks (one group of tensors)."""
    n_models: int
    density: float
    numel: int = 0
    hi: torch.Tensor = None
    lo: torch.Tensor = None
    bins: list = field(default_factory=list)
    ranks: list = field(default_factory=list)
    thresholds: list = field(default_factory=list)

    def counts(self) -> list[int]:
        return [mc.keep_count(self.numel, self.density)] * self.n_models

    def needs_search(self) -> bool:
        k = mc.keep_count(self.numel, self.density)
        return 0 < k < self.numel

    def add_hi(self, stack: torch.Tensor) -> None:
        if self.hi is None:
            self.hi = torch.zeros(self.n_models * _HI_BINS, dtype=torch.int64, device=stack.device)
        top = _abs_bits(stack) >> 16
        top += (torch.arange(self.n_models, dtype=torch.int32, device=stack.device) * _HI_BINS).unsqueeze(1)
        self.hi += torch.bincount(top.reshape(-1), minlength=self.n_models * _HI_BINS)

    def locate(self) -> None:
        k = mc.keep_count(self.numel, self.density)
        hist = self.hi.view(self.n_models, _HI_BINS)
        self.bins, self.ranks = zip(*(_kth_bin(hist[t], k) for t in range(self.n_models)))
        self.lo = torch.zeros(self.n_models * _LO_BINS, dtype=torch.int64, device=self.hi.device)

    def add_lo(self, stack: torch.Tensor) -> None:
        bits = _abs_bits(stack)
        for t in range(self.n_models):
            low = bits[t][(bits[t] >> 16) == self.bins[t]] & 0xFFFF
            if low.numel():
                self.lo[t * _LO_BINS:(t + 1) * _LO_BINS] += torch.bincount(low, minlength=_LO_BINS)

    def finish(self) -> list[float | None]:
        """The thresholds: None keeps everything, +inf nothing (``magnitude_threshold``'s values)."""
        k = mc.keep_count(self.numel, self.density)
        if k >= self.numel:
            self.thresholds = [None] * self.n_models
        elif k == 0:
            self.thresholds = [float("inf")] * self.n_models
        else:
            hist = self.lo.view(self.n_models, _LO_BINS)
            self.thresholds = []
            for t in range(self.n_models):
                low, _ = _kth_bin(hist[t], self.ranks[t])
                bits = torch.tensor([(self.bins[t] << 16) | low], dtype=torch.int32)
                self.thresholds.append(float(bits.view(_F32)[0]))
        return self.thresholds


def _disjoint_merge(trimmed: torch.Tensor, gamma: torch.Tensor, base32: torch.Tensor, scale: float,
                    dtype: torch.dtype, ws: _Buffers | None = None, tag: str = "",
                    out_ws: _Buffers | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``disjoint_mean`` + ``apply_delta`` with resolved signs γ ∈ {−1, +1}, cast to ``dtype``;
    ``trimmed`` is left as it is. Returns (the merged chunk, the number of agreeing models
    (float32)).

    With P_t = max(γ·τ̂_t, 0) (= |τ̂_t| where τ̂_t agrees with γ, ±0 elsewhere): the number of
    agreeing models is Σ_t sign(P_t), and Σ_t [agrees] τ̂_t = γ · Σ_t P_t — the agreeing terms
    in the same order, and a sum of same-signed terms is the negation of the sum of their
    magnitudes, bit for bit; the ±0 terms are absorbed by the sum's +0 start (as the +0.0 that
    the original puts there), and + 0.0 turns the −0 of "nothing agrees, γ = −1" into the
    original's +0. Float arithmetic instead of boolean masks: several times faster on CPU. The
    result is ``out_ws``'s buffer "out" + ``tag`` (default: ``ws``'s), the rest scratch of ``ws``."""
    ws = ws or _Buffers(trimmed.device)
    shape, n = trimmed.shape, trimmed.shape[1]
    product = torch.mul(trimmed, gamma, out=ws("product", shape, _F32)).clamp_min_(0.0)   # P_t
    count = torch.sum(torch.sign(product, out=ws("agree", shape, _F32)), dim=0, out=ws("count", n, _F32))
    merged = torch.sum(product, dim=0, out=ws("merged", n, _F32))
    merged.mul_(gamma).add_(0.0)                                        # Σ agreeing τ̂
    merged.div_(torch.clamp_min(count, 1.0, out=ws("divisor", n, _F32)))  # / their count (≥ 1)
    if scale != 1.0:                                                    # θ₀ + λ·τ_m (× 1.0: same bits)
        merged.mul_(scale)
    merged.add_(base32)
    return (out_ws or ws)("out" + tag, n, dtype).copy_(merged), count


def _ties_elect(trimmed: torch.Tensor, thresholds: list, ws: _Buffers) -> tuple:
    """First half of paper TIES on one chunk: ``trim_to_threshold`` of each model's deltas (in
    place), ``elect_sign`` and ``resolve_zero_signs`` with majority +1. Returns (γ resolved, 1.0
    where Σ τ̂ = 0 else 0.0, Σγ before resolving), in ``ws``."""
    n = trimmed.shape[1]
    scratch = ws("scratch", n, torch.int32)
    for t, threshold in enumerate(thresholds):          # trim_to_threshold
        _trim_(trimmed[t], threshold, scratch)
    total = torch.sum(trimmed, dim=0, out=ws("total", n, _F32))
    gamma = torch.sign(total, out=ws("gamma", n, _F32))                # elect_sign
    # Σγ: a float32 sum of ±1/0 is exact below 2**24 terms
    gamma_sum = int(gamma.sum()) if n < 1 << 24 else int(gamma.sum(dtype=torch.float64))
    tied = torch.abs(gamma, out=ws("tied", n, _F32)).neg_().add_(1.0)  # 1 where Σ τ̂ = 0
    gamma.add_(tied)                                                    # resolve_zero_signs, majority +1
    return gamma, tied, gamma_sum


def _ties_chunk(base32: torch.Tensor, trimmed: torch.Tensor, elected: tuple, scale: float,
                dtype: torch.dtype, ws: _Buffers, tag: str = "",
                out_ws: _Buffers | None = None) -> tuple[torch.Tensor, int, tuple | None]:
    """Paper TIES on one chunk (``ties_paper``'s trim, ``elect_sign``, ``resolve_zero_signs``,
    ``disjoint_mean`` and ``apply_delta`` with float32 operations that give the same bits, into
    reused buffers, branch-free; the deltas are finite), given ``_ties_elect``'s result.

    The majority sign (needed where Σ_t τ̂_t = 0) is only known once every chunk of the group has
    been seen, so the chunk is merged with majority +1 and returned with Σγ (this chunk's part of
    the majority vote) and, for the positions where the majority matters (Σ τ̂ = 0 but some τ̂ ≠
    0, i.e. some τ̂ > 0 and some < 0), their indices and their values under majority −1."""
    gamma, tied, gamma_sum = elected
    out, count = _disjoint_merge(trimmed, gamma, base32, scale, dtype, ws, tag, out_ws)
    # majority +1 counted the τ̂ > 0 of a tied position: the majority matters where there are any
    matters = tied.mul_(count)
    alternative = None
    if float(matters.max()) > 0:
        index = torch.nonzero(matters).squeeze(1)
        minus = torch.full((index.numel(),), -1.0, device=index.device)
        alternative = (index, _disjoint_merge(trimmed[:, index], minus, base32[index], scale, dtype)[0])
    return out, gamma_sum, alternative


def stream_merge(method: str, base: str | Path, models: dict[str, str | Path], out_dir: str | Path,
                 params: dict | None = None, *, seed: int = 0, exclude: Iterable[str] = (),
                 vocab_rule: str = "base", keep_unmerged: bool = True,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_elements: int | None = None,
                 template_dir: str | Path | None = None, prefetch: int = DEFAULT_PREFETCH,
                 read_elements: int | None = None, workers: int | None = None,
                 device: torch.device | str = "cpu") -> dict:
    """Merge ``models`` (name → checkpoint) on ``base`` with a merge method into ``out_dir``.

    Same semantics as ``merge_state_dicts(method, base, models, params, seed=, exclude=,
    vocab_rule=)`` (the base aligned to the first model's names, as the merge rule does); missing
    ``params`` take the method's defaults. ``device``: where the float32 arithmetic runs (see
    "Devices" above); ``chunk_elements`` defaults to the device's. Returns merge_state_dicts' info
    dict."""
    if vocab_rule not in VOCAB_RULES:
        raise ValueError(f"unknown vocab_rule {vocab_rule!r}; known: {list(VOCAB_RULES)}")
    if not models:
        raise ValueError("merging needs at least one model")
    spec = _spec("merge", method)
    params = spec.resolve(params, f"merge {method} params")
    ties_stream = method == "ties" and params.get("semantics") == "paper"
    if method not in ELEMENTWISE_MERGES and method not in PER_TENSOR_MERGES:
        raise NotImplementedError(f"merge method {method!r} is not streamable; streamable: "
                                  f"{list(ELEMENTWISE_MERGES + PER_TENSOR_MERGES)} (use merge_state_dicts)")
    if method == "dare-ties" and params["semantics"] == "paper" and params["granularity"] == "model":
        raise NotImplementedError("dare-ties with semantics 'paper' and granularity 'model' is not streamable yet "
                                  "(use granularity 'tensor' or merge_state_dicts)")
    exclude = list(exclude)
    device = torch.device(device)
    chunk_elements = chunk_elements or _default_chunk(device)
    if read_elements is None and ties_stream and device.type == "cpu":
        read_elements = max(TIES_READ_ELEMENTS, chunk_elements)
    block = _block_size(chunk_elements, read_elements, device)
    names = sorted(models)
    lazy = {n: LazyCheckpoint(p) for n, p in models.items()}
    base_ckpt = LazyCheckpoint(base)
    try:
        first = next(iter(models))
        base_of = _base_names(base_ckpt, lazy[first], f"merge {first}")
        base_meta = {k: base_ckpt.meta(v) for k, v in base_of.items()}
        keys, skipped, vocab = _select(base_meta, {n: lazy[n].meta_state() for n in names}, names, exclude, vocab_rule)
        inputs = _MergeInputs(base_ckpt, [lazy[n] for n in names], names, base_of)
        extra: dict = {}
        merged = set(keys)
        numel = {k: base_meta[k].numel() for k in base_of}
        dtype = {k: base_meta[k].dtype for k in base_of}
        shape = {k: base_meta[k].shape for k in base_of}
        order = [k for k in base_of if k in merged or keep_unmerged]
        ties_model = ties_stream and params["granularity"] == "model"

        def route(key: str) -> str:
            if key not in merged:
                return "copy"
            if ties_stream:
                return "ties"
            if numel[key] <= chunk_elements:
                return "whole"
            if method == "task-arithmetic":
                return "deltas"      # chunks of (θ₀, stacked deltas) prepared by the reader thread
            if method in ELEMENTWISE_MERGES:
                return "chunked"     # chunks of raw weights
            return "whole"

        routes = {k: route(k) for k in order}

        def ranges(key: str):  # the reads: whole tensors or blocks of chunks
            return chunk_ranges(numel[key], block) if routes[key] != "whole" else [(0, numel[key])]

        def read(job, buffers: _Buffers):
            key, start, stop = job
            if routes[key] == "deltas":
                return inputs.read_deltas(key, start, stop, buffers, chunk_elements, subtract=False)
            return inputs.read(key, start, stop, None if routes[key] == "whole" else buffers,
                               with_models=routes[key] != "copy")

        def to_deltas(raw, buffers: _Buffers):
            return inputs.deltas(*raw, buffers, chunk_elements)

        def prepare(job, raw, buffers: _Buffers):
            """TIES blocks, in the worker threads: the deltas; and when the thresholds are known
            before the pass (granularity "model"), the whole merge of each chunk."""
            key = job[0]
            if routes[key] != "ties":
                return raw
            if key not in ready:  # the main thread merges: the deltas outlive this call
                return to_deltas(raw, buffers)
            ws = scratch()
            base32, parts = to_deltas(raw, ws)
            return base32, [(a, c, stack, _ties_chunk(base32[a:c], stack, _ties_elect(stack, thresholds[None], ws),
                                                      params["scale"], dtype[key], ws, str(a), out_ws=buffers))
                            for a, c, stack in parts]

        scratch = _ThreadBuffers(device)
        workers = compute_workers() if workers is None else max(1, workers)
        depth = _pool_depth(prefetch, workers)

        n_models = len(names)
        thresholds: dict = {}
        gamma_sums: dict = {}
        ties_routes: dict = {}
        granularity = params.get("granularity")
        ready: set = set()   # keys whose merge-pass blocks the workers merge (thresholds known)
        if ties_model:  # thresholds over the whole model, before anything is written
            ties_routes.update(_ties_thresholds([k for k in order if routes[k] == "ties"], ranges, read, to_deltas,
                                                numel, n_models, params["density"], "model", thresholds, prefetch,
                                                chunk_elements, workers, device))
            ready.update(order)

        with contextlib.ExitStack() as stack, \
                ShardedWriter(out_dir, max_shard_bytes, template_dir=template_dir or base_ckpt.path) as writer:
            patches = stack.enter_context(contextlib.closing(_Patches(Path(out_dir).resolve().parent))) \
                if ties_stream else None
            key_ids = {key: i for i, key in enumerate(order)}
            sink = None
            ws = _Buffers(device)
            jobs = [(key, a, b) for key in order for a, b in ranges(key)]
            for (key, start, stop), (base_chunk, model_chunks) in _prefetch(
                    jobs, read, depth, prepare if ties_stream else None, workers, device):
                r = routes[key]
                if start == 0:
                    if r == "ties" and granularity == "tensor" and stop == numel[key]:  # one read: in memory
                        thresholds[key] = _thresholds_in_memory([part[2] for part in model_chunks],
                                                                params["density"])
                    elif r == "ties" and granularity == "tensor":  # this tensor's thresholds
                        ties_routes.update(_ties_thresholds([key], ranges, read, to_deltas, numel, n_models,
                                                            params["density"], "tensor", thresholds, prefetch,
                                                            chunk_elements, workers, device))
                    sink = writer.tensor(key, dtype[key], shape[key])
                if r == "copy":
                    out = base_chunk
                elif r == "whole":
                    base32, models32 = _f32_dicts(key, base_chunk.reshape(shape[key]),
                                                  [m.reshape(shape[key]) for m in model_chunks], device)
                    out = spec.fn(base32, models32, names=names, seed=seed, score_fn=None, info=extra,
                                  **params)[key].to("cpu", dtype[key])
                if r in ("copy", "whole"):
                    sink.write(out)
                for a, c in (_sub_ranges(0, stop - start, chunk_elements) if r == "chunked" else []):
                    base32, models32 = _f32_dicts(key, base_chunk[a:c], [m[a:c] for m in model_chunks], device)
                    sink.write(spec.fn(base32, models32, names=names, seed=seed, score_fn=None, info=extra,
                                       **params)[key].to("cpu", dtype[key]))
                for a, c, stack, *merged_chunk in (model_chunks if r in ("deltas", "ties") else []):
                    base32 = base_chunk[a:c]          # θ₀ (float32) and the (T, n) deltas of one chunk
                    if r == "deltas":
                        stack.sub_(base32)            # θ_t − θ₀ (the reader left f32(θ_t))
                        out = _task_arithmetic_chunk(base32, stack, params["scale"], dtype[key], ws)
                    else:
                        group = key if granularity == "tensor" else None
                        out, gamma_sum, tied = merged_chunk[0] if merged_chunk else _ties_chunk(
                            base32, stack, _ties_elect(stack, thresholds[group], ws), params["scale"], dtype[key], ws)
                        gamma_sums[group] = gamma_sums.get(group, 0) + gamma_sum
                        if tied is not None:
                            patches.add(key_ids[key], tied[0] + start + a, tied[1])
                    sink.write(ws.to_host(out))
                if stop == numel[key]:
                    sink.close()
            if patches is not None and patches.count:
                # groups whose majority sign turned out −1 (mc.majority_sign; 0 → +1): rewrite the
                # elements whose value depends on it
                negative = {g for g, total in gamma_sums.items() if mc.majority_sign(total) < 0}
                for key_id, index, values in patches.records([dtype[k] for k in order]):
                    key = order[key_id]
                    if (key if granularity == "tensor" else None) in negative:
                        writer.patch(key, index, values)
        clash = _RESERVED & set(extra)
        if clash:
            raise RuntimeError(f"merge method {method!r} recorded reserved info keys {sorted(clash)}")
        return {"method": method, "params": dict(params), "seed": seed, "models": names,
                "merged_tensors": len(keys), "skipped": skipped, "vocab_aligned": vocab, **extra}
    finally:
        base_ckpt.close()
        for checkpoint in lazy.values():
            checkpoint.close()


@dataclass
class _WindowSearch:
    """The exact trim thresholds of paper TIES for one group of tensors in one full pass.

    A sample pass (the first 1/``SAMPLE_STRIDE`` of every k-th read block, about ``SAMPLE_READ``
    values, strided down to at most ``CAP`` values per model) estimates each model's threshold
    and brackets it by a window [lo, hi] of sample quantiles, at most ``WIDTH`` float32 bit patterns wide. The full pass counts
    the |δ| above hi and histograms the bit patterns of the |δ| inside the window (one bin per
    representable float32 value, so ties are counted, not stored). The threshold is then the
    (k − #above)-th largest value inside the window — exact, provided it falls inside, which is
    checked. Memory is bounded by the buffers' fixed sizes whatever the model size; when a window
    misses, ``resolve`` returns None and the caller falls back to the histogram passes
    (``_Selection``), which are exact for any input."""
    n_models: int
    density: float
    device: torch.device = torch.device("cpu")   # where the chunks are measured and counted
    numel: int = 0
    sample: torch.Tensor | None = None      # (T, CAP + chunks) float32 |δ| sample
    sampled: int = 0
    lo_bits: torch.Tensor | None = None     # (T, 1) int32 bit patterns of the window bounds
    hi_bits: torch.Tensor | None = None
    above: torch.Tensor | None = None       # (T,) int64: |δ| > hi
    hist: torch.Tensor | None = None        # (T, WIDTH) int64: |δ| with bits lo + i
    _ones: torch.Tensor | None = None

    SAMPLE_STRIDE = 16    # the sample pass reads the first 1/16 of the blocks it samples
    SAMPLE_READ = 1 << 22  # ... and samples every k-th block, so as to read about this many values
    CAP = 1 << 18         # sampled values per model (rank error ~0.1%: the window is far wider)
    WIDTH = 1 << 20       # bit patterns per window (a relative width of ~12% at the top of a binade)

    @property
    def k(self) -> int:
        return mc.keep_count(self.numel, self.density)

    def known(self) -> list | None:
        """Thresholds that need no search (keep all: None; keep nothing: +inf), else None."""
        if self.k >= self.numel:
            return [None] * self.n_models
        if self.k == 0:
            return [float("inf")] * self.n_models
        return None

    @classmethod
    def sample_stride(cls, sampled: int) -> int:
        """Element stride inside the sampled chunks so that at most ``CAP`` values are kept (odd,
        so that it does not keep hitting the same columns of a matrix)."""
        stride = max(1, math.ceil(sampled / cls.CAP))
        return stride if stride == 1 or stride % 2 else stride + 1

    def add_sample(self, stack: torch.Tensor, stride: int, chunks: int) -> None:
        # one buffer at its full size: small tensors kept per chunk would be interleaved on the heap
        # with the chunks' large temporaries and fragment it (RSS growing with the chunk count)
        if self.sample is None:
            self.sample = torch.empty((self.n_models, self.CAP + chunks), dtype=_F32, device=self.device)
        values = stack[:, ::stride]
        n = min(values.shape[1], self.sample.shape[1] - self.sampled)   # ≤ ⌈n/stride⌉ per chunk: fits
        torch.abs(values[:, :n], out=self.sample[:, self.sampled:self.sampled + n])
        self.sampled += n

    def set_window(self) -> None:
        n_s = self.sampled
        width = self.WIDTH
        lo, hi = [], []
        for t in range(self.n_models):
            if n_s == 0:
                lo.append(0)
                hi.append(width - 1)
                continue
            sample = self.sample[t, :n_s]
            rank = self.k * n_s / self.numel                        # the k-th largest, in sample ranks
            margin = 8 * math.sqrt(max(rank * (1 - rank / n_s), 1.0)) + 64
            top, bottom = math.floor(rank - margin), math.ceil(rank + margin)    # 1-based, from the largest
            centre = _f32_bits(float(torch.kthvalue(sample, n_s - min(max(round(rank), 1), n_s) + 1).values))
            high = 0x7F800000 if top < 1 else _f32_bits(float(torch.kthvalue(sample, n_s - top + 1).values))
            low = 0 if bottom > n_s else _f32_bits(float(torch.kthvalue(sample, n_s - bottom + 1).values))
            if high - low + 1 > width:        # too wide: the ``width`` patterns around the estimate
                low = max(low, min(centre - width // 2, high - width + 1))
                high = low + width - 1
            lo.append(low)
            hi.append(high)
        self.sample = None
        self.lo_bits = torch.tensor(lo, dtype=torch.int32, device=self.device).unsqueeze(1)
        self.hi_bits = torch.tensor(hi, dtype=torch.int32, device=self.device).unsqueeze(1)
        self.above = torch.zeros(self.n_models, dtype=torch.int64, device=self.device)
        self.hist = torch.zeros((self.n_models, width), dtype=torch.int64, device=self.device)

    def measure(self, stack: torch.Tensor, ws: _Buffers, out_ws: _Buffers | None = None, tag: str = "") -> tuple:
        """What one chunk adds to the counts: (#(|δ| > hi) per model, each model's window offsets
        of its |δ| inside the window). Reads the window only, so chunks can be measured
        in several threads at once; ``accumulate`` adds the results up, in one thread. The offsets
        live in ``out_ws`` (default ``ws``), under ``tag``; the rest is scratch of ``ws``."""
        shape = stack.shape
        bits = torch.bitwise_and(stack.view(torch.int32), _ABS_BITS, out=ws("bits", shape, torch.int32))  # |δ|
        # integer sign tricks (faster than boolean comparisons on CPU): −1 where bits > hi / < lo
        above = torch.sub(self.hi_bits, bits, out=ws("above", shape, torch.int32)).bitwise_right_shift_(31)
        counts = above.sum(dim=1).neg_()
        outside = torch.sub(bits, self.lo_bits, out=ws("outside", shape, torch.int32)).bitwise_right_shift_(31)
        inside = ws("inside", shape, torch.bool).copy_(outside.bitwise_or_(above).bitwise_not_())
        offsets = []
        for t in range(self.n_models):
            found = _masked(bits[t], inside[t], ws).sub_(int(self.lo_bits[t]))
            offsets.append((out_ws or ws)(f"offsets{tag}/{t}", found.numel(), torch.int64).copy_(found))
        return counts, offsets

    def accumulate(self, measured: tuple) -> None:
        counts, offsets = measured
        self.above += counts
        for t, index in enumerate(offsets):
            if index.numel():  # count into the window's bins (a bincount would rewrite all of them)
                if self._ones is None or self._ones.numel() < index.numel():
                    self._ones = torch.ones(index.numel(), dtype=torch.int64, device=self.device)
                self.hist[t].index_add_(0, index, self._ones[:index.numel()])

    def resolve(self) -> list[float] | None:
        """The thresholds when every one fell inside its window, else None."""
        thresholds = []
        for t in range(self.n_models):
            j = self.k - int(self.above[t])                          # rank inside the window
            if not 1 <= j <= int(self.hist[t].sum()):
                return None
            offset, _ = _kth_bin(self.hist[t], j)
            bits = torch.tensor([int(self.lo_bits[t]) + offset], dtype=torch.int32)
            thresholds.append(float(bits.view(_F32)[0]))
        self.hist = None
        return thresholds


def _thresholds_in_memory(stacks: list[torch.Tensor], density: float) -> list:
    """``magnitude_threshold`` of each model's deltas, given as (T, n_i) stacks of one tensor's
    chunks, by the exact bit histograms (two ``bincount`` passes; several times faster than
    ``torch.kthvalue`` on CPU)."""
    numel = sum(s.shape[1] for s in stacks)
    selection = _Selection(stacks[0].shape[0], density, numel=numel)
    if 0 < mc.keep_count(numel, density) < numel:
        for stack in stacks:
            selection.add_hi(stack)
        selection.locate()
        for stack in stacks:
            selection.add_lo(stack)
    return selection.finish()


def _ties_thresholds(keys: list[str], ranges, read, to_deltas, numel: dict[str, int], n_models: int,
                     density: float, granularity: str, thresholds: dict, prefetch: int, chunk: int,
                     workers: int = 1, device: torch.device = torch.device("cpu")) -> dict:
    """The trim thresholds of paper TIES over ``keys`` into ``thresholds``: one group per tensor
    (granularity "tensor") or one for all (``None``, "model"). ``read(job, buffers)`` reads a
    block, ``to_deltas(read's result, buffers)`` makes it (θ₀, [(offset, stop, (T, n) deltas)])
    (``_MergeInputs.read`` and ``.deltas``) on ``device``; ``workers`` threads prepare blocks at once. Returns
    how each group's thresholds were found ("known", "window" or "histogram"), for tests and
    logs."""
    group_of = (lambda k: k) if granularity == "tensor" else (lambda k: None)
    searches: dict = {}
    for key in keys:
        search = searches.setdefault(group_of(key), _WindowSearch(n_models, density, device))
        search.numel += numel[key]
    routes = {}
    searching = {}
    for group, search in searches.items():
        known = search.known()
        if known is None:
            searching[group] = search
        else:
            thresholds[group], routes[group] = known, "known"
    if not searching:
        return routes
    jobs = [(key, a, b) for key in keys if group_of(key) in searching for a, b in ranges(key)]

    scratch = _ThreadBuffers(device)

    def prepared(job_list, prepare):  # (key, item) for each item prepare returns per block, in order
        for (key, _, _), items in _prefetch(job_list, read, _pool_depth(prefetch, workers), prepare, workers,
                                            device):
            for item in items:
                yield key, item

    def stacks(job_list):  # the deltas of each chunk, in the job's buffers (used by this thread)
        return prepared(job_list, lambda job, raw, buffers: [stack for _, _, stack in to_deltas(raw, buffers)[1]])

    def measure(job, raw, buffers):  # the full pass: each chunk measured against its group's window
        search, ws = searching[group_of(job[0])], scratch()
        return [search.measure(stack, ws, buffers, str(a)) for a, _, stack in to_deltas(raw, ws)[1]]

    by_group: dict = {}
    for job in jobs:
        by_group.setdefault(group_of(job[0]), []).append(job)
    sample_jobs, strides, picked_chunks = [], {}, {}
    for group, group_jobs in by_group.items():
        # the first 1/16 of every k-th read, spread over the whole group: about SAMPLE_READ
        # values per model (the cost of a read is mostly its latency, so fewer reads, not
        # shorter ones)
        total = sum(b - a for _, a, b in group_jobs)
        every = max(1, total // _WindowSearch.SAMPLE_STRIDE // _WindowSearch.SAMPLE_READ)
        picked = [(key, a, a + max(1, (b - a) // _WindowSearch.SAMPLE_STRIDE)) if b > a else (key, a, b)
                  for i, (key, a, b) in enumerate(group_jobs) if i % every == 0]
        sample_jobs += picked
        strides[group] = _WindowSearch.sample_stride(sum(b - a for _, a, b in picked))
        picked_chunks[group] = sum(len(_sub_ranges(a, b, chunk)) for _, a, b in picked)
    for key, stack in stacks(sample_jobs):                            # sample pass
        group = group_of(key)
        searching[group].add_sample(stack, strides[group], picked_chunks[group])
    for search in searching.values():
        search.set_window()
    for key, part in prepared(jobs, measure):                         # full pass: window histograms
        searching[group_of(key)].accumulate(part)
    fallback = {}
    for group, search in searching.items():
        found = search.resolve()
        if found is None:
            fallback[group] = _Selection(n_models, density, numel=search.numel)
            routes[group] = "histogram"
        else:
            thresholds[group], routes[group] = found, "window"
    if fallback:                                                      # exact histogram passes
        fallback_jobs = [job for job in jobs if group_of(job[0]) in fallback]
        for key, stack in stacks(fallback_jobs):
            fallback[group_of(key)].add_hi(stack)
        for selection in fallback.values():
            selection.locate()
        for key, stack in stacks(fallback_jobs):
            fallback[group_of(key)].add_lo(stack)
        for group, selection in fallback.items():
            thresholds[group] = selection.finish()
    return routes


class _Patches:
    """Elements whose merged value depends on the majority sign, spilled to an anonymous file:
    (tensor, flat index, the value it takes if the majority sign is −1)."""

    def __init__(self, directory: Path):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.count = 0

    def add(self, key_id: int, index: torch.Tensor, values: torch.Tensor) -> None:
        index, values = index.cpu(), values.cpu()
        self.file.write(struct.pack("<iq", key_id, index.numel()))
        self.file.write(memoryview(index.numpy()))
        self.file.write(memoryview(values.contiguous().view(torch.uint8).numpy()))
        self.count += index.numel()

    def records(self, dtypes: list[torch.dtype]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        self.file.seek(0)
        while header := self.file.read(12):
            key_id, n = struct.unpack("<iq", header)
            index = torch.frombuffer(bytearray(self.file.read(8 * n)), dtype=torch.int64)
            size = torch.empty((), dtype=dtypes[key_id]).element_size()
            values = torch.frombuffer(bytearray(self.file.read(size * n)), dtype=torch.uint8).view(dtypes[key_id])
            yield key_id, index, values

    def close(self) -> None:
        self.file.close()


# --- delta quantization --------------------------------------------------------------------------

def _not_per_tensor(method: str, params: dict) -> str | None:
    """Why a quantizer cannot work one tensor at a time (None: it can): it must quantize each target
    from that target alone, without the model or calibration data."""
    if method in ("rtn", "statsq"):
        return None
    if method == "nupes":
        if params["mode"] != "data-free":
            return "its data-driven mode runs the model on calibration data"
        if params["exponent_scope"] != "layer":
            return "exponent_scope 'global' searches one exponent over all tensors at once"
        return None
    return "it runs the model on calibration data"


def stream_quantize(source: str | Path, out_dir: str | Path, method: str, params: dict, names: Iterable[str], *,
                    base: str | Path | None = None, metadata: dict | None = None, seed: int = 0,
                    device: torch.device | str = "cpu", is_encoder: bool = True,
                    read_elements: int = DEFAULT_READ_ELEMENTS * 16) -> dict:
    """Quantize tensors ``names`` of checkpoint ``source`` (or, with ``base``, their deltas against
    it) into the artifact directory ``out_dir``, one tensor at a time; returns its bit accounting.

    Same artifact as ``quantize_model(model, method, params, target="delta" if base else
    "weights", base=...)`` followed by ``save_artifact(out_dir, quantized, <every tensor of
    source>, metadata)`` (the quantize rule's passthrough): the same records, passthrough tensors
    and ``artifact_hash``. Memory holds one target in float32 (and its base), whatever the model
    size; passthrough tensors are copied block by block. Only quantizers that quantize each target
    on its own can stream (RTN, StatsQ, NUPES data-free with a per-layer exponent); ``names`` are
    the tensors ``quantize_model`` would pick (``methods.quantize.apply.quantizable_names``).
    ``device``: where each target is quantized."""
    from methods.quantize.artifact import ArtifactWriter, bit_accounting
    from methods.quantize.common import QuantizeContext

    spec = _spec("quantize", method)
    params = spec.resolve(params, f"quantize {method} params")
    reason = _not_per_tensor(method, params)
    if reason is not None:
        raise NotImplementedError(f"quantize method {method!r} with {params} cannot stream one tensor at a time: "
                                  f"{reason} (use quantize_model)")
    device = torch.device(device)
    names = list(dict.fromkeys(names))
    with LazyCheckpoint(source) as src, contextlib.ExitStack() as stack:
        unknown = [n for n in names if n not in src.names]
        if unknown:
            raise KeyError(f"{source}: no tensors {unknown[:3]} to quantize")
        offsets_from = None
        if base is not None:
            offsets_from = stack.enter_context(LazyCheckpoint(base))
            base_of = _base_names(offsets_from, src, f"quantize {source}")
            missing = [n for n in names if n not in base_of]
            if missing:
                raise KeyError(f"the base has no tensors {missing[:3]} to take the delta against")
        wanted = set(names)
        with ArtifactWriter(out_dir, metadata if metadata is not None else {}, src.names) as writer:
            for name in src.names:   # storage order: every file is read front to back
                shape = src.shape(name)
                if name not in wanted:
                    sink = writer.passthrough_sink(name, src.dtype(name), shape)
                    for a, b in chunk_ranges(src.numel(name), read_elements):
                        sink.write(src.read(name, a, b))
                    sink.close()
                    continue
                weight = src.read(name).reshape(shape).to(device, _F32)
                offsets = None
                if offsets_from is not None:   # quantize_model: f32(θ) − f32(θ_base)
                    offsets = {name: offsets_from.read(base_of[name]).reshape(shape).to(device, _F32)}
                    weight = weight - offsets[name]
                context = QuantizeContext(offsets=offsets, seed=seed, device=str(device), is_encoder=is_encoder)
                quantized = spec.fn({name: weight}, context=context, **params)
                if name not in quantized:
                    raise RuntimeError(f"quantize method {method!r} returned no result for {name!r}")
                writer.add(name, quantized[name].cpu())
    return bit_accounting(out_dir)
