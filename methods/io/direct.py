"""Direct I/O (``O_DIRECT``) for streaming large checkpoints, with a plain buffered fallback.

Why: a streamed operation reads each input once and writes its output once, so the page cache
buys nothing, and filling it is most of the cost of the I/O. Every buffered byte is copied by the
kernel into page-cache pages it must first allocate; on a virtual machine whose free memory is
handed back to the host (free page reporting, ballooning) each newly touched page also faults on
the host. Measured on the 2-core VM of bench/README.md, 2 GB after the page cache had been idle
for 10 s: a buffered write took 5.0 s of CPU time, an ``O_DIRECT`` write 0.07 s (0.7 s wall);
buffered reads ran at 0.6 GB/s, all of it CPU, direct reads of 8 MiB at 2 GB/s with 0.05 s of
CPU. The data moves between the device and the process's own reused, page-aligned buffers.

``O_DIRECT`` wants file offsets, lengths and memory addresses aligned to the device's logical
block; everything here is aligned to ``ALIGN`` (4 KiB, a multiple of every common logical block
size), so callers keep reading and writing arbitrary byte ranges:

* ``DirectReader`` serves reads of any range from a page-aligned window of one file at a time:
  a read that continues the previous one refills the whole window (``WINDOW_BYTES``, read-ahead
  like the kernel's), a read that jumps elsewhere reads just the aligned blocks it needs (a
  sample of every 16th block reads 1/16 of the file, not all of it).
* ``DirectAppender`` appends to a file through two page-aligned staging buffers; a full buffer is
  written by a background thread while the other one fills, so the device write overlaps the
  caller's computation. ``sync`` makes everything appended so far readable in the file (the last
  partial block padded; ``close`` truncates the padding away), ``reload`` takes back bytes that
  were changed in the file through a normal descriptor (``ShardedWriter.patch``).

Where ``O_DIRECT`` is missing (macOS, Windows) or refused (tmpfs, some network and FUSE file
systems: ``EINVAL`` at open or at the first transfer) both fall back to buffered I/O on the same
code path, silently: only the speed differs, never the bytes (tests/test_direct_io.py runs both).
Mixing the two on one file is safe: the kernel writes back and invalidates cached pages around
a direct transfer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096                 # offsets, lengths and buffers of direct transfers
WINDOW_BYTES = 8 << 20       # read-ahead of DirectReader: 8 MiB reads ran at 2 GB/s, 1 MiB at 1.3
STAGING_BYTES = 4 << 20      # each of DirectAppender's two staging buffers

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _down(n: int) -> int:
    return n - n % ALIGN


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _open_direct(path: Path, flags: int) -> int | None:
    """A descriptor of ``path`` with O_DIRECT, or None where the platform or file system has none."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, flags | _O_DIRECT)
    except OSError as error:
        if _refused(error):
            return None
        raise


