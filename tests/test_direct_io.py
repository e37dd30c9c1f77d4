"""methods.io.direct: O_DIRECT reads and appends give exactly the bytes of plain file I/O, for
any offsets and lengths, and fall back to buffered I/O where direct transfers are refused."""

import errno
import os
import random

import pytest
import torch

from methods.io import direct
from methods.io.direct import ALIGN, DirectAppender, DirectReader
from methods.io.streaming import LazyCheckpoint, ShardedWriter


@pytest.fixture
def data_file(tmp_path):
    data = random.Random(0).randbytes(5 * ALIGN * 7 + 123)   # not a whole number of blocks
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _read(reader: DirectReader, path, offset: int, length: int) -> tuple[int, bytes]:
    buffer = bytearray(length)
    n = reader.read_into(path, offset, memoryview(buffer))
    return n, bytes(buffer[:n])


@pytest.mark.parametrize("use_direct", [True, False])
def test_reader_returns_the_bytes_of_any_range(data_file, use_direct):
    path, data = data_file
    reader = DirectReader(direct=use_direct, window_bytes=3 * ALIGN)   # small: ranges cross windows
    rng = random.Random(1)
    ranges = [(0, len(data)), (len(data) - 5, 5), (ALIGN - 1, 2), (7, 3 * ALIGN + 11)]
    ranges += [(o, rng.randrange(0, 4 * ALIGN)) for o in (rng.randrange(len(data)) for _ in range(200))]
    position = 0
    for length in [1000, 4096, 3 * ALIGN, 9000] * 20:   # front to back: the read-ahead path
        ranges.append((position % len(data), length))
        position += length
    for offset, length in ranges:
        n, got = _read(reader, path, offset, length)
        expected = data[offset:offset + length]
        assert n == len(expected) and got == expected, (offset, length)
    reader.close()


def test_reader_stops_at_the_end_of_the_file(data_file):
    path, data = data_file
    reader = DirectReader(window_bytes=2 * ALIGN)
    assert _read(reader, path, len(data) - 10, 100) == (10, data[-10:])
    assert _read(reader, path, len(data), 10) == (0, b"")
    reader.close()


def test_reader_falls_back_to_buffered_reads_when_direct_is_refused(data_file, monkeypatch):
    path, data = data_file
    reader = DirectReader(window_bytes=2 * ALIGN)
    calls = []

    def refuse(fd, offset, view):
        calls.append(offset)
        raise OSError(errno.EINVAL, "refused")

    monkeypatch.setattr(DirectReader, "_read_aligned", staticmethod(refuse))
    assert _read(reader, path, 100, 3 * ALIGN) == (3 * ALIGN, data[100:100 + 3 * ALIGN])
    assert _read(reader, path, 5, 7) == (7, data[5:12])
    assert len(calls) == (1 if reader.direct else 0)   # refused once, then buffered for that file
    reader.close()


def test_reader_raises_real_io_errors(data_file, monkeypatch):
    path, _ = data_file

    def broken(fd, offset, view):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(DirectReader, "_read_aligned", staticmethod(broken))
    reader = DirectReader()
    if not reader.direct:
        pytest.skip("no O_DIRECT on this platform")
    with pytest.raises(OSError, match="I/O error"):
        _read(reader, path, 0, 10)
    reader.close()


@pytest.mark.parametrize("use_direct", [True, False])
@pytest.mark.parametrize("start", [0, 100, ALIGN, 3 * ALIGN + 8])
def test_appender_writes_the_bytes_appended(tmp_path, use_direct, start):
    rng = random.Random(start)
    parts = [rng.randbytes(rng.choice([1, 7, ALIGN, 3 * ALIGN + 5, 20_000])) for _ in range(60)]
    path = tmp_path / "out.bin"
    out = DirectAppender(path, start=start, direct=use_direct, staging_bytes=4 * ALIGN)
    for part in parts:
        out.write(memoryview(part))
    out.close()
    out.write_at(b"H" * start, 0)
    out.release()
    assert path.read_bytes() == b"H" * start + b"".join(parts)


