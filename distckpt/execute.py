"""The hot path: write a rank's chunks into one data file, read a box of a tensor from its chunks.

Plans come from :mod:`distckpt.plan`; storage is :mod:`distckpt.storage`.

* :func:`write_chunk_file` -- one safetensors data file of chunks, crc32c per
  block computed beside the writes, fsynced; returns the chunk records;
* :func:`read_box` -- fill a box of a tensor from the chunks that overlap it,
  reading only their needed bytes (cost-planned), verifying the checksum
  blocks the read touches;
* :class:`ReadStats` -- bytes needed / read / requests, for the ratio reports.

Chunks come from :meth:`distckpt.index.TensorInfo.overlapping` (a version-2 index answers from its
chunk table and builds objects for the hits only); the checksums a read verifies are fetched for
the blocks it touches only (:func:`_want_crcs`: one read per chunk from a version-2 checksum column).

On a local disk both go straight between the arrays and the file (no
intermediate buffers, no per-block Python loops on the data):

* writes: the header is computed first, then ``os.writev`` hands the arrays'
  own buffers to the kernel, every short write resumed (so every byte is
  checked to have landed); crc32c runs on a helper thread over the same
  buffers while the writes go on, and the file is fsynced;
* reads: the file is mapped once (``mmap``, read-only) and a box is one
  vectorised numpy copy out of the mapped chunk, strided boxes included, so the
  page cache does the narrowing; a box that *is* a whole chunk is returned as an
  array over a private copy-on-write mapping of its own (no copy at all; writing
  to it changes nothing else).  Checksums of the touched blocks are computed on
  helper threads beside the copies.
Object stores keep the planned ranged reads (:func:`distckpt.plan.plan_box_reads`).
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c as _crc
import numpy as np

from . import dtypes
from .codecs.safetensors import SafetensorsWriter
from .errors import ChecksumError, DistCkptError, FormatError, OutOfSpaceError, StorageError
from .index import Chunk, TensorInfo
from .layout import Box
from .plan import LOCAL_COST, REMOTE_COST, c_strides, plan_box_reads
from .storage import Storage
from .storage.local import open_regular

__all__ = ["block_crcs", "write_chunk_file", "read_box", "ReadStats", "PendingChunk"]

DEFAULT_BLOCK_SIZE = 1 << 20
_WRITE_PIECE = 8 << 20


MIN_BLOCK_SIZE = 4 << 10
BLOCKS_PER_CHUNK = 256


def chunk_block_size(nbytes: int, max_block: int = DEFAULT_BLOCK_SIZE) -> int:
    """Checksum block size for a chunk: about 1/256 of it, a power of two in [4 KiB, max_block].

    Small enough that a read of an eighth of a chunk, expanded to whole blocks for
    verification, stays within 1.05x of the bytes needed; large enough that the
    index holds at most ~256 checksums per chunk.
    """
    b = MIN_BLOCK_SIZE
    while b < max_block and b * BLOCKS_PER_CHUNK < nbytes:
        b *= 2
    return min(b, 1 << (max(max_block, 1).bit_length() - 1))  # a power of two even if max_block is not


def block_crcs(data, block_size: int) -> list[int]:
    mv = memoryview(data).cast("B")
    return [_crc.crc32c(mv[i : i + block_size]) for i in range(0, len(mv), block_size)]


@dataclass
class PendingChunk:
    """A chunk to write: ``fetch()`` returns exactly ``box`` of tensor ``name``.

    ``fetch`` runs just before the chunk is written, so a writer that reads its
    chunks from another checkpoint holds one chunk in memory at a time.
    """

    name: str
    box: Box
    dtype: str
    fetch: Callable[[], np.ndarray]

    @classmethod
    def of(cls, name: str, box: Box, array: np.ndarray) -> PendingChunk:
        return cls(name, box, dtypes.name_of(array.dtype), lambda: array)

    @property
    def key(self) -> str:
        """The chunk's name inside its data file: ``{tensor}@{offset0},{offset1},...`` (``{tensor}@`` for a
        scalar).  The part after the last ``@`` never holds an ``@``, so keys of different tensors never
        collide, whatever the tensor names (``x`` at offset 0 and a tensor named ``x@0`` included)."""
        return self.name + "@" + ",".join(str(o) for o in self.box.offsets)


def write_chunk_file(
    storage: Storage,
    fname: str,
    pending: Sequence[PendingChunk],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rank: int | None = None,
    checksums: bool = True,
) -> tuple[dict[str, list[Chunk]], int]:
    """Write chunks as one safetensors file; checksum each block inline.

    Returns the chunk records per tensor name and the file size.  On any
    failure the partial file is removed.
    """
    if storage.is_local:
        return _write_local(storage, fname, pending, block_size=block_size, rank=rank, checksums=checksums)
    specs = [(p.key, p.dtype, p.box.sizes) for p in pending]
    f: Any = storage.open_write(fname)  # a storage Writer; the codecs take any object with write()
    # checksums run on a helper thread one piece behind the writer (crc32c and
    # the writes release the GIL), the last ones beside the final fsync
    pool = ThreadPoolExecutor(1, thread_name_prefix="distckpt-crc") if checksums else None
    written: list[tuple[PendingChunk, int, int, int, list[Future]]] = []  # chunk, start, bytes, block, crc jobs
    try:
        w = SafetensorsWriter(f, specs, metadata={"format": "distckpt"})
        for p in pending:
            arr = _fetch(p)
            mv = dtypes.byteview(arr)
            bs = chunk_block_size(len(mv), block_size)
            start = w.data_offset(p.key)
            piece = max(bs, (_WRITE_PIECE // bs) * bs)  # whole checksum blocks
            jobs: list[Future] = []
            for i in range(0, len(mv), piece):
                part = mv[i : i + piece]
                if pool is not None:
                    jobs.append(pool.submit(block_crcs, part, bs))
                w.write(p.key, part)
                if len(jobs) > 1:
                    jobs[-2].result()  # keep the helper at most one piece behind (cache-warm)
            if not len(mv):
                w.write(p.key, mv)
            written.append((p, start, len(mv), bs, jobs))
        size = f.tell() if hasattr(f, "tell") else None
        storage.close_durable(f)
        out: dict[str, list[Chunk]] = {}
        for p, start, n, bs, jobs in written:
            crcs = tuple(c for j in jobs for c in j.result()) if checksums else None
            out.setdefault(p.name, []).append(Chunk(p.box, fname, ((start, n),), crcs, bs, rank))
    except BaseException:
        try:
            f.close()
        finally:
            storage.remove([fname])
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if size is None:
        size = storage.size(fname)
    return out, size


def _fetch(p: PendingChunk) -> np.ndarray:
    arr = p.fetch()
    if not arr.flags.c_contiguous:
        arr = arr.copy()  # np.ascontiguousarray would turn a scalar into shape (1,)
    if arr.shape != p.box.sizes or dtypes.name_of(arr.dtype) != p.dtype:
        raise FormatError(
            f"tensor {p.name!r}: chunk at {list(p.box.offsets)} is {dtypes.name_of(arr.dtype)}{list(arr.shape)}, "
            f"expected {p.dtype}{list(p.box.sizes)}"
        )
    return arr


def _space_error(path: str, exc: OSError) -> DistCkptError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(f"{path}: not enough space left on the destination device (or quota exceeded)")
    return StorageError(f"{path}: write failed: {exc.strerror or exc}")


def _writev_all(fd: int, path: str, bufs: list[memoryview]) -> int:
    """Write every byte of ``bufs`` (resuming short writes); return the byte count."""
    total = 0
    i, limit = 0, max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
    while i < len(bufs):
        batch = [b for b in bufs[i : i + limit] if len(b)]
        i += limit
        while batch:
            try:
                n = os.writev(fd, batch)
            except OSError as exc:
                raise _space_error(path, exc) from None
            if n <= 0:
                raise OutOfSpaceError(f"{path}: the device took no more bytes (full?)")
            total += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
            if n:
                batch[0] = batch[0][n:]
    return total


def _write_local(
    storage: Storage, fname: str, pending: Sequence[PendingChunk], *, block_size: int, rank: int | None,
    checksums: bool,
) -> tuple[dict[str, list[Chunk]], int]:
    """The local fast path of :func:`write_chunk_file` (see the module docstring)."""
    path = storage.path(fname)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    layout = SafetensorsWriter(None, [(p.key, p.dtype, p.box.sizes) for p in pending], metadata={"format": "distckpt"})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    jobs: list[tuple[PendingChunk, int, int, int, Future | None]] = []
    try:
        size = _writev_all(fd, path, [memoryview(layout.header_bytes)])
        for p in pending:
            arr = _fetch(p)
            mv = dtypes.byteview(arr)
            bs = chunk_block_size(len(mv), block_size)
            fut = _pool().submit(block_crcs, mv, bs) if checksums else None
            size += _writev_all(fd, path, [mv])
            jobs.append((p, layout.data_offset(p.key), len(mv), bs, fut))
        try:
            os.fsync(fd)
        except OSError as exc:
            raise _space_error(path, exc) from None
        out: dict[str, list[Chunk]] = {}
        for p, start, n, bs, fut in jobs:
            crcs = tuple(fut.result()) if fut is not None else None
            out.setdefault(p.name, []).append(Chunk(p.box, fname, ((start, n),), crcs, bs, rank))
        want = layout.data_start + sum(n for _, _, n, _, _ in jobs)
        if size != want or os.fstat(fd).st_size != want:
            raise StorageError(f"{path}: {os.fstat(fd).st_size} bytes on disk, {want} were written")
    except BaseException:
        os.close(fd)
        fd = -1
        for *_, fut in jobs:
            if fut is not None:
                fut.cancel()
        storage.remove([fname])
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return out, size


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The helper threads that checksum beside the I/O (crc32c releases the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(2, thread_name_prefix="distckpt-crc")
        return _POOL


@dataclass
class ReadStats:
    """Bytes a job needed, bytes it pulled from storage, and requests.

    Ranged reads count every byte they fetch.  Reads from a mapped local file
    count each byte of the file once however often it is copied (the page
    cache serves repeats), via :meth:`touch`: ``split`` of one file into many
    ranks reads the file once.
    """

    bytes_needed: int = 0
    bytes_read: int = 0
    requests: int = 0

    def add(self, other: ReadStats) -> None:
        self.bytes_needed += other.bytes_needed
        self.bytes_read += other.bytes_read
        self.requests += other.requests

    def touch(self, key: Any, lo: int, hi: int) -> None:
        """Count the bytes [lo, hi) of mapped file ``key`` not counted before."""
        if hi <= lo:
            return
        spans: list[list[int]] = self.__dict__.setdefault("_spans", {}).setdefault(key, [])
        i = bisect.bisect_left(spans, [lo, lo])
        if i and spans[i - 1][1] >= lo:
            i -= 1
        new, j = 0, i
        cur_lo, cur_hi = lo, hi
        while j < len(spans) and spans[j][0] <= cur_hi:
            a, b = spans[j]
            if a > cur_lo:
                new += min(a, hi) - max(cur_lo, lo) if min(a, hi) > max(cur_lo, lo) else 0
            cur_lo, cur_hi = min(cur_lo, a), max(cur_hi, b)
            lo = max(lo, b)
            j += 1
        if hi > lo:
            new += hi - lo
        spans[i:j] = [[cur_lo, cur_hi]]
        self.bytes_read += new

    @property
    def ratio(self) -> float:
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0

    def to_json(self) -> dict:
        return {
            "bytes_needed": self.bytes_needed,
            "bytes_read": self.bytes_read,
            "requests": self.requests,
            "ratio": round(self.ratio, 4),
        }


def _file_jobs(chunk: Chunk, start: int, mv: memoryview) -> list[tuple[str, int, memoryview]]:
    """Map chunk bytes [start, start+len(mv)) onto the chunk's file segments."""
    jobs = []
    pos = 0  # chunk-relative offset of the current segment
    want_lo, want_hi = start, start + len(mv)
    for seg_start, seg_len in chunk.segments:
        lo, hi = max(want_lo, pos), min(want_hi, pos + seg_len)
        if lo < hi:
            jobs.append((chunk.file, seg_start + (lo - pos), mv[lo - want_lo : hi - want_lo]))
        pos += seg_len
        if pos >= want_hi:
            break
    if pos < want_hi:
        raise FormatError(f"{chunk.file}: chunk bytes [{start}, {want_hi}) lie outside its {pos} bytes")
    return jobs


