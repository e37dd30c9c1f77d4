"""The packed quantization artifact, exact bits per parameter, and the on-grid check (spec quantization.md §7).

Layout of an artifact directory (written atomically: a temporary sibling renamed into place)::

    quantized.safetensors   every tensor, keys "quantized/<name>/<part>" and "passthrough/<name>"
    artifact.json           format version, the caller's metadata, and per quantized tensor its shape,
                            bits, group width, decode kind, implicit zero, codes dtype and the layout
                            of each stored part (key, packed bit width and count, or raw dtype/shape)

Parts of one ``QuantizedTensor`` and how they are stored:

- ``codes``: packed at ``bits`` bits per code into a little-endian bit stream (uint8). Code i occupies
  stream bits [i·b, (i+1)·b), least significant bit first; stream bit j is bit (j mod 8) of byte j // 8.
- ``scale``: stored as is, in its own dtype (the grid's ``scale_dtype``: float16, bfloat16 or float32).
- ``zero``: when every zero-point is an integer in [0, 2^bits) (Grid A, the GPTQ ``qzeros`` convention)
  it is packed at ``bits`` bits like the codes; otherwise (e.g. a float zero-point) it is stored raw in its
  dtype. Absent (0 bits) when the zero-point is implicit (Grids S/R, StatsQ).
- ``extras``: ``g_idx`` (group of every input column, act-order) is packed at max(1, ⌈log2(groups)⌉)
  bits; any other extra (``exponent``, ...) is stored raw in its dtype.

``load_artifact`` restores every tensor with its original dtype and shape, so a save/load round trip is
bit-exact. ``info`` and ``metadata`` travel through JSON (tuples come back as lists); the returned
metadata additionally carries the reserved key ``"bits"``: the bit accounting of the files as read
(``save_artifact`` returns the same dict and refuses caller metadata that already has a ``"bits"`` key).
Passthrough entries whose names are also quantized are not stored: the quantized record stands for that
tensor (so a caller may pass the whole source state dict as passthrough). ``artifact_hash`` is a
content hash of the stored tensors and their layout (not the metadata), a cache key for the weights.

Bit accounting (``bit_accounting``) reads the *written* artifact: the JSON for packed widths and counts
and the safetensors header for the dtype and shape of raw tensors. Counted, per quantized tensor:

    code_bits  = numel · b                     (the packed stream's ≤ 7 padding bits are not counted)
    scale_bits = (number of scales) · (scale dtype bits)
    zero_bits  = (number of zero-points) · b   if packed, · (dtype bits) if raw, 0 if implicit
    extra_bits = Σ extras: count · packed bits (g_idx) or numel · dtype bits
    bpp        = (code_bits + scale_bits + zero_bits + extra_bits) / numel

and for every passthrough tensor numel · (its stored dtype bits): a float32 passthrough counts 32 bits,
so callers that want the spec's "unquantized at 16 bits" store passthrough tensors in 16-bit. Totals:
``quantized_bpp`` = Σ quantized bits / Σ quantized numel; ``model_bpp`` = (Σ quantized bits + Σ
passthrough bits) / (Σ quantized numel + Σ passthrough numel). Tied tensors are the caller's concern:
pass a tied tensor once. JSON text and the safetensors header are file-format overhead, not counted.

Consequences for the spec §7 table: per-channel asym with an fp16 scale and a b-bit zero costs
b + (16 + b)/n (the table's "fp16 s + fp16 z" row assumes a 16-bit zero); g128 asym is b + (16 + b)/128;
g64 sym is b + 16/64 (3-bit: exactly 3.25).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from methods.io.checkpoint import CorruptCheckpointError, atomic_dir, write_json
from methods.quantize.common import DECODE_KINDS, QuantizedTensor

FORMAT = "dcbench-quantized"
VERSION = 1
TENSORS_FILE = "quantized.safetensors"
JSON_FILE = "artifact.json"
_CHUNK = 1 << 18  # values per packing chunk (a multiple of 8, so every chunk starts on a byte boundary)

# safetensors header dtype names -> (torch dtype, bits per element)
_ST_DTYPES = {
    "BOOL": (torch.bool, 8), "U8": (torch.uint8, 8), "I8": (torch.int8, 8), "I16": (torch.int16, 16),
    "U16": (torch.uint16, 16), "I32": (torch.int32, 32), "U32": (torch.uint32, 32), "I64": (torch.int64, 64),
    "U64": (torch.uint64, 64), "F16": (torch.float16, 16), "BF16": (torch.bfloat16, 16),
    "F32": (torch.float32, 32), "F64": (torch.float64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8), "F8_E5M2": (torch.float8_e5m2, 8),
}


# ---------------------------------------------------------------------------------------------- packing

def _check_bits(bits: int, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{what} must be an integer in [1, 16], got {bits!r}")
    return bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2^bits into a little-endian bit stream (1-D uint8 of
    ⌈numel·bits/8⌉ bytes), flattening ``values`` in row-major order. Float input must hold integers."""
    bits = _check_bits(bits)
    flat = values.detach().reshape(-1).cpu()
    if flat.is_floating_point():
        if not torch.isfinite(flat).all() or not torch.equal(flat, torch.round(flat)):
            raise ValueError("pack_bits: values must be integers (got non-integer floats)")
    elif flat.dtype == torch.bool or flat.is_complex():
        raise ValueError(f"pack_bits: values must be integers, got dtype {flat.dtype}")
    flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: values span [{int(flat.min())}, {int(flat.max())}], outside "
                         f"[0, {(1 << bits) - 1}] for bits={bits}")
    count = flat.numel()
    if 8 % bits == 0:   # whole codes per byte, no bit stream (4-bit codes of a 0.25B model: 0.06 s, not 1.2 s)
        per = 8 // bits
        codes = torch.cat([flat, flat.new_zeros((-count) % per)]).to(torch.uint8).view(-1, per)
        out = codes[:, 0].clone()
        for i in range(1, per):
            out.bitwise_or_(codes[:, i] << (i * bits))
        return out
    out = torch.zeros((count * bits + 7) // 8, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    byte_weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    for start in range(0, count, _CHUNK):
        part = flat[start:start + _CHUNK]
        stream = ((part[:, None] >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.reshape(-1, 8) * byte_weights).sum(dim=1).to(torch.uint8)
        first = start * bits // 8
        out[first:first + packed.numel()] = packed
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Exact inverse of ``pack_bits``: the first ``count`` values (1-D int32) of a packed stream."""
    bits = _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 stream, got {packed.dtype} of shape {tuple(packed.shape)}")
    if count < 0 or packed.numel() != (count * bits + 7) // 8:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes cannot hold exactly {count} values of {bits} bits "
                         f"(expected {(count * bits + 7) // 8} bytes)")
    if 8 % bits == 0:   # whole codes per byte, the first in the low bits
        packed = packed.cpu()
        per, mask = 8 // bits, (1 << bits) - 1
        codes = torch.stack([(packed >> (i * bits)) & mask for i in range(per)], dim=1)
        return codes.reshape(-1)[:count].to(torch.int32)
    packed = packed.cpu().to(torch.int64)
    out = torch.empty(count, dtype=torch.int32)
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_index = torch.arange(8, dtype=torch.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first:first + (n * bits + 7) // 8]
        stream = ((chunk[:, None] >> bit_index) & 1).reshape(-1)[:n * bits].reshape(n, bits)
        out[start:start + n] = (stream << shifts).sum(dim=1).to(torch.int32)
    return out


def index_bits(groups: int) -> int:
    """Bits per packed g_idx entry: ⌈log2(groups)⌉, at least 1 (a one-group index still takes a bit)."""
    if groups < 1:
        raise ValueError(f"index_bits: groups must be >= 1, got {groups}")
    return max(1, (groups - 1).bit_length())


# -------------------------------------------------------------------------------------- on-grid check

class OffGridError(ValueError):
    """A (fake-)quantized tensor has more distinct values in some group than its bit width allows."""


def _levels_per_group(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in every group (group_ids: one int64 id per entry, same shape)."""
    values = values.reshape(-1).to(torch.float64) + 0.0   # -0.0 and 0.0 are one level
    ids = group_ids.reshape(-1).to(torch.int64)
    pairs = torch.unique(torch.stack([ids.to(torch.float64), values], dim=1), dim=0)
    return torch.bincount(pairs[:, 0].to(torch.int64), minlength=int(ids.max()) + 1 if ids.numel() else 0)


def assert_on_grid(x: QuantizedTensor | torch.Tensor, bits: int | None = None, *, group_size: int = -1,
                   name: str = "tensor") -> int:
    """Check that every group holds at most 2^bits distinct values; returns the largest count.

    For a ``QuantizedTensor`` the codes must also be integers in [0, 2^bits) and the scale/zero shapes
    must match the groups; the dequantized tensor is checked with the record's own groups (``g_idx`` or
    contiguous runs of ``width`` columns; a one-row scale shares its groups across all rows). For a plain
    (fake-quantized) 2-D tensor, pass ``bits`` and ``group_size`` (-1 per row, 0 whole tensor, g > 0 runs
    of g input columns), the §7 step-2 check before counting its metadata analytically."""
    if isinstance(x, QuantizedTensor):
        bits = _check_bits(x.bits, f"{name}: bits")
        codes = x.codes
        if codes.dim() != 2 or codes.is_floating_point() or codes.dtype == torch.bool:
            raise OffGridError(f"{name}: codes must be a 2-D integer tensor, got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
            raise OffGridError(f"{name}: codes span [{int(codes.min())}, {int(codes.max())}], outside "
                               f"[0, {(1 << bits) - 1}] for bits={bits}")
        rows, cols = codes.shape
        index = x.group_index().cpu()
        groups = x.scale.shape[1]
        if index.numel() != cols or (cols and (int(index.min()) < 0 or int(index.max()) >= groups)):
            raise OffGridError(f"{name}: group index does not map {cols} columns onto {groups} scale groups")
        if x.scale.dim() != 2 or x.scale.shape[0] not in (1, rows):
            raise OffGridError(f"{name}: scale shape {tuple(x.scale.shape)} does not fit codes {tuple(codes.shape)}")
        if x.zero is not None and x.zero.shape != x.scale.shape:
            raise OffGridError(f"{name}: zero shape {tuple(x.zero.shape)} differs from scale {tuple(x.scale.shape)}")
        values = x.dequantize().cpu()
        row_block = torch.arange(rows)[:, None] if x.scale.shape[0] == rows else torch.zeros(rows, 1, dtype=torch.long)
        ids = row_block * groups + index[None, :]
    else:
        if bits is None:
            raise ValueError(f"{name}: assert_on_grid on a plain tensor needs bits")
        bits = _check_bits(bits, f"{name}: bits")
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) tensor, got shape {tuple(x.shape)}")
        rows, cols = x.shape
        values = x.detach().cpu()
        if group_size == -1:
            ids = torch.arange(rows)[:, None].expand(rows, cols)
        elif group_size == 0:
            ids = torch.zeros(rows, cols, dtype=torch.long)
        elif group_size > 0 and cols % group_size == 0:
            per_row = cols // group_size
            ids = torch.arange(rows)[:, None] * per_row + (torch.arange(cols) // group_size)[None, :]
        else:
            raise ValueError(f"{name}: group_size must be -1, 0 or a divisor of {cols}, got {group_size}")
    if not torch.isfinite(values).all():
        raise OffGridError(f"{name}: has NaN/inf values")
    if values.numel() == 0:
        return 0
    counts = _levels_per_group(values, ids)
    worst = int(counts.max())
    if worst > 1 << bits:
        group = int(counts.argmax())
        raise OffGridError(f"{name}: group {group} holds {worst} distinct values, more than 2^{bits} = {1 << bits}")
    return worst


# ------------------------------------------------------------------------------------------- save/load

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def _integral_in(values: torch.Tensor, bits: int) -> bool:
    """Every value an integer in [0, 2^bits) (so it packs at ``bits`` bits without loss)."""
    if values.dtype == torch.bool or values.is_complex():
        return False
    v = values.detach().cpu()
    if v.is_floating_point():
        if not torch.isfinite(v).all() or not torch.equal(v, torch.round(v)):
            return False
    if v.numel() == 0:
        return True
    return float(v.min()) >= 0 and float(v.max()) < 2 ** bits


def _check_record(name: str, qt: QuantizedTensor) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"quantized[{name!r}]: expected a QuantizedTensor, got {type(qt).__name__}")
    if qt.decode not in DECODE_KINDS:
        raise ValueError(f"quantized[{name!r}]: decode {qt.decode!r} is not one of {list(DECODE_KINDS)}")
    if qt.codes.dim() != 2:
        raise ValueError(f"quantized[{name!r}]: codes must be 2-D (out, in), got shape {tuple(qt.codes.shape)}")
    if qt.scale.dim() != 2 or qt.scale.shape[0] not in (1, qt.codes.shape[0]):
        raise ValueError(f"quantized[{name!r}]: scale shape {tuple(qt.scale.shape)} does not fit codes "
                         f"{tuple(qt.codes.shape)} (one row, or one per output row)")
    if qt.zero is None and qt.implicit_zero is None and qt.decode != "midrise":
        raise ValueError(f"quantized[{name!r}]: needs a stored zero or an implicit_zero for decode {qt.decode!r}")


def _key(name: str, part: str) -> str:
    return f"quantized/{name}/{part}"


def _record_parts(name: str, qt: QuantizedTensor) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """The artifact.json record of one quantized tensor and its stored parts (key, tensor), packed."""
    _check_record(name, qt)
    bits = _check_bits(qt.bits, f"quantized[{name!r}].bits")
    rows, cols = qt.codes.shape
    record = {"shape": [rows, cols], "bits": bits, "width": int(qt.width), "decode": qt.decode,
              "implicit_zero": qt.implicit_zero, "codes_dtype": _dtype_name(qt.codes.dtype),
              "info": qt.info}
    try:
        parts = [(_key(name, "codes"), pack_bits(qt.codes, bits))]
    except ValueError as error:
        raise ValueError(f"quantized[{name!r}].codes: {error}") from None
    record["codes"] = {"key": _key(name, "codes"), "packed_bits": bits, "count": rows * cols}
    parts.append((_key(name, "scale"), qt.scale))
    record["scale"] = {"key": _key(name, "scale")}
    if qt.zero is None:
        record["zero"] = None
    elif _integral_in(qt.zero, bits):
        parts.append((_key(name, "zero"), pack_bits(qt.zero, bits)))
        record["zero"] = {"key": _key(name, "zero"), "packed_bits": bits, "count": qt.zero.numel(),
                          "shape": list(qt.zero.shape), "dtype": _dtype_name(qt.zero.dtype)}
    else:
        parts.append((_key(name, "zero"), qt.zero))
        record["zero"] = {"key": _key(name, "zero")}
    extras = {}
    for extra, value in qt.extras.items():
        key = _key(name, f"extra/{extra}")
        if extra == "g_idx":
            width = index_bits(qt.scale.shape[1])
            if not _integral_in(value, width) or (value.numel() and int(value.max()) >= qt.scale.shape[1]):
                raise ValueError(f"quantized[{name!r}].extras['g_idx']: entries must be group numbers in "
                                 f"[0, {qt.scale.shape[1]})")
            parts.append((key, pack_bits(value, width)))
            extras[extra] = {"key": key, "packed_bits": width, "count": value.numel(),
                             "shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        else:
            parts.append((key, value))
            extras[extra] = {"key": key}
    record["extras"] = extras
    return record, parts


def _check_metadata(metadata: dict) -> None:
    if not isinstance(metadata, dict) or "bits" in metadata:
        raise ValueError("save_artifact: metadata must be a dict without the key 'bits' (reserved for the "
                         "bit accounting that load_artifact adds)")


def _document(metadata: dict, records: dict, passthrough: list[str]) -> dict:
    document = {"format": FORMAT, "version": VERSION, "metadata": metadata, "tensors": records,
                "passthrough": sorted(passthrough)}
    try:
        json.dumps(document)
    except TypeError as error:
        raise TypeError(f"save_artifact: metadata and info must be JSON-serialisable ({error})") from None
    return document


def save_artifact(path_dir: str | Path, quantized: dict[str, QuantizedTensor],
                  passthrough: dict[str, torch.Tensor], metadata: dict) -> dict:
    """Write the artifact directory ``path_dir`` atomically (see the module docstring for the layout) and
    return its ``bit_accounting``. ``metadata`` (and each record's ``info``) must be JSON-serialisable;
    passthrough tensors named like a quantized one are left out (the quantized record replaces them).
    ``ArtifactWriter`` writes the same artifact one tensor at a time."""
    _check_metadata(metadata)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def put(key: str, tensor: torch.Tensor) -> None:
        if key in tensors:
            raise ValueError(f"save_artifact: two tensors would be stored under the key {key!r}; rename one")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share memory (tied weights, views): copy only those
        if storage.data_ptr() in storages or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor

    passthrough = {name: tensor for name, tensor in passthrough.items() if name not in quantized}
    records = {}
    for name, qt in quantized.items():
        records[name], parts = _record_parts(name, qt)
        for key, tensor in parts:
            put(key, tensor)
    for name, tensor in passthrough.items():
        _check_passthrough(name, tensor)
        put(f"passthrough/{name}", tensor)
    document = _document(metadata, records, list(passthrough))
    with atomic_dir(path_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
        write_json(document, tmp / JSON_FILE)
    return bit_accounting(path_dir)


def _check_passthrough(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"passthrough[{name!r}]: expected a tensor, got {type(tensor).__name__}")


class ArtifactWriter:
    """``save_artifact`` one tensor at a time, for models that do not fit in memory: ``add`` a
    quantized record or ``add_passthrough`` a tensor (chunk by chunk with ``passthrough_sink``) as
    they come, inside a ``with`` block that commits the directory atomically on success. The
    result reads back like ``save_artifact``'s, with the same ``artifact_hash``.

    The safetensors header is written last, into space reserved at the front of the file, so the
    reservation is sized from ``names`` (every tensor that may be added) before the first byte."""

    # header bytes per stored key beyond its name: dtype, shape and offsets as JSON
    _ENTRY_BYTES = 128
    # stored parts per quantized tensor at most: codes, scale, zero, g_idx, one more extra
    _PARTS = ("codes", "scale", "zero", "extra/g_idx", "extra/exponent")

    def __init__(self, path_dir: str | Path, metadata: dict, names: list[str]):
        from methods.io.streaming import ShardedWriter

        _check_metadata(metadata)
        self.path_dir = Path(path_dir)
        self.metadata = metadata
        self.records: dict[str, dict] = {}
        self.passthrough: list[str] = []
        keys = [_key(n, part) for n in names for part in self._PARTS] + [f"passthrough/{n}" for n in names]
        header = 4096 + sum(len(k.encode()) + self._ENTRY_BYTES for k in keys)
        self.writer = ShardedWriter(self.path_dir, max_shard_bytes=1 << 62, header_bytes=-(-header // 8) * 8,
                                    metadata={"format": FORMAT, "version": str(VERSION)}, check_finite=False,
                                    single_file=TENSORS_FILE)

    def __enter__(self) -> "ArtifactWriter":
        self.writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                write_json(_document(self.metadata, self.records, self.passthrough), self.writer.staging / JSON_FILE)
            except BaseException as error:  # noqa: BLE001 - re-raised once the staging directory is gone
                self.writer.__exit__(type(error), error, error.__traceback__)
                raise
        return self.writer.__exit__(exc_type, exc, tb)

    def add(self, name: str, qt: QuantizedTensor) -> None:
        if name in self.records or name in self.passthrough:
            raise ValueError(f"ArtifactWriter: tensor {name!r} added twice")
        record, parts = _record_parts(name, qt)
        for key, tensor in parts:
            self.writer.add(key, tensor.detach().cpu().contiguous())
        self.records[name] = record

    def passthrough_sink(self, name: str, dtype: torch.dtype, shape):
        """A sink for passthrough tensor ``name`` (``write`` its chunks, then ``close``)."""
        if name in self.records or name in self.passthrough:
            raise ValueError(f"ArtifactWriter: tensor {name!r} added twice")
        self.passthrough.append(name)
        return self.writer.tensor(f"passthrough/{name}", dtype, shape)

    def add_passthrough(self, name: str, tensor: torch.Tensor) -> None:
        _check_passthrough(name, tensor)
        sink = self.passthrough_sink(name, tensor.dtype, tensor.shape)
        sink.write(tensor.detach().cpu().contiguous())
        sink.close()


def _read_document(path_dir: Path) -> dict:
    json_path, tensor_path = path_dir / JSON_FILE, path_dir / TENSORS_FILE
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"{path_dir} is not a quantized artifact (needs {JSON_FILE} and {TENSORS_FILE})")
    try:
        document = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(f"{json_path}: unreadable JSON ({error})") from None
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise CorruptCheckpointError(f"{json_path}: format {document.get('format')!r} version "
                                     f"{document.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return document


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types for truncated/garbled files
        raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({error})") from None


def _unpacked(handle, part: dict, where: str) -> torch.Tensor:
    packed = handle.get_tensor(part["key"])
    try:
        return unpack_bits(packed, part["packed_bits"], part["count"])
    except ValueError as error:
        raise CorruptCheckpointError(f"{where}: {error}") from None


def load_artifact(path_dir: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor], dict]:
    """Read an artifact back: (quantized records, passthrough tensors, metadata), bit-exact to what was
    saved; the metadata also carries ``"bits"``, the ``bit_accounting`` of the files."""
    path_dir = Path(path_dir)
    document = _read_document(path_dir)
    quantized: dict[str, QuantizedTensor] = {}
    with _open(path_dir / TENSORS_FILE) as handle:
        keys = set(handle.keys())
        for name, record in document["tensors"].items():
            where = f"{path_dir}: quantized tensor {name!r}"
            parts = [record["codes"], record["scale"]] + ([record["zero"]] if record["zero"] else []) \
                + list(record["extras"].values())
            missing = [p["key"] for p in parts if p["key"] not in keys]
            if missing:
                raise CorruptCheckpointError(f"{where}: missing stored tensor {missing[0]!r}")
            rows, cols = record["shape"]
            codes = _unpacked(handle, record["codes"], where).reshape(rows, cols)
            codes = codes.to(_dtype_of(record["codes_dtype"], where))
            scale = handle.get_tensor(record["scale"]["key"])
            zero = None
            if record["zero"] is not None:
                part = record["zero"]
                if "packed_bits" in part:
                    zero = _unpacked(handle, part, where).reshape(part["shape"]).to(_dtype_of(part["dtype"], where))
                else:
                    zero = handle.get_tensor(part["key"])
            extras = {}
            for extra, part in record["extras"].items():
                if "packed_bits" in part:
                    extras[extra] = _unpacked(handle, part, where).reshape(part["shape"]).to(
                        _dtype_of(part["dtype"], where))
                else:
                    extras[extra] = handle.get_tensor(part["key"])
            quantized[name] = QuantizedTensor(codes=codes, bits=record["bits"], scale=scale, zero=zero,
                                              implicit_zero=record["implicit_zero"], width=record["width"],
                                              decode=record["decode"], extras=extras, info=record["info"])
        passthrough = {}
        for name in document["passthrough"]:
            key = f"passthrough/{name}"
            if key not in keys:
                raise CorruptCheckpointError(f"{path_dir}: missing passthrough tensor {name!r}")
            passthrough[name] = handle.get_tensor(key)
    return quantized, passthrough, {**document["metadata"], "bits": bit_accounting(path_dir)}


def artifact_hash(path_dir: str | Path) -> str:
    """SHA-256 of every stored tensor (key, dtype, shape, bytes; in key order) and of the tensor layout
    (shapes, bits, decode kinds, packing), excluding the metadata: identical weights hash alike whatever
    run wrote them. The file's own bytes are not hashed: safetensors writes its header map in no fixed
    order."""
    path_dir = Path(path_dir)
    document = _read_document(path_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps({"tensors": document["tensors"], "passthrough": document["passthrough"]},
                             sort_keys=True).encode())
    with _open(path_dir / TENSORS_FILE) as handle:
        for key in sorted(handle.keys()):
            tensor = handle.get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------- bit accounting

def bit_accounting(path_dir: str | Path) -> dict:
    """Exact bits of a written artifact (what is counted: see the module docstring).

    Returns ``{"tensors": {name: {numel, bits, code_bits, scale_bits, zero_bits, extra_bits,
    total_bits, bpp}}, "passthrough": {name: {numel, dtype, total_bits}}, "quantized_numel",
    "quantized_bits", "quantized_bpp", "passthrough_numel", "passthrough_bits", "model_numel",
    "model_bits", "model_bpp"}``; a bpp over zero parameters is None. Packed parts are counted at
    count · packed bits after checking that the stored byte length is exactly ⌈count · bits / 8⌉."""
    path_dir = Path(path_dir)
    document = _read_document(path_dir)
    with _open(path_dir / TENSORS_FILE) as handle:
        keys = set(handle.keys())

        def stored_bits(part: dict, where: str) -> int:
            if part["key"] not in keys:
                raise CorruptCheckpointError(f"{where}: missing stored tensor {part['key']!r}")
            piece = handle.get_slice(part["key"])
            dtype, shape = piece.get_dtype(), piece.get_shape()
            numel = math.prod(shape)
            if "packed_bits" in part:
                expected = (part["count"] * part["packed_bits"] + 7) // 8
                if dtype != "U8" or numel != expected:
                    raise CorruptCheckpointError(
                        f"{where}: packed {part['key']!r} holds {numel} {dtype} elements, expected {expected} "
                        f"U8 for {part['count']} x {part['packed_bits']} bits")
                return part["count"] * part["packed_bits"]
            if dtype not in _ST_DTYPES:
                raise CorruptCheckpointError(f"{where}: {part['key']!r} has unsupported dtype {dtype}")
            return numel * _ST_DTYPES[dtype][1]

        per_tensor = {}
        for name, record in document["tensors"].items():
            where = f"{path_dir}: quantized tensor {name!r}"
            numel = record["shape"][0] * record["shape"][1]
            if record["codes"]["count"] != numel:
                raise CorruptCheckpointError(f"{where}: {record['codes']['count']} codes for shape {record['shape']}")
            code_bits = stored_bits(record["codes"], where)
            scale_bits = stored_bits(record["scale"], where)
            zero_bits = stored_bits(record["zero"], where) if record["zero"] is not None else 0
            extra_bits = sum(stored_bits(part, where) for part in record["extras"].values())
            total = code_bits + scale_bits + zero_bits + extra_bits
            per_tensor[name] = {"numel": numel, "bits": record["bits"], "code_bits": code_bits,
                                "scale_bits": scale_bits, "zero_bits": zero_bits, "extra_bits": extra_bits,
                                "total_bits": total, "bpp": total / numel if numel else None}
        passthrough = {}
        for name in document["passthrough"]:
            key = f"passthrough/{name}"
            if key not in keys:
                raise CorruptCheckpointError(f"{path_dir}: missing passthrough tensor {name!r}")
            piece = handle.get_slice(key)
            dtype, numel = piece.get_dtype(), math.prod(piece.get_shape())
            if dtype not in _ST_DTYPES:
                raise CorruptCheckpointError(f"{path_dir}: passthrough {name!r} has unsupported dtype {dtype}")
            passthrough[name] = {"numel": numel, "dtype": _dtype_name(_ST_DTYPES[dtype][0]),
                                 "total_bits": numel * _ST_DTYPES[dtype][1]}
    q_numel = sum(t["numel"] for t in per_tensor.values())
    q_bits = sum(t["total_bits"] for t in per_tensor.values())
    p_numel = sum(t["numel"] for t in passthrough.values())
    p_bits = sum(t["total_bits"] for t in passthrough.values())
    return {"tensors": per_tensor, "passthrough": passthrough,
            "quantized_numel": q_numel, "quantized_bits": q_bits,
            "quantized_bpp": q_bits / q_numel if q_numel else None,
            "passthrough_numel": p_numel, "passthrough_bits": p_bits,
            "model_numel": q_numel + p_numel, "model_bits": q_bits + p_bits,
            "model_bpp": (q_bits + p_bits) / (q_numel + p_numel) if q_numel + p_numel else None}