def _refused(error: OSError) -> bool:
    """Direct I/O the file system does not support (as opposed to a real I/O error)."""
    return error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def pread_all(fd: int, offset: int, buffer: memoryview) -> int:
    """Read ``len(buffer)`` bytes at ``offset`` through a buffered descriptor, looping over short
    reads; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class DirectReader:
    """Positional reads of byte ranges of files through an aligned window, with the next window
    read ahead in a background thread while a file is read front to back (see the module
    docstring). Thread-safe: one lock guards the windows. ``direct=False`` reads buffered."""

    def __init__(self, direct: bool = True, window_bytes: int = WINDOW_BYTES):
        self.direct = direct and bool(_O_DIRECT)
        size = _up(max(window_bytes, ALIGN))
        self._buffers = [mmap.mmap(-1, size), mmap.mmap(-1, size)] if self.direct else []
        self._addresses = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._buffers]
        self._current = 0
        self._file: Path | None = None
        self._start = self._end = 0          # bytes [start, end) of _file in the current buffer
        self._ahead: tuple[Path, int, Future] | None = None   # (file, start, read) into the other buffer
        self._pool: ThreadPoolExecutor | None = None
        self._direct_fds: dict[Path, int | None] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def _direct_fd(self, file: Path) -> int | None:
        if file not in self._direct_fds:
            self._direct_fds[file] = _open_direct(file, os.O_RDONLY) if self.direct else None
        return self._direct_fds[file]

    def read_into(self, file: Path, offset: int, buffer: memoryview) -> int:
        """Read ``len(buffer)`` bytes of ``file`` at ``offset``; returns the bytes read (fewer
        only at the end of the file)."""
        if not len(buffer):
            return 0
        with self._lock:
            fd = self._direct_fd(file)
            if fd is not None:
                try:
                    return self._read_windowed(file, fd, offset, buffer)
                except OSError as error:
                    if not _refused(error):
                        raise
                    self._settle()
                    os.close(fd)
                    self._direct_fds[file] = None
                    self._file = None
        return pread_all(self._fd(file), offset, buffer)

    @staticmethod
    def _read_aligned(fd: int, offset: int, view: memoryview) -> int:
        """A direct read of whole blocks; a read that ends off a block boundary has met the end
        of the file (and a further one would be refused as unaligned)."""
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            done += n
            if n == 0 or done % ALIGN:
                break
        return done

    def _settle(self) -> tuple[Path, int, int] | None:
        """Wait for the read ahead, if any: (file, start, bytes read) of the other buffer."""
        if self._ahead is None:
            return None
        file, start, future = self._ahead
        self._ahead = None
        return file, start, future.result()

    def _read_ahead(self, file: Path, fd: int) -> None:
        if self._end - self._start < len(self._buffers[0]):
            return                               # the window ended at the end of the file
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dcbench-readahead")
        view = memoryview(self._buffers[self._current ^ 1])
        self._ahead = (file, self._end, self._pool.submit(self._read_aligned, fd, self._end, view))

    def _refill(self, file: Path, fd: int, position: int, wanted_end: int) -> None:
        """Make the current buffer hold ``position``: the read ahead if it is there, else a read
        of a whole window (reading on from the previous one) or of the blocks up to
        ``wanted_end`` (a jump); a window read on from the previous one starts the next ahead."""
        sequential = file == self._file and position == self._end
        ahead = self._settle()
        if ahead is not None and ahead[0] == file and ahead[1] == position:
            self._current ^= 1
            self._file, self._start, self._end = file, position, position + ahead[2]
        else:
            start = _down(position)
            size = len(self._buffers[0])
            length = size if sequential else min(size, _up(wanted_end) - start)
            self._file, self._start = file, start
            self._end = start + self._read_aligned(fd, start, memoryview(self._buffers[self._current])[:length])
        if sequential:
            self._read_ahead(file, fd)

    def _read_windowed(self, file: Path, fd: int, offset: int, buffer: memoryview) -> int:
        if buffer.readonly or not buffer.c_contiguous:
            raise ValueError("read_into needs a writable, contiguous buffer")
        target = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        done = 0
        while done < len(buffer):
            position = offset + done
            if not (self._file == file and self._start <= position < self._end):
                self._refill(file, fd, position, offset + len(buffer))
                if self._end <= position:      # end of file
                    self._file = None
                    break
            n = min(len(buffer) - done, self._end - position)
            # ctypes' memmove releases the GIL (a memoryview slice assignment holds it for the copy)
            ctypes.memmove(target + done, self._addresses[self._current] + position - self._start, n)
            done += n
        return done

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self._settle()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            for fd in [*self._fds.values(), *self._direct_fds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
            self._file = None


class DirectAppender:
    """Append-only writing of one file from byte ``start`` on (the bytes before it are written
    later through ``pwrite``), through two page-aligned staging buffers written in the background
    (see the module docstring). Not thread-safe: one writer."""

    def __init__(self, path: Path, start: int = 0, direct: bool = True, staging_bytes: int = STAGING_BYTES):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._direct_fd = _open_direct(path, os.O_WRONLY) if direct else None
        size = _up(max(staging_bytes, ALIGN))
        self._buffers = [mmap.mmap(-1, size), mmap.mmap(-1, size)]
        self._addresses = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._buffers]
        self._current = 0
        self._base = _down(start)              # file offset of the current buffer's first byte
        self._fill = start - self._base         # bytes of the current buffer in use (zeros before start)
        self._pending: Future | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dcbench-write")
        self.closed = False

    @property
    def size(self) -> int:
        """The file's length once everything appended is written."""
        return self._base + self._fill

    def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        if not len(data):
            return
        source = None if data.readonly else ctypes.addressof(ctypes.c_char.from_buffer(data))
        capacity = len(self._buffers[0])
        done = 0
        while done < len(data):
            n = min(len(data) - done, capacity - self._fill)
            if source is None:
                self._buffers[self._current][self._fill:self._fill + n] = data[done:done + n]
            else:  # releases the GIL, which a slice assignment holds for the whole copy
                ctypes.memmove(self._addresses[self._current] + self._fill, source + done, n)
            self._fill += n
            done += n
            if self._fill == capacity:
                self._wait()
                self._pending = self._pool.submit(self._transfer, self._current, capacity, self._base)
                self._current ^= 1
                self._base += capacity
                self._fill = 0

    def _transfer(self, index: int, length: int, offset: int) -> None:
        """Write the first ``length`` bytes of buffer ``index`` at ``offset`` (direct: padded to
        whole blocks)."""
        view = memoryview(self._buffers[index])
        if self._direct_fd is not None:
            try:
                self._pwrite_all(self._direct_fd, view[:_up(length)], offset)
                return
            except OSError as error:
                if not _refused(error):
                    raise
                os.close(self._direct_fd)
                self._direct_fd = None
        self._pwrite_all(self.fd, view[:length], offset)

    @staticmethod
    def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def write_at(self, data: bytes, offset: int) -> None:
        """Write ``data`` at ``offset`` through the buffered descriptor (the bytes before
        ``start``, e.g. a header, once the appended bytes are written: after ``close``)."""
        self._pwrite_all(self.fd, memoryview(data), offset)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def sync(self) -> None:
        """Make every appended byte readable from the file (through any descriptor)."""
        self._wait()
        if self._fill:
            self._transfer(self._current, self._fill, self._base)

    def reload(self) -> None:
        """Take the current buffer's bytes back from the file after they were changed there
        (``sync`` first), so later transfers do not overwrite the change."""
        view = memoryview(self._buffers[self._current])[:self._fill]
        if pread_all(self.fd, self._base, view) < len(view):
            raise OSError(errno.EIO, f"{self.path}: shorter than the bytes appended to it")

    def close(self) -> None:
        """Write what is left and cut the padding of the last direct block; the descriptor
        ``fd`` stays open for ``pwrite`` until ``release``."""
        if self.closed:
            return
        try:
            self.sync()
            os.ftruncate(self.fd, self.size)
        finally:
            self._stop()

    def _stop(self) -> None:
        """No more appending: the writer thread and the direct descriptor end."""
        self.closed = True
        self._pool.shutdown(wait=True)
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None

    def release(self) -> None:
        """Close everything, after ``close`` or instead of it (on failure: nothing is flushed)."""
        if not self.closed:
            self._stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._buffers = []   # freed with the last view of them (a traceback may hold one)
