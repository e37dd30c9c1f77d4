"""Tensor-by-tensor access to safetensors checkpoints, for operations whose memory must not grow
with the model (methods/stream.py).

``LazyCheckpoint(path)`` opens a checkpoint directory (``model.safetensors`` or
``model.safetensors.index.json`` with its shards), a single ``.safetensors`` file, or a hub id
(``checkpoint_dir_of``). It parses the safetensors headers only — names, dtypes, shapes and where
each tensor's bytes lie — and reads one tensor, or one flat element range of a tensor, at a time
into a fresh buffer or the caller's, through ``methods.io.direct.DirectReader`` (``O_DIRECT``
with read-ahead where the file system has it, ``direct=False`` or no support: plain positional
reads). Nothing is memory-mapped, so reading a whole model leaves no file pages in the process's
RSS (nor, read directly, in the page cache), and a read releases the GIL, so a prefetching thread
overlaps disk reads with computation. The result equals ``safe_open``'s
``get_tensor`` / ``get_slice`` (tests/test_streaming.py checks it); ``safe_open`` itself exposes
neither byte offsets nor reads into a caller's buffer.

``ShardedWriter(out_dir, max_shard_bytes, metadata, template_dir, direct=True)`` writes tensors
as they come (through ``methods.io.direct.DirectAppender``: ``O_DIRECT`` where available),
whole (``add``) or chunk by chunk (``tensor(name, dtype, shape)`` → ``write(chunk)``), straight
into the current shard file: a shard is never held in memory. Each shard reserves
``header_bytes`` at its start; when the shard is closed the safetensors header is written there,
padded with spaces (the format allows trailing whitespace in the header), so every reader
(``safe_open``, ``load_file``, transformers, mergekit) reads the shards. A shard is closed before
it would exceed ``max_shard_bytes`` (a larger tensor gets a shard of its own, as in
transformers) or before its header would outgrow the reservation. On success the shards are named
like transformers' (``model.safetensors`` alone, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``), the template's config/tokenizer files are copied, and the
temporary directory (a sibling of ``out_dir``) is renamed into place (``atomic_dir``); on any
exception nothing is left behind and a previous ``out_dir`` is untouched.

Tensor values never depend on the input's shard layout or on the order of reads; the output's
layout depends only on the order of ``add`` calls and ``max_shard_bytes``.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from methods.io.checkpoint import (WEIGHTS, WEIGHTS_INDEX, CorruptCheckpointError, NonFiniteWeightsError,
                                   atomic_dir, checkpoint_dir_of, copy_template_files, read_json)
from methods.io.direct import DirectAppender, DirectReader, pread_all

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

DEFAULT_SHARD_BYTES = 5 * 10**9   # transformers' default max_shard_size ("5GB")
HEADER_BYTES = 256 * 1024         # header reservation per shard (~2000 tensor entries)
_MAX_HEADER = 100 * 1000 * 1000   # safetensors' own limit on a header


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``offset`` is absolute in ``file``."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The ``__metadata__`` and the tensor entries of one safetensors file (nothing else is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER or 8 + length > size:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{path}: cannot read the safetensors header ({error}); it is corrupt or truncated. Delete it "
            "(or its directory) and re-run the workflow to rebuild it.") from error
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    entries: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {entry!r} "
                                         f"({error!r})") from error
        info = TensorInfo(name, path, dtype, shape, start + begin, end - begin)
        if info.nbytes != info.numel * info.itemsize or start + end > size or begin < 0:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} ({entry}) does not fit the file "
                                         f"({size} bytes); it is corrupt or truncated")
        entries[name] = info
    return metadata, entries


def _read_into(fd: int, buffer: memoryview, offset: int, where: str) -> None:
    if pread_all(fd, offset, buffer) < len(buffer):
        raise CorruptCheckpointError(f"{where}: unexpected end of file (truncated?)")


class LazyCheckpoint:
    """Names, dtypes and shapes of a checkpoint's tensors, and their data one (part of a) tensor at
    a time. ``names`` lists the tensors in storage order (shard files in name order, then by byte
    offset), so reading them in that order reads each file front to back."""

    def __init__(self, location: str | Path, direct: bool = True):
        path = Path(location)
        weight_map = None
        if path.is_file():
            self.path, files = path.parent, [path]
        else:
            self.path = checkpoint_dir_of(location)
            index = self.path / WEIGHTS_INDEX
            if index.exists():
                weight_map = read_json(index)["weight_map"]
                files = [self.path / f for f in sorted(set(weight_map.values()))]
            elif (self.path / WEIGHTS).exists():
                files = [self.path / WEIGHTS]
            else:
                raise FileNotFoundError(f"{self.path}: no {WEIGHTS} or {WEIGHTS_INDEX}; is this a checkpoint?")
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.exists():
                raise CorruptCheckpointError(f"{file}: listed in {WEIGHTS_INDEX} but missing")
            metadata, entries = read_header(file)
            self.metadata = self.metadata or metadata
            for info in sorted(entries.values(), key=lambda i: i.offset):
                if info.name in self.tensors:
                    raise CorruptCheckpointError(f"{file}: tensor {info.name!r} also in {self.tensors[info.name].file}")
                self.tensors[info.name] = info
        if weight_map is not None:
            wrong = {n: f for n, f in weight_map.items()
                     if n not in self.tensors or self.tensors[n].file.name != Path(f).name}
            if wrong:
                raise CorruptCheckpointError(f"{self.path / WEIGHTS_INDEX}: {len(wrong)} tensors are not where the "
                                             f"index says, e.g. {next(iter(wrong.items()))}")
        self._reader = DirectReader(direct)

    # --- metadata ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.info(name).shape)

    def numel(self, name: str) -> int:
        return self.info(name).numel

    def meta(self, name: str) -> torch.Tensor:
        """A data-less tensor with this tensor's shape and dtype (``device="meta"``)."""
        return torch.empty(self.info(name).shape, dtype=self.info(name).dtype, device="meta")

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor: feeds name/shape/dtype logic written for state dicts."""
        return {name: self.meta(name) for name in self.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    # --- data ----------------------------------------------------------------------------------
    def read(self, name: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (row-major), as a 1-D tensor of its
        dtype, in a fresh buffer or in ``out`` (a contiguous uint8 tensor of at least the bytes
        read; reusing buffers spares the allocator returning and re-faulting memory every chunk).
        Thread-safe; releases the GIL while reading."""
        info = self.info(name)
        stop = info.numel if stop is None else stop
        if not 0 <= start <= stop <= info.numel:
            raise IndexError(f"{name!r}: element range [{start}, {stop}) outside 0..{info.numel}")
        size = info.itemsize
        if out is None:
            buffer = torch.empty((stop - start) * size, dtype=torch.uint8)
        else:
            if out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < (stop - start) * size:
                raise ValueError(f"{name!r}: out must be a contiguous uint8 tensor of ≥ {(stop - start) * size} bytes")
            buffer = out.reshape(-1)[:(stop - start) * size]
        if buffer.numel() and self._reader.read_into(info.file, info.offset + start * size,
                                                     memoryview(buffer.numpy())) < buffer.numel():
            raise CorruptCheckpointError(f"{info.file} tensor {name!r}: unexpected end of file (truncated?)")
        return buffer.view(info.dtype)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor with its shape."""
        return self.read(name).reshape(self.info(name).shape)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def chunk_ranges(numel: int, chunk_elements: int) -> list[tuple[int, int]]:
    """Consecutive flat ranges of at most ``chunk_elements`` covering ``[0, numel)`` (one empty
    range for an empty tensor, so every tensor yields at least one chunk)."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be ≥ 1, got {chunk_elements}")
    if numel == 0:
        return [(0, 0)]
    return [(a, min(numel, a + chunk_elements)) for a in range(0, numel, chunk_elements)]


