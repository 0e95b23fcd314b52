"""The hot path: write a rank's chunks into one data file, read a box of a tensor from its chunks.

Plans come from :mod:`distckpt.plan`; storage is :mod:`distckpt.storage`.

* :func:`write_chunk_file` -- one safetensors data file of chunks, crc32c per
  block computed beside the writes, fsynced; returns the chunk records;
* :func:`read_box` -- fill a box of a tensor from the chunks that overlap it,
  reading only their needed bytes (cost-planned), verifying the checksum
  blocks the read touches;
* :class:`ReadStats` -- bytes needed / read / requests, for the ratio reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c as _crc
import numpy as np

from . import dtypes
from .codecs.safetensors import SafetensorsWriter
from .errors import ChecksumError, DistCkptError, FormatError
from .index import Chunk, TensorInfo
from .layout import Box
from .plan import LOCAL_COST, REMOTE_COST, c_strides, plan_box_reads
from .storage import Storage

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
    return min(b, max(max_block, 1))


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
    specs = [(p.key, p.dtype, p.box.sizes) for p in pending]
    f: Any = storage.open_write(fname)  # a storage Writer; the codecs take any object with write()
    # checksums run on a helper thread one piece behind the writer (crc32c and
    # the writes release the GIL), the last ones beside the final fsync
    pool = ThreadPoolExecutor(1, thread_name_prefix="distckpt-crc") if checksums else None
    written: list[tuple[PendingChunk, int, int, int, list[Future]]] = []  # chunk, start, bytes, block, crc jobs
    try:
        w = SafetensorsWriter(f, specs, metadata={"format": "distckpt"})
        for p in pending:
            arr = p.fetch()
            if not arr.flags.c_contiguous:
                arr = arr.copy()  # np.ascontiguousarray would turn a scalar into shape (1,)
            if arr.shape != p.box.sizes or dtypes.name_of(arr.dtype) != p.dtype:
                raise FormatError(
                    f"tensor {p.name!r}: chunk at {list(p.box.offsets)} is {dtypes.name_of(arr.dtype)}{list(arr.shape)}, "
                    f"expected {p.dtype}{list(p.box.sizes)}"
                )
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


@dataclass
class ReadStats:
    bytes_needed: int = 0
    bytes_read: int = 0
    requests: int = 0

    def add(self, other: ReadStats) -> None:
        self.bytes_needed += other.bytes_needed
        self.bytes_read += other.bytes_read
        self.requests += other.requests

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
    if out is None:
        out = np.empty(target.sizes, dtype=dtype)
    cost = LOCAL_COST if storage.is_local else REMOTE_COST
    hits = tensor.overlapping(target)
    covered = sum(inter.numel for _, _, inter in hits)
    if covered != target.numel:
        raise FormatError(
            f"tensor {tensor.name!r}: the chunks cover {covered} of the {target.numel} elements of box "
            f"{list(target.offsets)}+{list(target.sizes)} (missing chunk?)"
        )
    st = stats or ReadStats()
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


def _verify_blocks(tensor: TensorInfo, ci: int, chunk: Chunk, lo: int, buf: memoryview) -> None:
    bs = chunk.block_size
    assert chunk.crcs is not None
    for i in range(0, len(buf), bs):
        b = (lo + i) // bs
        got = _crc.crc32c(buf[i : i + bs])
        if b >= len(chunk.crcs) or got != chunk.crcs[b]:
            start = chunk.segments[0][0] + lo + i
            raise ChecksumError(
                f"checksum mismatch in {chunk.file}, tensor {tensor.name!r}, chunk {ci} "
                f"(offsets {list(chunk.box.offsets)}), bytes [{start}, {start + min(bs, len(buf) - i)}): "
                "the file is corrupt; restore it or re-save the checkpoint"
            )