def read_box(
    storage: Storage,
    tensor: TensorInfo,
    target: Box,
    *,
    out: np.ndarray | None = None,
    verify: bool = True,
    stats: ReadStats | None = None,
) -> np.ndarray:
    """Fill ``target`` of ``tensor`` from the chunks that overlap it, reading only their bytes."""
    dtype = dtypes.to_numpy(tensor.dtype)
    item = dtype.itemsize
    cost = LOCAL_COST if storage.is_local else REMOTE_COST
    hits = tensor.overlapping(target)
    covered = sum(inter.numel for _, _, inter in hits)
    if covered != target.numel:
        raise FormatError(
            f"tensor {tensor.name!r}: the chunks cover {covered} of the {target.numel} elements of box "
            f"{list(target.offsets)}+{list(target.sizes)} (missing chunk?)"
        )
    st = stats or ReadStats()
    if storage.is_local and all(len(c.segments) == 1 for _, c, _ in hits):
        return _read_mapped(storage, tensor, target, hits, dtype, out, verify, st)
    if out is None:
        out = np.empty(target.sizes, dtype=dtype)
    jobs: list[tuple[str, int, memoryview]] = []
    post: list = []
    for ci, chunk, inter in hits:
        plan = plan_box_reads(chunk.box, inter, item, cost)
        dest = out[inter.relative_to(target)] if target.ndim else out
        st.bytes_needed += plan.bytes_needed
        check = verify and chunk.crcs is not None
        strides = c_strides(chunk.box.sizes, item)
        for req in plan.requests:
            lo, hi = req.start, req.start + req.length
            if check:
                bs = chunk.block_size
                lo, hi = (lo // bs) * bs, min(-(-hi // bs) * bs, chunk.nbytes)
            direct = (
                not check
                and plan.depth == 0
                and req.length == plan.bytes_needed
                and dest.flags.c_contiguous
                and dest.dtype == dtype
            )
            if direct:
                buf = dtypes.byteview(dest) if dest.size else memoryview(bytearray(0))
            else:
                buf = memoryview(bytearray(hi - lo))
            jobs.extend(_file_jobs(chunk, lo, buf))
            st.bytes_read += hi - lo
            st.requests += 1
            if not direct:
                post.append((ci, chunk, plan, req, lo, buf, dest, strides, check))
    try:
        storage.read_many(jobs)
    except DistCkptError as exc:
        raise type(exc)(f"tensor {tensor.name!r}: {exc}") from None
    except OSError as exc:
        raise FormatError(f"tensor {tensor.name!r}: cannot read its data: {exc}") from None
    for ci, chunk, plan, req, lo, buf, dest, strides, check in post:
        if check:
            _verify_blocks(tensor, ci, chunk, lo, buf)
        off = req.start - lo
        sizes = plan.inter.sizes[plan.depth :]
        # stride over same-size unsigned ints, then view as the dtype: as_strided
        # cannot rebuild ml_dtypes' float8 from its array interface ('<f1')
        view = np.lib.stride_tricks.as_strided(
            np.frombuffer(buf, dtype=np.dtype(f"u{item}"), offset=off, count=(len(buf) - off) // item),
            shape=sizes,
            strides=strides[plan.depth :],
            writeable=False,
        ).view(dtype)
        if plan.depth:
            dest[req.outer] = view
        elif dest.ndim:
            dest[...] = view
        else:
            out[...] = view.reshape(())
    return out


# ------------------------------------------------------------------ mapped reads
_MAPS: weakref.WeakKeyDictionary[Any, dict[str, mmap.mmap]] = weakref.WeakKeyDictionary()
_MAPS_LOCK = threading.Lock()


def _mapping(storage: Storage, fname: str, need: int) -> mmap.mmap:
    """A read-only map of a local data file (cached per storage); refuses non-regular and short files."""
    with _MAPS_LOCK:
        maps = _MAPS.setdefault(storage, {})
        mm = maps.get(fname)
    if mm is not None and len(mm) >= need:
        return mm
    path = storage.path(fname)
    check = getattr(storage, "_check_inside", None)
    if check is not None:
        check(path)
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise StorageError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a directory, not a data file") from None
    except OSError as exc:
        raise StorageError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if info.st_size < need:  # mapping past the end would crash (SIGBUS) on the first touch
            raise FormatError(f"{path}: file ends at byte {info.st_size}, before byte {need} (truncated?)")
        mm = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with _MAPS_LOCK:
        _MAPS.setdefault(storage, {})[fname] = mm
    return mm


def _private_chunk(storage: Storage, chunk: Chunk, dtype: np.dtype) -> np.ndarray:
    """A chunk as an array of its own: a private copy-on-write mapping (writes touch neither the file
    nor any other read), so a whole-chunk read costs no copy at all."""
    start, length = chunk.segments[0]
    if not length:
        return np.empty(chunk.box.sizes, dtype=dtype)
    _mapping(storage, chunk.file, start + length)  # the checks (regular file, inside the root, long enough)
    lo = start - start % mmap.ALLOCATIONGRANULARITY
    fd = open_regular(storage.path(chunk.file))
    try:
        mm = mmap.mmap(fd, start + length - lo, offset=lo, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    item = dtype.itemsize
    flat = np.frombuffer(mm, dtype=np.dtype(f"u{item}"), count=length // item, offset=start - lo)
    return flat.view(dtype).reshape(chunk.box.sizes)


def _chunk_array(storage: Storage, chunk: Chunk, dtype: np.dtype) -> np.ndarray:
    start, length = chunk.segments[0]
    if not length:
        return np.empty(chunk.box.sizes, dtype=dtype)
    mm = _mapping(storage, chunk.file, start + length)
    item = dtype.itemsize
    # same-size unsigned ints, then the dtype: frombuffer cannot build ml_dtypes' float8 from '<f1'
    flat = np.frombuffer(mm, dtype=np.dtype(f"u{item}"), count=length // item, offset=start)
    return flat.view(dtype).reshape(chunk.box.sizes)


def _span(chunk: Chunk, inter: Box, item: int) -> tuple[int, int]:
    """Chunk-relative byte range from the first to the last byte of ``inter`` (the bytes a copy touches)."""
    if not chunk.box.ndim:
        return 0, item
    strides = c_strides(chunk.box.sizes, item)
    rel = [o - c for o, c in zip(inter.offsets, chunk.box.offsets)]
    lo = sum(r * st for r, st in zip(rel, strides))
    hi = lo + item + sum((n - 1) * st for n, st in zip(inter.sizes, strides))
    return lo, hi


def _read_mapped(storage, tensor, target, hits, dtype, out, verify, st) -> np.ndarray:
    item = dtype.itemsize
    checks: list[tuple[int, Chunk, int, Future]] = []
    try:
        views = []
        for ci, chunk, inter in hits:
            try:
                arr = _chunk_array(storage, chunk, dtype)
            except DistCkptError as exc:
                raise type(exc)(f"tensor {tensor.name!r}: {exc}") from None
            lo, hi = _span(chunk, inter, item) if inter.numel else (0, 0)
            start = chunk.segments[0][0]
            needed = inter.numel * item
            st.bytes_needed += needed
            st.requests += 1
            if verify and chunk.crcs is not None and hi > lo:
                bs = chunk.block_size
                lo, hi = (lo // bs) * bs, min(-(-hi // bs) * bs, chunk.nbytes)
                mv = memoryview(_mapping(storage, chunk.file, start + chunk.nbytes))[start + lo : start + hi]
                checks.append((ci, chunk, lo, _pool().submit(block_crcs, mv, bs)))
                st.touch((id(storage), chunk.file), start + lo, start + hi)  # checksummed: whole blocks are read
            elif hi - lo == needed:
                st.touch((id(storage), chunk.file), start + lo, start + hi)  # one run of bytes
            else:
                st.bytes_read += needed  # a strided box: only its rows' bytes are copied out of the mapping
            views.append((arr, chunk, inter))
        if out is None and len(views) == 1 and views[0][1].box == target:
            result = _private_chunk(storage, views[0][1], dtype)  # the whole chunk: mapped, no copy
        else:
            result = np.empty(target.sizes, dtype=dtype) if out is None else out
            for arr, chunk, inter in views:
                src = arr[inter.relative_to(chunk.box)] if chunk.box.ndim else arr
                if target.ndim:
                    result[inter.relative_to(target)] = src
                else:
                    result[...] = src
    except BaseException:
        for *_, fut in checks:
            fut.cancel()
        raise
    for ci, chunk, lo, fut in checks:
        _compare_blocks(tensor, ci, chunk, lo, fut.result())
    _release(storage, [c for _, c, _ in views])  # the result never aliases the shared mapping
    return result


def _want_crcs(chunk: Chunk, first: int, n: int) -> Sequence[int]:
    """The recorded checksums of blocks ``[first, first + n)`` of ``chunk``: a slice of its tuple, or one
    read of exactly those blocks from a version-2 checksum column (:class:`~distckpt.index.CrcSpan`)."""
    crcs = chunk.crcs
    assert crcs is not None
    span = getattr(crcs, "span", None)
    if span is not None:
        return span(first, first + n).tolist()
    return crcs[first : first + n]


def _release(storage: Storage, chunks: Sequence[Chunk]) -> None:
    """Drop the mapped pages a copy touched from this process (the page cache keeps them): a rank that reads
    many boxes holds only its results, not every page it copied from."""
    for chunk in chunks:
        start, length = chunk.segments[0]
        with _MAPS_LOCK:
            mm = _MAPS.get(storage, {}).get(chunk.file)
        if mm is None or not length:
            continue
        lo = start - start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, min(len(mm), start + length) - lo)
        except (AttributeError, OSError, ValueError):  # no madvise here: the pages go when the map does
            pass


def _compare_blocks(tensor: TensorInfo, ci: int, chunk: Chunk, lo: int, got: list[int]) -> None:
    bs = chunk.block_size
    first = lo // bs
    want = _want_crcs(chunk, first, len(got))
    for k, crc in enumerate(got):
        b = first + k
        if k >= len(want) or crc != want[k]:
            start = chunk.segments[0][0] + b * bs
            raise ChecksumError(
                f"checksum mismatch in {chunk.file}, tensor {tensor.name!r}, chunk {ci} "
                f"(offsets {list(chunk.box.offsets)}), bytes [{start}, {start + min(bs, chunk.nbytes - b * bs)}): "
                "the file is corrupt; restore it or re-save the checkpoint"
            )


def _verify_blocks(tensor: TensorInfo, ci: int, chunk: Chunk, lo: int, buf: memoryview) -> None:
    bs = chunk.block_size
    first = lo // bs
    want = _want_crcs(chunk, first, -(-len(buf) // bs))
    for i in range(0, len(buf), bs):
        k = i // bs
        got = _crc.crc32c(buf[i : i + bs])
        if k >= len(want) or got != want[k]:
            start = chunk.segments[0][0] + lo + i
            raise ChecksumError(
                f"checksum mismatch in {chunk.file}, tensor {tensor.name!r}, chunk {ci} "
                f"(offsets {list(chunk.box.offsets)}), bytes [{start}, {start + min(bs, len(buf) - i)}): "
                "the file is corrupt; restore it or re-save the checkpoint"
            )