# --- writing -----------------------------------------------------------------------------------

def _bytes_of(chunk: torch.Tensor) -> memoryview:
    flat = chunk.detach().contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())


_EXPONENT_MASKS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00)}


def all_finite(tensor: torch.Tensor, scratch: torch.Tensor | None = None) -> bool:
    """No NaN or inf. Half-precision tensors are checked on their bits (an all-ones exponent),
    which is several times faster on CPU than ``torch.isfinite`` on bfloat16; ``scratch`` (int16,
    at least as many elements) holds the masked bits instead of a fresh tensor."""
    if tensor.dtype in _EXPONENT_MASKS:
        int_type, mask = _EXPONENT_MASKS[tensor.dtype]
        if tensor.numel() == 0:
            return True
        bits = tensor.contiguous().reshape(-1).view(int_type)
        if scratch is not None and scratch.numel() >= bits.numel():
            masked = torch.bitwise_and(bits, mask, out=scratch[:bits.numel()])
        else:
            masked = torch.bitwise_and(bits, mask)
        return int(masked.max()) != mask
    return bool(torch.isfinite(tensor).all())


class _Shard:
    def __init__(self, path: Path, header_bytes: int, direct: bool = True):
        self.path = path
        self.header_bytes = header_bytes
        self.out = DirectAppender(path, start=header_bytes, direct=direct)
        self.entries: dict[str, dict] = {}
        self.size = 0  # data bytes

    def header(self, metadata: dict[str, str], extra: dict[str, dict] | None = None) -> bytes:
        header = {"__metadata__": metadata} if metadata else {}
        header.update(self.entries)
        header.update(extra or {})
        return json.dumps(header, separators=(",", ":")).encode()

    def close(self, metadata: dict[str, str]) -> None:
        header = self.header(metadata)
        room = self.header_bytes - 8
        if len(header) > room:  # add() prevents this; a guard against a wrong reservation
            raise RuntimeError(f"{self.path}: header of {len(header)} bytes exceeds the reserved {room}")
        try:
            self.out.close()
            self.out.write_at(struct.pack("<Q", room) + header + b" " * (room - len(header)), 0)
        finally:
            self.out.release()