def test_appender_keeps_changes_made_in_the_file_while_open(tmp_path):
    """``sync`` → change through another descriptor → ``reload``: later appends keep the change
    (the current staging buffer would otherwise write its old bytes over it)."""
    path = tmp_path / "out.bin"
    out = DirectAppender(path, start=0, staging_bytes=4 * ALIGN)
    out.write(memoryview(b"a" * (5 * ALIGN + 10)))       # one full buffer written, 1 block + 10 staged
    out.sync()
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"XY", 2)                              # in a written buffer
    os.pwrite(fd, b"Z", 4 * ALIGN + 3)                   # in the staged bytes
    os.close(fd)
    out.reload()
    out.write(memoryview(b"b" * (4 * ALIGN)))
    out.close()
    out.release()
    expected = bytearray(b"a" * (5 * ALIGN + 10) + b"b" * (4 * ALIGN))
    expected[2:4], expected[4 * ALIGN + 3] = b"XY", ord("Z")
    assert path.read_bytes() == bytes(expected)


def test_appender_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    out = DirectAppender(path, start=10, staging_bytes=2 * ALIGN)
    if out._direct_fd is None:
        pytest.skip("no O_DIRECT on this file system")
    real = DirectAppender._pwrite_all

    def refuse_direct(fd, view, offset):
        if fd == out._direct_fd:
            raise OSError(errno.EINVAL, "refused")
        real(fd, view, offset)

    monkeypatch.setattr(DirectAppender, "_pwrite_all", staticmethod(refuse_direct))
    data = random.Random(3).randbytes(5 * ALIGN + 1)
    out.write(memoryview(data))
    out.close()
    out.release()
    assert path.read_bytes()[10:] == data


def test_no_o_direct_means_buffered_io(tmp_path, monkeypatch, data_file):
    monkeypatch.setattr(direct, "_O_DIRECT", 0)
    path, data = data_file
    reader = DirectReader()
    assert not reader.direct
    assert _read(reader, path, 3, 50) == (50, data[3:53])
    out = DirectAppender(tmp_path / "o.bin", start=0)
    assert out._direct_fd is None
    out.write(memoryview(b"xyz"))
    out.close()
    out.release()
    assert (tmp_path / "o.bin").read_bytes() == b"xyz"


def test_sharded_writer_direct_and_buffered_give_identical_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i, n in enumerate([5, 3000, 70_001, 1])}
    for use_direct in (True, False):
        with ShardedWriter(tmp_path / f"out-{use_direct}", max_shard_bytes=100_000, direct=use_direct) as writer:
            for name, tensor in state.items():
                sink = writer.tensor(name, tensor.dtype, tensor.shape)
                for a in range(0, tensor.numel(), 777):
                    sink.write(tensor[a:a + 777])
                sink.close()
            index = torch.tensor([0, 2, 60_000])
            writer.patch("t2", index, torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
            writer.add("t9", torch.arange(10, dtype=torch.float32))     # after the patch, same shard
    files = sorted(p.name for p in (tmp_path / "out-True").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out-False").iterdir())
    for name in files:
        assert (tmp_path / "out-True" / name).read_bytes() == (tmp_path / "out-False" / name).read_bytes()
    loaded = LazyCheckpoint(tmp_path / "out-True")
    assert loaded.get("t2")[[0, 2, 60_000]].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(loaded.get("t1"), state["t1"]) and torch.equal(loaded.get("t9"), torch.arange(10.0))


def test_streaming_on_tmpfs_where_o_direct_may_be_refused(tiny_disk):
    """tmpfs refuses O_DIRECT on older kernels (EINVAL at open) and takes it on newer ones:
    either way the checkpoint is written and read back exactly."""
    tensor = torch.randn(40_000).to(torch.bfloat16)
    with ShardedWriter(tiny_disk / "ckpt") as writer:
        writer.add("w", tensor)
    assert torch.equal(LazyCheckpoint(tiny_disk / "ckpt").get("w"), tensor)


def test_a_full_disk_during_a_background_write_is_a_clear_error(tiny_disk):
    with pytest.raises(OSError, match="no space left on the device while writing") as caught:
        with ShardedWriter(tiny_disk / "ckpt") as writer:
            sink = writer.tensor("w", torch.float32, (1 << 20,))   # 4 MiB into 1 MiB
            for _ in range(16):
                sink.write(torch.ones(1 << 16))
            sink.close()
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tiny_disk) == []


def test_empty_reads_and_writes(data_file, tmp_path):
    path, _ = data_file
    assert DirectReader().read_into(path, 5, memoryview(bytearray(0))) == 0
    out = DirectAppender(tmp_path / "e.bin", start=0)
    out.write(memoryview(b""))
    out.write(memoryview(bytearray(b"ab")))     # writable: the GIL-free copy
    out.close()
    out.release()
    assert (tmp_path / "e.bin").read_bytes() == b"ab"