class TensorSink:
    """Receives one tensor's data chunk by chunk (flat, row-major) for a ``ShardedWriter``."""

    def __init__(self, writer: "ShardedWriter", name: str, dtype: torch.dtype, shape: tuple[int, ...], shard: _Shard):
        self.writer, self.name, self.dtype, self.shape, self.shard = writer, name, dtype, shape, shard
        self.expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.written = 0

    def write(self, chunk: torch.Tensor) -> None:
        if chunk.dtype != self.dtype:
            raise TypeError(f"tensor {self.name!r}: chunk dtype {chunk.dtype}, declared {self.dtype}")
        writer = self.writer
        if writer.check_finite and chunk.is_floating_point() and not all_finite(chunk, writer._scratch(chunk)):
            bad = int((~torch.isfinite(chunk)).sum())
            raise NonFiniteWeightsError(f"{self.writer.out_dir}: tensor {self.name!r} has {bad} NaN/inf values; "
                                        "refusing to save it")
        data = _bytes_of(chunk)
        if self.written + len(data) > self.expected:
            raise ValueError(f"tensor {self.name!r}: more data than its shape {self.shape} holds")
        self.shard.out.write(data)
        self.written += len(data)

    def close(self) -> None:
        if self.written != self.expected:
            raise ValueError(f"tensor {self.name!r}: {self.written} bytes written, its shape {self.shape} "
                             f"needs {self.expected}")
        self.writer._open = None


class ShardedWriter:
    """Write a checkpoint tensor by tensor into shards of at most ``max_shard_bytes``; commit
    atomically on leaving the ``with`` block (see the module docstring). ``single_file``: write one
    file of that name instead (no index); a tensor that would need a second one is refused."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: dict[str, str] | None = None, template_dir: str | Path | None = None,
                 check_finite: bool = True, header_bytes: int = HEADER_BYTES, direct: bool = True,
                 single_file: str | None = None):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be ≥ 1, got {max_shard_bytes}")
        if header_bytes % 8 or header_bytes < 64:
            raise ValueError(f"header_bytes must be a multiple of 8 and ≥ 64, got {header_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.template_dir = Path(template_dir) if template_dir is not None else None
        self.check_finite = check_finite
        self.header_bytes = header_bytes
        self.direct = direct
        self.single_file = single_file
        self.shards: list[_Shard] = []
        self.names: set[str] = set()
        self._open: TensorSink | None = None
        self._tmp: Path | None = None
        self._stack: contextlib.ExitStack | None = None
        self._check_buffer: torch.Tensor | None = None

    def _scratch(self, chunk: torch.Tensor) -> torch.Tensor | None:
        """A reused int16 buffer for the finiteness check of half-precision chunks."""
        if chunk.dtype not in _EXPONENT_MASKS:
            return None
        if self._check_buffer is None or self._check_buffer.numel() < chunk.numel():
            self._check_buffer = torch.empty(chunk.numel(), dtype=torch.int16)
        return self._check_buffer

    # --- context ------------------------------------------------------------------------------
    def __enter__(self) -> "ShardedWriter":
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_dir(self.out_dir))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is None:
            try:
                self._finish()
            except BaseException as error:  # noqa: BLE001 - re-raised after the temporary dir is removed
                self._abandon()
                if not stack.__exit__(type(error), error, error.__traceback__):
                    raise
                return False
        else:
            self._abandon()
        return bool(stack.__exit__(exc_type, exc, tb))

    def _abandon(self) -> None:
        for shard in self.shards:
            shard.out.release()

    @property
    def staging(self) -> Path:
        """The directory the output is assembled in until the commit (other files may go there)."""
        if self._tmp is None:
            raise RuntimeError("use ShardedWriter inside a with block")
        return self._tmp

    # --- writing ------------------------------------------------------------------------------
    def tensor(self, name: str, dtype: torch.dtype, shape) -> TensorSink:
        """Start tensor ``name``; write its data with ``sink.write(chunk)`` (flat row-major order,
        any chunk sizes) and finish with ``sink.close()`` before starting the next tensor."""
        if self._tmp is None:
            raise RuntimeError("use ShardedWriter inside a with block")
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open.name!r} is still being written")
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        shape = tuple(int(s) for s in shape)
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        shard = self.shards[-1] if self.shards else None
        entry = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape)}
        if shard is not None and shard.entries:
            end = shard.size + nbytes
            probe = {name: {**entry, "data_offsets": [shard.size, end]}}
            if end > self.max_shard_bytes or len(shard.header(self.metadata, probe)) > self.header_bytes - 8:
                shard.close(self.metadata)
                shard = None
        if shard is None:
            if self.shards and self.single_file:
                raise ValueError(f"tensor {name!r} does not fit the single file {self.single_file} (size or header "
                                 f"reservation of {self.header_bytes} bytes)")
            shard = _Shard(self._tmp / f".shard-{len(self.shards) + 1:05d}", self.header_bytes, self.direct)
            self.shards.append(shard)
        probe = {name: {**entry, "data_offsets": [shard.size, shard.size + nbytes]}}
        if len(shard.header(self.metadata, probe)) > self.header_bytes - 8:
            raise ValueError(f"tensor {name!r}: its header entry does not fit header_bytes={self.header_bytes}")
        shard.entries[name] = probe[name]
        shard.size += nbytes
        self.names.add(name)
        self._open = TensorSink(self, name, dtype, shape, shard)
        return self._open

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        sink = self.tensor(name, tensor.dtype, tensor.shape)
        sink.write(tensor)
        sink.close()

    def patch(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite elements ``index`` (flat, ascending) of tensor ``name``, already written,
        with ``values`` (its dtype), before the commit. Dense runs are rewritten a block at a
        time, isolated elements one by one."""
        if self._open is not None and self._open.name == name:
            raise RuntimeError(f"tensor {name!r} is still being written")
        shard = next((s for s in self.shards if name in s.entries), None)
        if shard is None:
            raise KeyError(f"tensor {name!r} was not written")
        entry = shard.entries[name]
        dtype = DTYPES[entry["dtype"]]
        if values.dtype != dtype or values.numel() != index.numel():
            raise ValueError(f"tensor {name!r}: {index.numel()} indices, {values.numel()} {values.dtype} values; "
                             f"the tensor is {dtype}")
        if self.check_finite and values.is_floating_point() and not all_finite(values):
            raise NonFiniteWeightsError(f"{self.out_dir}: tensor {name!r} would get NaN/inf values; "
                                        "refusing to save it")
        numel = torch.Size(entry["shape"]).numel()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
            raise IndexError(f"tensor {name!r}: patch index outside 0..{numel}")
        size = torch.empty((), dtype=dtype).element_size()
        start = shard.header_bytes + entry["data_offsets"][0]
        if not shard.out.closed:
            shard.out.sync()
        data = values.contiguous().reshape(-1).view(torch.uint8).numpy()
        block = 1 << 16
        fd = os.open(shard.path, os.O_RDWR)
        try:
            blocks = torch.div(index, block, rounding_mode="floor")
            edges = torch.nonzero(blocks[1:] != blocks[:-1]).reshape(-1).add_(1).tolist()
            for a, b in zip([0] + edges, edges + [index.numel()]):
                if b - a >= 64:        # read-modify-write the span of this block
                    first, last = int(index[a]), int(index[b - 1])
                    span = torch.empty((last - first + 1) * size, dtype=torch.uint8)
                    _read_into(fd, memoryview(span.numpy()), start + first * size, str(shard.path))
                    span.view(dtype)[index[a:b] - first] = values[a:b]
                    os.pwrite(fd, memoryview(span.numpy()), start + first * size)
                else:
                    for i in range(a, b):
                        os.pwrite(fd, data[i * size:(i + 1) * size], start + int(index[i]) * size)
        finally:
            os.close(fd)
        if not shard.out.closed:
            shard.out.reload()

    def _finish(self) -> None:
        if self._open is not None:
            raise RuntimeError(f"tensor {self._open.name!r} was not finished")
        if not self.shards:
            self.shards.append(_Shard(self._tmp / ".shard-00001", self.header_bytes, self.direct))
        last = self.shards[-1]
        if not last.out.closed:
            last.close(self.metadata)
        n = len(self.shards)
        names = [self.single_file or WEIGHTS] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for shard, file_name in zip(self.shards, names):
            os.replace(shard.path, self._tmp / file_name)
            weight_map.update(dict.fromkeys(shard.entries, file_name))
        if n > 1:
            total = sum(s.size for s in self.shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self._tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.template_dir is not None:
            copy_template_files(self.template_dir, self._tmp)


def iter_tensors(checkpoint: LazyCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, one at a time, in storage order."""
    for name in checkpoint.names:
        yield name, checkpoint.get(name)
