"""The columnar chunk table behind index version 2: every chunk of a checkpoint as numpy columns.

Pure numpy, no I/O: bytes in, bytes out.  Who calls what, in order:

1. (every rank, save) :meth:`ChunkTable.from_arrays` (or :meth:`ChunkTable.from_records` for small
   sources) over the chunks the rank wrote, ``partial=True``; :meth:`ChunkTable.to_bytes` is its
   report to rank 0.
2. (rank 0, commit) :meth:`ChunkTable.from_buffer` of every report (``partial=True``; one
   :class:`TensorSpecs` shared by all), :func:`concat` of them with each rank's first global file
   id, :meth:`ChunkTable.check` with ``files=True``, then :meth:`ChunkTable.to_parts` (or
   :meth:`ChunkTable.to_bytes`): the table blob and the crc blob, written before the index root
   JSON that commits them.
3. (any reader) :meth:`ChunkTable.from_buffer` over an ``mmap`` of the table blob (columns are
   views: nothing is copied or parsed per chunk), :meth:`ChunkTable.overlapping_many` (or
   :meth:`ChunkTable.overlapping`) to plan: its :class:`Hits` carry every field of every chunk a
   read needs; then :meth:`Hits.block_spans` and :meth:`ChunkTable.fetch_crcs` for the checksums
   of exactly the blocks a read touches (from the crc blob's buffer, or through ``read=`` so a
   multi-GB crc blob is never mapped).  :meth:`ChunkTable.segments` for the rare split chunk.
4. (verify / inspect) :meth:`ChunkTable.check` (every rule, every chunk; ``files=True`` adds the
   byte-overlap proof).

Layout.  Chunks are sorted by (tensor id, offsets lexicographically); ``tensor_ptr`` [T+1] is a
CSR pointer: the chunks of tensor ``t`` are rows ``tensor_ptr[t]:tensor_ptr[t+1]``, and
``tensor_max0`` [T] is the largest dim-0 size among them (it bounds the dim-0 binary search).  Per
chunk: ``file`` (int32 file id), ``offsets`` and ``sizes`` ([C, D], D = the largest tensor ndim;
int32 when every tensor dim fits, else int64; dims past a tensor's ndim are padding: offset 0,
size 1), ``start`` (int64 byte offset in the file; -1 for a chunk whose bytes are several
segments), ``block_log2`` (uint8; 0 = no checksums, else the chunk's crc32c blocks are
``1 << block_log2`` bytes), ``crc_start`` (int64 index of its first block in the crc column).  A
chunk's byte length is derived (``prod(sizes) * itemsize``); its writer rank is
``file_rank[file]`` (int32 [F], -1 unknown).  A side table (``seg_chunk`` [S] strictly increasing
chunk ids, ``seg_ptr`` [S+1], ``seg_start``/``seg_len`` [N]) lists the segments of MindSpore
``.ckpt`` tensors split over several protobuf values; only those chunks use it.  Checksums are
their own column, ``crcs`` uint32 [B], in a separate blob, in the order the writers produced them
(:func:`concat` appends the ranks' columns and shifts ``crc_start``; nothing is permuted): each
chunk's blocks are contiguous there and every checksum belongs to exactly one chunk.  37 bytes
per 2-D chunk, 45 per 3-D (int32 coordinates).

Both blobs are safetensors files (8-byte little-endian header length, JSON header padded to 8
bytes, raw little-endian columns, largest item size first so every column is aligned), with
``__metadata__ {"format": "distckpt.chunktable", "version": "1", "n_crcs": "<B>"}``
(``"distckpt.crc32c"`` and one column ``crc32c`` for the crc blob).

Validation.  Everything read from storage is checked, vectorized, before it is used; every failure
is a :class:`~distckpt.errors.FormatError` naming ``where``, the column, the chunk and the value.

* At open (:meth:`ChunkTable.from_buffer`), O(T + F + S): the header (size, duplicate keys,
  dtypes, shapes, data offsets inside the buffer, aligned, disjoint), every column present with its
  dtype and length, ``tensor_ptr`` from 0, monotone, ending at C, ``tensor_max0`` inside dim 0,
  ``file_rank``, the segment side table (ids increasing and in range, pointers monotone, segments
  inside their files, sums without overflow) and the crc blob's length.  Every size read is
  checked against the buffer's length before anything depends on it.
* On every lookup, O(R log C + hits): each returned chunk passes the single-chunk rules (file id
  in range; offsets and sizes non-negative, inside the shape, padding exact; bytes inside the file,
  segment lengths summing to ``prod(sizes) * itemsize``; block size sane; blocks inside the crc
  column), the hits of a request are pairwise disjoint, and (unless the table is partial) their
  intersections fill the box exactly.  A load therefore depends only on chunks it validated: an
  unsorted table or a wrong ``tensor_max0`` can only make the search miss chunks, which the
  coverage rule reports as a gap.  This is the split a reader pays: open + lookups, never O(C)
  work for chunks it does not read (a rank of a pipeline stage touches its stage's tensors only).
  :meth:`lengths`, :meth:`byte_spans`, :meth:`ranks` and :meth:`blocks_for` run the single-chunk
  rules on the chunks they are given.
* :meth:`ChunkTable.check` (commit, verify, ``from_buffer(check=True)``; cached per tensor),
  O(C * D) vectorized in windows of :data:`CHECK_WINDOW` rows: the single-chunk rules on every
  chunk, plus sorted, ``tensor_max0`` exact, block counts adding up to the crc column, no two
  chunks of a tensor overlap, volumes summing to the element count (no gaps; partial tables: at
  most).
  Overlap is decided by consecutive pairs: if at the first dim ``j`` where two neighbours' offsets
  differ their sizes agree on every dim before ``j`` and the second starts at or after the first's
  end on ``j``, all of the tensor's chunks are pairwise disjoint (induction over the bands of
  equal leading offsets).  That is exact for every grid and every band-wise uneven layout
  (MindSpore's, ``np.array_split``), in O(C * D).  Other tensors fall back to an exact sweep along
  dim 0, O(C_t log C_t + P * D) for the P pairs whose dim-0 ranges meet, :data:`PAIR_BATCH`
  pairs at a time.  ``files=True`` adds: no two chunks share a file byte or a checksum,
  O(C log C) (sorts by file and start, and by crc_start).  Readers skip that one: a wrong byte
  range can only yield wrong values, which a crafted table can produce in many ways that pass
  every structural rule.  Measured on a 2-core host: ``check`` about 0.4 µs per chunk,
  ``files=True`` about 1 µs more.

Memory.  Opening copies nothing; a lookup that touches every tensor of a mapped 10^7-chunk table
would map all of it (each 4 KiB page holds some rank's hits), so :meth:`overlapping_many` works in
batches of :data:`LOOKUP_ROWS` rows and releases each batch's pages (``MADV_DONTNEED``; the page
cache keeps them) once its hits are copied out.  Map the table read-only and keep the mapping
open while the table lives.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import numpy as np

from . import jsonutil
from .errors import FormatError, LayoutError

__all__ = [
    "TABLE_FORMAT",
    "CRC_FORMAT",
    "TABLE_VERSION",
    "TABLE_NAME",
    "CRC_NAME",
    "CHECK_WINDOW",
    "PAIR_BATCH",
    "TensorSpecs",
    "ChunkRecord",
    "Segments",
    "Hits",
    "Blocks",
    "ChunkTable",
    "concat",
    "TableMerger",
]

TABLE_FORMAT = "distckpt.chunktable"
CRC_FORMAT = "distckpt.crc32c"
TABLE_VERSION = 1
#: Suggested blob names beside ``distckpt.index.json`` (the lead's ``naming.py`` decides).
TABLE_NAME = "distckpt.chunks.safetensors"
CRC_NAME = "distckpt.crc32c.safetensors"
#: Rows validated per vectorized step: bounds the temporaries of :meth:`ChunkTable.check`.
CHECK_WINDOW = 1 << 18
#: Candidate pairs tested per step by the exact overlap fallback.
PAIR_BATCH = 1 << 20
#: Candidate (request, chunk) pairs intersected per step by the lookups.
LOOKUP_BATCH = 1 << 19
#: Lookups of at most this many requests search each tensor's rows with a scalar bisection.
_FEW = 16
#: Table rows a lookup batch spans before its pages are released (mapped tables).
LOOKUP_ROWS = 1 << 20
#: Checksum reads through ``read=``: spans closer than this many checksums share one read, and
#: at most this many checksums are held per step.
CRC_GAP = 1024
CRC_BATCH = 1 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 32
_MAX_INT = 1 << 62
_MAX_BLOCK_LOG2 = 62
_MAX_CRCS = 1 << 40
_INT32_MAX = (1 << 31) - 1

# column name -> (allowed little-endian dtypes, number of dims)
_SPEC: dict[str, tuple[tuple[str, ...], int]] = {
    "tensor_ptr": (("<i8",), 1),
    "tensor_max0": (("<i8",), 1),
    "start": (("<i8",), 1),
    "crc_start": (("<i8",), 1),
    "seg_chunk": (("<i8",), 1),
    "seg_ptr": (("<i8",), 1),
    "seg_start": (("<i8",), 1),
    "seg_len": (("<i8",), 1),
    "offsets": (("<i4", "<i8"), 2),
    "sizes": (("<i4", "<i8"), 2),
    "file": (("<i4",), 1),
    "file_rank": (("<i4",), 1),
    "block_log2": (("|u1",), 1),
}
_ORDER = tuple(_SPEC)  # canonical column order (stable-sorted by itemsize on write)
_ST_NAME = {"<i8": "I64", "<i4": "I32", "|u1": "U8", "<u4": "U32"}
_FROM_ST = {v: k for k, v in _ST_NAME.items()}


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ChunkRecord:
    """One chunk as plain Python values, for small sources and tests.

    ``offsets``/``sizes`` have the tensor's ndim; ``segments`` are (file byte offset, length) pieces
    whose concatenation is the chunk's C-order bytes; ``crcs`` are crc32c values of consecutive
    ``block_size``-byte blocks of those bytes (``block_size`` a power of two, 0 without checksums).
    """

    tensor: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: int
    segments: tuple[tuple[int, int], ...]
    crcs: tuple[int, ...] | None = None
    block_size: int = 0

    def __post_init__(self):
        object.__setattr__(self, "offsets", tuple(int(v) for v in self.offsets))
        object.__setattr__(self, "sizes", tuple(int(v) for v in self.sizes))
        object.__setattr__(self, "segments", tuple((int(a), int(b)) for a, b in self.segments))
        if self.crcs is not None:
            object.__setattr__(self, "crcs", tuple(int(c) for c in self.crcs))
        if len(self.offsets) != len(self.sizes):
            raise LayoutError(f"chunk of tensor {self.tensor}: offsets {self.offsets} and sizes {self.sizes} differ in rank")
        if not self.segments:
            raise LayoutError(f"chunk of tensor {self.tensor} at {self.offsets}: needs at least one segment")
        bs = self.block_size
        if bs < 0 or (bs & (bs - 1)) or bs == 1:
            raise LayoutError(f"chunk of tensor {self.tensor}: block_size {bs} must be 0 or a power of two >= 2")
        if self.crcs is not None and not all(0 <= c < (1 << 32) for c in self.crcs):
            raise LayoutError(f"chunk of tensor {self.tensor}: crc32c values must be in [0, 2**32)")
        if (self.crcs is None) != (bs == 0):
            raise LayoutError(f"chunk of tensor {self.tensor}: crcs and block_size must be given together")


class Segments(NamedTuple):
    """Multi-segment chunks, CSR: chunk ``chunk[k]`` is bytes ``start[ptr[k]:ptr[k+1]]``/``length[...]``."""

    chunk: np.ndarray
    ptr: np.ndarray
    start: np.ndarray
    length: np.ndarray


class Blocks(NamedTuple):
    """The checksum blocks that cover byte ranges of chunks (int64 [k] each, but ``ptr`` and ``crcs``).

    ``lo``/``hi``: the requested ranges widened to whole blocks (read these bytes to verify);
    ``block_size``: 0 for chunks without checksums; ``crc_lo``/``crc_hi``: their checksums' indices
    in the crc column; ``ptr`` [k+1] and ``crcs`` (uint32; None until fetched): the checksum of
    block ``b`` of range ``i`` is ``crcs[ptr[i] + b - lo[i] // block_size[i]]``.
    """

    lo: np.ndarray
    hi: np.ndarray
    block_size: np.ndarray
    crc_lo: np.ndarray
    crc_hi: np.ndarray
    ptr: np.ndarray
    crcs: np.ndarray | None


def _block_spans(length: np.ndarray, block_log2: np.ndarray, crc_start: np.ndarray, byte_lo: Any, byte_hi: Any) -> Blocks:
    lo = np.asarray(byte_lo, dtype=np.int64).reshape(-1)
    hi = np.asarray(byte_hi, dtype=np.int64).reshape(-1)
    if not len(lo) == len(hi) == len(length):
        raise LayoutError(f"{len(length)} chunks but {len(lo)} / {len(hi)} byte bounds")
    bad = (lo < 0) | (lo > hi) | (hi > length)
    if bad.any():
        i = _first_true(bad)
        raise LayoutError(f"byte range [{lo[i]}, {hi[i]}) is not inside a chunk of {length[i]} bytes")
    bl = np.asarray(block_log2, dtype=np.int64)
    has = bl > 0
    full = has & (hi > lo)
    b0 = np.where(has, lo >> bl, 0)
    b1 = np.where(full, ((hi - 1) >> bl) + 1, b0)
    wlo = np.where(has, b0 << bl, lo)
    whi = np.where(full, np.minimum(b1 << bl, length), np.where(has, wlo, hi))
    ptr = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(b1 - b0, out=ptr[1:])
    return Blocks(wlo, whi, np.where(has, np.left_shift(1, bl), 0), crc_start + b0, crc_start + b1, ptr, None)


class Hits(NamedTuple):
    """A validated lookup result, CSR by request: the hits of request ``r`` are ``ptr[r]:ptr[r+1]``,
    in chunk order.  Everything a reader needs is here, so it never returns to the table's rows.

    Per hit (int64): ``chunk_ids``; ``inter_offsets``/``inter_sizes`` [M, D], the intersection of
    the request's box with the chunk, and ``chunk_offsets``/``chunk_sizes`` [M, D], the chunk's
    box, in tensor coordinates (padded dims 0 / 1); ``file``; ``start`` (-1: several segments, see
    :meth:`ChunkTable.segments`); ``length`` in bytes; ``block_log2``; ``crc_start``.
    """

    ptr: np.ndarray
    chunk_ids: np.ndarray
    inter_offsets: np.ndarray
    inter_sizes: np.ndarray
    chunk_offsets: np.ndarray
    chunk_sizes: np.ndarray
    file: np.ndarray
    start: np.ndarray
    length: np.ndarray
    block_log2: np.ndarray
    crc_start: np.ndarray

    def block_spans(self, byte_lo: Any, byte_hi: Any) -> Blocks:
        """Checksum blocks covering bytes ``[byte_lo, byte_hi)`` of each hit's chunk (one range per
        hit); fetch their values with :meth:`ChunkTable.fetch_crcs`."""
        return _block_spans(self.length, self.block_log2, self.crc_start, byte_lo, byte_hi)


# -------------------------------------------------------------------------------------- context
def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _all_ints(values: list, lo: int, hi: int) -> bool:
    if not all(type(v) is int for v in values) and not all(_is_int(v) for v in values):
        return False
    return not values or (lo <= min(values) and max(values) <= hi)


@dataclass(frozen=True, eq=False)
class TensorSpecs:
    """The tensors a table describes (tensor id = position), as the index root lists them.

    Build once with :meth:`of` and pass it as ``tensor_shapes`` to every table of one checkpoint
    (the commit opens one report per rank); validated once: dims integers in [0, 2**62], item
    sizes 1/2/4/8, at most 2**62 bytes per tensor, at most 32 dims.
    """

    shapes: np.ndarray  # int64 [T, D], dims past a tensor's ndim are 1
    ndims: np.ndarray  # int64 [T]
    itemsizes: np.ndarray  # int64 [T]
    numels: np.ndarray  # int64 [T]
    names: tuple[str, ...] | None = None

    @classmethod
    def of(
        cls, shapes: Sequence[Sequence[int]], itemsizes: Sequence[int], names: Sequence[str] | None = None, *, where: str = ""
    ) -> TensorSpecs:
        shapes_l = [tuple(s) for s in shapes]
        T = len(shapes_l)
        items = list(itemsizes)
        w = f"{where}: " if where else ""
        if len(items) != T or (names is not None and len(names) != T):
            raise FormatError(f"{w}{T} tensor shapes, {len(items)} item sizes, {len(names or ())} names")
        ndims = np.fromiter((len(s) for s in shapes_l), dtype=np.int64, count=T)
        D = int(ndims.max(initial=0))
        if D > MAX_NDIM:
            raise FormatError(f"{w}a tensor has {D} dims; at most {MAX_NDIM} are supported")
        flat = [v for s in shapes_l for v in s]
        if not _all_ints(flat, 0, _MAX_INT):
            t = next(i for i, s in enumerate(shapes_l) if not _all_ints(list(s), 0, _MAX_INT))
            raise FormatError(f"{w}tensor #{t} has shape {list(shapes_l[t])[:MAX_NDIM]}: dims must be integers in [0, 2**62]")
        if not _all_ints(items, 1, 8) or not set(items) <= {1, 2, 4, 8}:
            t = next(i for i, v in enumerate(items) if not (_is_int(v) and v in (1, 2, 4, 8)))
            raise FormatError(f"{w}tensor #{t} has item size {items[t]!r}; expected 1, 2, 4 or 8")
        arr = np.ones((T, D), dtype=np.int64)
        arr[np.arange(D) < ndims[:, None]] = np.asarray(flat, dtype=np.int64)
        isz = np.asarray(items, dtype=np.int64).reshape(T)
        approx = np.prod(np.maximum(arr, 1).astype(np.float64), axis=1) * isz
        for t in np.flatnonzero(approx > 2.0**61):  # exact where the float estimate nears the limit
            if math.prod(max(int(v), 1) for v in shapes_l[t]) * int(items[t]) > _MAX_INT:
                raise FormatError(f"{w}tensor #{t} of shape {list(shapes_l[t])} is larger than 2**62 bytes")
        for a in (arr, ndims, isz):
            a.flags.writeable = False
        numels = np.prod(arr, axis=1, dtype=np.int64)
        numels.flags.writeable = False
        return cls(arr, ndims, isz, numels, tuple(names) if names is not None else None)

    def __len__(self) -> int:
        return int(self.shapes.shape[0])

    def take(self, ids: Sequence[int]) -> TensorSpecs:
        """The tensors ``ids`` (in that order) as specs of their own (already validated: no checks)."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        ndims = self.ndims[idx]
        D = int(ndims.max(initial=0))
        arrs = [self.shapes[idx][:, :D], ndims, self.itemsizes[idx], self.numels[idx]]
        for a in arrs:
            a.flags.writeable = False
        names = tuple(self.names[i] for i in idx.tolist()) if self.names is not None else None
        return TensorSpecs(arrs[0], arrs[1], arrs[2], arrs[3], names)

    def shape(self, t: int) -> tuple[int, ...]:
        return tuple(int(v) for v in self.shapes[t, : self.ndims[t]])

    def same(self, other: TensorSpecs) -> bool:
        return self is other or (
            np.array_equal(self.shapes, other.shapes)
            and np.array_equal(self.ndims, other.ndims)
            and np.array_equal(self.itemsizes, other.itemsizes)
        )


@dataclass(frozen=True)
class _Context:
    """What the index root says about tensors and files."""

    specs: TensorSpecs
    file_sizes: np.ndarray  # int64 [F]
    file_names: tuple[str, ...] | None
    where: str

    @property
    def shapes(self) -> np.ndarray:
        return self.specs.shapes

    @property
    def ndims(self) -> np.ndarray:
        return self.specs.ndims

    @property
    def itemsizes(self) -> np.ndarray:
        return self.specs.itemsizes

    @property
    def numels(self) -> np.ndarray:
        return self.specs.numels

    @property
    def names(self) -> tuple[str, ...] | None:
        return self.specs.names

    @property
    def n_tensors(self) -> int:
        return len(self.specs)

    @property
    def ndim(self) -> int:
        return int(self.shapes.shape[1])

    @property
    def wide(self) -> bool:
        """int64 offsets/sizes (some tensor dim does not fit int32)."""
        return bool(self.shapes.size) and int(self.shapes.max()) > _INT32_MAX

    def tname(self, t: int) -> str:
        return repr(self.names[t]) if self.names is not None and 0 <= t < len(self.names) else f"#{t}"

    def fname(self, f: int) -> str:
        return repr(self.file_names[f]) if self.file_names is not None and 0 <= f < len(self.file_names) else f"#{f}"


def _context(
    tensor_shapes: Sequence[Sequence[int]] | TensorSpecs,
    tensor_itemsizes: Sequence[int] | None,
    file_sizes: Sequence[int],
    *,
    names: Sequence[str] | None,
    file_names: Sequence[str] | None,
    where: str,
) -> _Context:
    if isinstance(tensor_shapes, TensorSpecs):
        if tensor_itemsizes is not None or names is not None:
            raise LayoutError(f"{where}: with TensorSpecs, give no separate item sizes or names")
        specs = tensor_shapes
    else:
        if tensor_itemsizes is None:
            raise LayoutError(f"{where}: tensor_itemsizes is required with plain tensor shapes")
        specs = TensorSpecs.of(tensor_shapes, tensor_itemsizes, names, where=where)
    fs = list(file_sizes)
    if not _all_ints(fs, 0, _MAX_INT):
        raise FormatError(f"{where}: file sizes must be integers in [0, 2**62]")
    if file_names is not None and len(file_names) != len(fs):
        raise FormatError(f"{where}: {len(file_names)} file names for {len(fs)} files")
    return _Context(
        specs=specs,
        file_sizes=np.asarray(fs, dtype=np.int64).reshape(len(fs)),
        file_names=tuple(file_names) if file_names is not None else None,
        where=where,
    )


# ---------------------------------------------------------------------------------- safetensors
def _encode(columns: Sequence[tuple[str, np.ndarray]], metadata: dict[str, str]) -> list[memoryview]:
    """Header + columns as buffers (no copy of the columns); largest itemsize first, so aligned."""
    cols = sorted(columns, key=lambda kv: -kv[1].dtype.itemsize)  # stable: keeps canonical order
    header: dict[str, Any] = {"__metadata__": metadata}
    parts: list[memoryview] = []
    off = 0
    for name, a in cols:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        key = a.dtype.str
        header[name] = {"dtype": _ST_NAME[key], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        parts.append(a.reshape(-1).view(np.uint8).data)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return [memoryview(len(js).to_bytes(8, "little") + js), *parts]


def _parse_header(raw: bytes, data_start: int, data_len: int, where: str, kind: str) -> tuple[dict[str, str], dict[str, tuple[np.dtype, list[int], int]]]:
    """Validate a safetensors JSON header: ``(metadata, {column: (dtype, shape, absolute offset)})``.

    Offsets must lie inside the ``data_len`` bytes after ``data_start``, match the shape, be
    aligned to the item size and not overlap.
    """
    header = jsonutil.loads(raw, where=f"{where}: {kind} header")  # strict: a duplicate key or NaN is an error
    if not isinstance(header, dict):
        raise FormatError(f"{where}: {kind} header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{where}: {kind} header lacks a __metadata__ object of strings")
    out: dict[str, tuple[np.dtype, list[int], int]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        cw = f"{where}: {kind} column {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FormatError(f"{cw}: header entry must hold dtype, shape and data_offsets")
        st, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(st, str) or st not in _FROM_ST:
            raise FormatError(f"{cw}: dtype {st!r:.40} is not one of {sorted(_FROM_ST)}")
        dt = np.dtype(_FROM_ST[st])
        if not isinstance(shape, list) or len(shape) > 2 or not all(_is_int(d) and 0 <= d <= _MAX_INT for d in shape):
            raise FormatError(f"{cw}: shape {shape!r:.80} must be 1 or 2 non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or not 0 <= offs[0] <= offs[1]:
            raise FormatError(f"{cw}: data_offsets {offs!r:.80} must be [begin, end] with 0 <= begin <= end")
        begin, end = offs
        if end > data_len:
            raise FormatError(f"{cw}: data_offsets {offs} run past the end of the data ({data_len} bytes)")
        need = math.prod(shape) * dt.itemsize
        if end - begin != need:
            raise FormatError(f"{cw}: data_offsets {offs} hold {end - begin} bytes, {st}{shape} needs {need}")
        if (data_start + begin) % dt.itemsize:
            raise FormatError(f"{cw}: data at byte {data_start + begin} is not aligned to its {dt.itemsize}-byte items")
        out[name] = (dt, shape, data_start + begin)
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{where}: {kind} columns {n0!r} and {n1!r} overlap in the data section")
    return meta, out


def _decode(buf: Any, where: str, kind: str) -> tuple[dict[str, str], dict[str, np.ndarray], dict[str, int]]:
    """Parse a safetensors blob without trusting it; columns become read-only views of ``buf``."""
    mv = memoryview(buf).cast("B")
    size = mv.nbytes
    if size < 8:
        raise FormatError(f"{where}: {kind} blob is {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(mv[:8], "little")
    if n > size - 8:
        raise FormatError(f"{where}: {kind} header length {n} exceeds the blob's {size} bytes (truncated?)")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: {kind} header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    meta, ents = _parse_header(bytes(mv[8 : 8 + n]), 8 + n, size - 8 - n, where, kind)
    cols: dict[str, np.ndarray] = {}
    for name, (dt, shape, off) in ents.items():
        arr = np.frombuffer(mv, dtype=dt, count=math.prod(shape), offset=off).reshape(shape)
        arr.flags.writeable = False
        cols[name] = arr
    return meta, cols, {name: off for name, (_, _, off) in ents.items()}


def _meta_int(meta: dict[str, str], key: str, where: str, kind: str) -> int:
    v = meta.get(key)
    if not isinstance(v, str) or not v.isdigit() or len(v) > 19 or int(v) > _MAX_INT:
        raise FormatError(f"{where}: {kind} __metadata__ {key!r} is {v!r:.40}; expected a decimal integer")
    return int(v)


def _crc_column(meta: dict[str, str], ents: dict[str, Any], where: str) -> Any:
    """The one column of a crc blob, after checking its metadata."""
    if meta.get("format") != CRC_FORMAT:
        raise FormatError(f"{where}: not a distckpt crc blob (__metadata__ format {meta.get('format')!r:.40})")
    ver = meta.get("version")
    if ver != str(TABLE_VERSION):
        raise FormatError(f"{where}: crc blob version {ver!r:.20} is not supported (this distckpt reads {TABLE_VERSION})")
    if set(ents) != {"crc32c"}:
        raise FormatError(f"{where}: crc blob must hold exactly one column 'crc32c', got {sorted(ents)[:8]}")
    return ents["crc32c"]


def _decode_crcs(buf: Any, where: str) -> np.ndarray:
    meta, cols, _ = _decode(buf, where, "crc")
    crcs = _crc_column(meta, cols, where)
    if crcs.dtype != np.dtype("<u4") or crcs.ndim != 1:
        raise FormatError(f"{where}: crc column 'crc32c' must be U32 of one dim, got {crcs.dtype}{list(crcs.shape)}")
    return crcs


# ---------------------------------------------------------------------------------- small helpers
def _runs(lo: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(lo[i], lo[i] + counts[i])`` (three passes over the output)."""
    counts = np.asarray(counts, dtype=np.int64)
    delta = np.asarray(lo, dtype=np.int64) - (np.cumsum(counts) - counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(delta, counts)


def _expand(lo: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_runs` and the owner ``i`` of each element."""
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return _runs(lo, counts), owner


def _gather_runs(src: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([src[s:s + n] for s, n in zip(starts, counts)])`` in batches (bounded temporaries)."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=src.dtype)
    csum = np.cumsum(counts)
    i0 = pos = 0
    while i0 < len(counts):
        base = int(csum[i0 - 1]) if i0 else 0
        i1 = max(int(np.searchsorted(csum, base + LOOKUP_BATCH, side="right")), i0 + 1)
        idx = _runs(starts[i0:i1], counts[i0:i1])
        np.take(src, idx, out=out[pos : pos + len(idx)])
        pos += len(idx)
        i0 = i1
    return out


def _bisect_left(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per row: first index in ``[lo, hi)`` with ``a[index] >= x`` (``a`` sorted there); vectorized."""
    lo = lo.astype(np.int64, copy=True)
    hi = hi.astype(np.int64, copy=True)
    n = len(a)
    if n == 0:
        return lo
    while True:
        act = lo < hi
        if not act.any():
            return lo
        mid = (lo + hi) >> 1
        right = act & (a[np.minimum(mid, n - 1)] < x)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(act & ~right, mid, hi)


def _nblocks(lengths: np.ndarray, block_log2: np.ndarray) -> np.ndarray:
    bl = block_log2.astype(np.int64)
    return np.where((bl > 0) & (lengths > 0), ((lengths - 1) >> bl) + 1, 0)


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _pad(a: Any, n: int, D: int, fill: int, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise LayoutError(f"{what} must be a [{n}, <= {D}] integer array, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LayoutError(f"{what} must hold integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.shape[1] > D:
        raise LayoutError(f"{what} has {arr.shape[1]} dims; the table's tensors have at most {D}")
    if arr.shape[1] < D:
        arr = np.concatenate([arr, np.full((n, D - arr.shape[1]), fill, dtype=np.int64)], axis=1)
    return arr


# ------------------------------------------------------------------------------------------ table
class ChunkTable:
    """Every chunk of a checkpoint as columns; see the module docstring for the layout and rules.

    Build with :meth:`from_arrays`, :meth:`from_records`, :func:`concat` or :meth:`from_buffer`;
    never call the constructor directly.  Columns are read-only numpy arrays (attributes named as
    in the module docstring); ``crcs`` is None when the table was opened without its crc blob.
    """

    tensor_ptr: np.ndarray
    tensor_max0: np.ndarray
    file: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    start: np.ndarray
    block_log2: np.ndarray
    crc_start: np.ndarray
    file_rank: np.ndarray
    seg_chunk: np.ndarray
    seg_ptr: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    crcs: np.ndarray | None

    def __init__(self, ctx: _Context, cols: dict[str, np.ndarray], crcs: np.ndarray | None, n_crcs: int, *, partial: bool = False):
        self._ctx = ctx
        self.partial = partial
        for name in _ORDER:
            setattr(self, name, cols[name])
        self.crcs = crcs
        self.n_crcs = n_crcs
        self._checked = np.zeros(ctx.n_tensors, dtype=bool)
        self._seg_total = np.zeros(0, dtype=np.int64)
        self._files_checked = False
        self._blocks = np.zeros(ctx.n_tensors, dtype=np.int64)  # checksum blocks per checked tensor
        self._crc_data_offset = -1  # of a crc blob read through a callable
        self.crc_bytes_read = 0  # checksum bytes fetched through read= (diagnostics)
        self._mmap: mmap.mmap | None = None  # the mapped table blob, whose pages lookups release
        self._col_offset: dict[str, int] = {}
        D = ctx.ndim
        self._padmask = np.arange(D) >= ctx.ndims[:, None]  # [T, D]: dims past a tensor's ndim
        self._padded = bool(self._padmask.any())
        self._shapes32 = ctx.shapes.astype(np.int32) if not ctx.wide else ctx.shapes
        self._check_structure()

    # ------------------------------------------------------------------ sizes
    @property
    def where(self) -> str:
        return self._ctx.where

    @property
    def n_chunks(self) -> int:
        return int(self.file.shape[0])

    @property
    def n_tensors(self) -> int:
        return self._ctx.n_tensors

    @property
    def n_files(self) -> int:
        return int(self._ctx.file_sizes.shape[0])

    @property
    def ndim(self) -> int:
        """D: the width of ``offsets``/``sizes`` (the largest tensor ndim)."""
        return self._ctx.ndim

    @property
    def specs(self) -> TensorSpecs:
        """The tensors this table describes."""
        return self._ctx.specs

    @property
    def file_sizes(self) -> np.ndarray:
        """Size in bytes of each file (int64 [F], as given)."""
        return self._ctx.file_sizes

    @property
    def table_nbytes(self) -> int:
        """Bytes of the table blob's columns (the crc column excluded)."""
        return sum(int(getattr(self, n).nbytes) for n in _ORDER)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        *,
        tensor_ids: Any,
        offsets: Any,
        sizes: Any,
        file: Any,
        start: Any,
        tensor_shapes: Sequence[Sequence[int]] | TensorSpecs,
        file_sizes: Sequence[int],
        tensor_itemsizes: Sequence[int] | None = None,
        block_log2: Any = None,
        crc_start: Any = None,
        crcs: Any = None,
        file_rank: Any = None,
        segments: Segments | None = None,
        tensor_names: Sequence[str] | None = None,
        file_names: Sequence[str] | None = None,
        where: str = "<chunk table>",
        check: bool = True,
        partial: bool = False,
    ) -> ChunkTable:
        """Build a table from per-chunk arrays in any order (vectorized: one sort, no Python loop).

        ``offsets``/``sizes`` are [C, <= D] (narrower tensors padded with 0 / 1); ``crc_start`` [C]
        indexes each chunk's first block in ``crcs`` (any order, as the writer produced them);
        ``segments.chunk`` are input row numbers whose ``start`` is ignored.  The table is then
        checked in full, file bytes included (``check=False`` skips that, for callers that check
        later).  ``partial=True`` (one rank's chunks) allows tensors the chunks do not cover.
        """
        ctx = _context(tensor_shapes, tensor_itemsizes, file_sizes, names=tensor_names, file_names=file_names, where=where)
        T, D = ctx.n_tensors, ctx.ndim
        tid = np.asarray(tensor_ids, dtype=np.int64).reshape(-1)
        C = len(tid)
        offs = _pad(offsets, C, D, 0, f"{where}: offsets")
        szs = _pad(sizes, C, D, 1, f"{where}: sizes")
        fil = np.asarray(file, dtype=np.int64).reshape(-1)
        sta = np.asarray(start, dtype=np.int64).reshape(-1)
        bl = np.zeros(C, np.int64) if block_log2 is None else np.asarray(block_log2, dtype=np.int64).reshape(-1)
        cs = np.zeros(C, np.int64) if crc_start is None else np.asarray(crc_start, dtype=np.int64).reshape(-1)
        crc_in = np.zeros(0, np.uint32) if crcs is None else np.asarray(crcs, dtype=np.uint32).reshape(-1)
        for what, arr in (("file", fil), ("start", sta), ("block_log2", bl), ("crc_start", cs)):
            if len(arr) != C:
                raise LayoutError(f"{where}: column {what!r} has {len(arr)} rows for {C} chunks")
        if C and (tid.min() < 0 or tid.max() >= T):
            raise LayoutError(f"{where}: tensor id {int(tid[(tid < 0) | (tid >= T)][0])} outside 0..{T - 1}")
        if C and (bl.min() < 0 or bl.max() > _MAX_BLOCK_LOG2):
            raise LayoutError(f"{where}: block_log2 must be in 0..{_MAX_BLOCK_LOG2}")
        if offs.size and (offs.min() < 0 or szs.min() < 0):
            raise LayoutError(f"{where}: offsets and sizes must be >= 0")
        if fil.size and (fil.min() < 0 or fil.max() > _INT32_MAX):
            raise LayoutError(f"{where}: file ids must be in 0..2**31-1")
        fr = np.full(ctx.file_sizes.shape[0], -1, np.int64) if file_rank is None else np.asarray(file_rank, np.int64)
        if fr.shape != ctx.file_sizes.shape:
            raise LayoutError(f"{where}: file_rank has {fr.size} entries for {ctx.file_sizes.size} files")

        order = _sort_order(tid, offs, ctx)
        if not (len(order) and order[-1] == C - 1 and np.array_equal(order, np.arange(C))):
            tid, offs, szs, fil, sta, bl, cs = (a[order] for a in (tid, offs, szs, fil, sta, bl, cs))
        ptr = np.zeros(T + 1, dtype=np.int64)
        np.cumsum(np.bincount(tid, minlength=T), out=ptr[1:])
        max0 = np.zeros(T, np.int64)
        if D and C:
            nonempty = ptr[1:] > ptr[:-1]
            max0[nonempty] = np.maximum.reduceat(szs[:, 0], ptr[:-1][nonempty])
        # checksums stay where the writer put them: crc_start moves with its chunk
        # segments follow their chunks
        if segments is not None and len(segments.chunk):
            inv = np.empty(C, dtype=np.int64)
            inv[order] = np.arange(C, dtype=np.int64)
            sc = inv[np.asarray(segments.chunk, dtype=np.int64)]
            sp = np.asarray(segments.ptr, dtype=np.int64)
            so = np.argsort(sc, kind="stable")
            cnt = (sp[1:] - sp[:-1])[so]
            sidx = _runs(sp[:-1][so], cnt)
            seg_chunk = sc[so]
            seg_ptr = np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64)
            seg_start = np.asarray(segments.start, dtype=np.int64)[sidx]
            seg_len = np.asarray(segments.length, dtype=np.int64)[sidx]
            sta = sta.copy()
            sta[seg_chunk] = -1
        else:
            seg_chunk = np.zeros(0, np.int64)
            seg_ptr = np.zeros(1, np.int64)
            seg_start = np.zeros(0, np.int64)
            seg_len = np.zeros(0, np.int64)
        cdt = np.dtype("<i8") if ctx.wide else np.dtype("<i4")
        cols = {
            "tensor_ptr": ptr,
            "tensor_max0": max0,
            "start": sta,
            "crc_start": cs,
            "seg_chunk": seg_chunk,
            "seg_ptr": seg_ptr,
            "seg_start": seg_start,
            "seg_len": seg_len,
            "offsets": offs.astype(cdt),
            "sizes": szs.astype(cdt),
            "file": fil.astype("<i4"),
            "file_rank": fr.astype("<i4"),
            "block_log2": bl.astype("|u1"),
        }
        table = cls(ctx, cols, crc_in, len(crc_in), partial=partial)
        if check:
            table.check(files=True)
        return table

    @classmethod
    def from_records(
        cls,
        records: Sequence[ChunkRecord],
        *,
        tensor_shapes: Sequence[Sequence[int]] | TensorSpecs,
        file_sizes: Sequence[int],
        tensor_itemsizes: Sequence[int] | None = None,
        file_rank: Any = None,
        tensor_names: Sequence[str] | None = None,
        file_names: Sequence[str] | None = None,
        where: str = "<chunk table>",
        partial: bool = False,
    ) -> ChunkTable:
        """Build a table from a few :class:`ChunkRecord` (small sources, tests, version-1 indexes);
        checked in full."""
        if isinstance(tensor_shapes, TensorSpecs):
            specs = tensor_shapes
        else:
            if tensor_itemsizes is None:
                raise LayoutError(f"{where}: tensor_itemsizes is required with plain tensor shapes")
            specs = TensorSpecs.of(tensor_shapes, tensor_itemsizes, tensor_names, where=where)
        T, D = len(specs), int(specs.shapes.shape[1])
        C = len(records)
        offs = np.zeros((C, D), np.int64)
        szs = np.ones((C, D), np.int64)
        tid = np.zeros(C, np.int64)
        fil = np.zeros(C, np.int64)
        sta = np.zeros(C, np.int64)
        bl = np.zeros(C, np.int64)
        cs = np.zeros(C, np.int64)
        crcs: list[int] = []
        seg_chunk: list[int] = []
        seg_ptr = [0]
        seg_start: list[int] = []
        seg_len: list[int] = []
        for i, r in enumerate(records):
            if not 0 <= r.tensor < T or len(r.offsets) != specs.ndims[r.tensor]:
                raise LayoutError(f"{where}: chunk {i} names tensor {r.tensor} with {len(r.offsets)} dims, which does not exist")
            offs[i, : len(r.offsets)] = r.offsets
            szs[i, : len(r.sizes)] = r.sizes
            tid[i], fil[i], sta[i] = r.tensor, r.file, r.segments[0][0]
            if r.block_size:
                nbytes = math.prod(r.sizes) * int(specs.itemsizes[r.tensor])
                want = -(-nbytes // r.block_size)
                if len(r.crcs or ()) != want:
                    raise LayoutError(f"{where}: chunk {i} has {len(r.crcs or ())} checksums for {want} blocks of {r.block_size} bytes")
                bl[i] = r.block_size.bit_length() - 1
                cs[i] = len(crcs)
                crcs.extend(r.crcs or ())
            if len(r.segments) > 1:
                seg_chunk.append(i)
                seg_start.extend(s for s, _ in r.segments)
                seg_len.extend(n for _, n in r.segments)
                seg_ptr.append(len(seg_start))
        segs = Segments(np.asarray(seg_chunk, np.int64), np.asarray(seg_ptr, np.int64), np.asarray(seg_start, np.int64), np.asarray(seg_len, np.int64))
        return cls.from_arrays(
            tensor_ids=tid, offsets=offs, sizes=szs, file=fil, start=sta, block_log2=bl, crc_start=cs,
            crcs=np.asarray(crcs, dtype=np.uint64).astype(np.uint32) if crcs else None,
            tensor_shapes=specs, file_sizes=file_sizes,
            file_rank=file_rank, segments=segs, file_names=file_names,
            where=where, check=True, partial=partial,
        )

    @classmethod
    def from_buffer(
        cls,
        table_buf: Any,
        crcs_buf: Any | None,
        *,
        n_tensors: int,
        file_sizes: Sequence[int],
        tensor_shapes: Sequence[Sequence[int]] | TensorSpecs,
        tensor_itemsizes: Sequence[int] | None = None,
        where: str,
        tensor_names: Sequence[str] | None = None,
        file_names: Sequence[str] | None = None,
        check: bool = False,
        partial: bool = False,
    ) -> ChunkTable:
        """Open a table blob (bytes, ``mmap``, any buffer): columns are views of it, nothing is copied.

        The tensors and files come from the index root (tensor id = position in its list).  The
        structural rules run now, O(T + F + S); lookups validate what they return; ``check=True``
        runs every rule on every chunk now (verify, commit).  ``partial=True`` for one rank's
        report (its chunks need not cover the tensors).  Keep the buffers open while the table lives.
        """
        ctx = _context(tensor_shapes, tensor_itemsizes, file_sizes, names=tensor_names, file_names=file_names, where=where)
        if ctx.n_tensors != n_tensors:
            raise FormatError(f"{where}: n_tensors {n_tensors} but {ctx.n_tensors} tensor shapes given")
        meta, cols, col_offset = _decode(table_buf, where, "chunk table")
        if meta.get("format") != TABLE_FORMAT:
            raise FormatError(f"{where}: not a distckpt chunk table (__metadata__ format {meta.get('format')!r:.40})")
        ver = meta.get("version")
        if ver != str(TABLE_VERSION):
            raise FormatError(f"{where}: chunk table version {ver!r:.20} is not supported (this distckpt reads {TABLE_VERSION})")
        n_crcs = _meta_int(meta, "n_crcs", where, "chunk table")
        if n_crcs > _MAX_CRCS:
            raise FormatError(f"{where}: chunk table says {n_crcs} checksums; at most 2**40 are supported")
        missing = [n for n in _ORDER if n not in cols]
        if missing:
            raise FormatError(f"{where}: chunk table lacks column(s) {missing}")
        extra = sorted(set(cols) - set(_ORDER))
        if extra:
            raise FormatError(f"{where}: chunk table has unknown column(s) {extra[:8]}")
        for name, (dts, nd) in _SPEC.items():
            a = cols[name]
            if a.dtype.str not in dts:
                raise FormatError(
                    f"{where}: column {name!r} has dtype {_ST_NAME.get(a.dtype.str, a.dtype.str)}; "
                    f"expected {' or '.join(_ST_NAME[d] for d in dts)}"
                )
            if a.ndim != nd:
                raise FormatError(f"{where}: column {name!r} has {a.ndim} dims; expected {nd}")
        crcs = None
        if crcs_buf is not None:
            crcs = _decode_crcs(crcs_buf, where)
            if len(crcs) != n_crcs:
                raise FormatError(f"{where}: the crc blob holds {len(crcs)} checksums, the table says {n_crcs}")
        table = cls(ctx, cols, crcs, n_crcs, partial=partial)
        if isinstance(table_buf, mmap.mmap):
            table._mmap, table._col_offset = table_buf, col_offset
        if check:
            table.check()
        return table

    def attach_crcs(self, crcs_buf: Any) -> None:
        """Attach the crc blob (bytes or ``mmap``) after opening without it."""
        crcs = _decode_crcs(crcs_buf, self.where)
        if len(crcs) != self.n_crcs:
            raise FormatError(f"{self.where}: the crc blob holds {len(crcs)} checksums, the table says {self.n_crcs}")
        self.crcs = crcs

    # ------------------------------------------------------------------ serialization
    def to_parts(self) -> tuple[list[memoryview], list[memoryview]]:
        """The two blobs as lists of buffers (header, then each column, nothing copied), for a
        writer that writes them one after the other; ``b"".join`` of each is :meth:`to_bytes`."""
        meta = {"format": TABLE_FORMAT, "version": str(TABLE_VERSION), "n_crcs": str(self.n_crcs)}
        table = _encode([(n, getattr(self, n)) for n in _ORDER], meta)
        crcs = self.crcs
        if crcs is None:
            if self.n_crcs:
                raise ValueError(f"{self.where}: table opened without its crc blob cannot write one")
            crcs = np.zeros(0, np.uint32)
        crc = _encode([("crc32c", np.asarray(crcs, dtype="<u4"))], {"format": CRC_FORMAT, "version": str(TABLE_VERSION)})
        return table, crc

    def to_bytes(self) -> tuple[bytes, bytes]:
        """``(table blob, crc blob)`` as safetensors bytes."""
        t, c = self.to_parts()
        return b"".join(t), b"".join(c)

    # ------------------------------------------------------------------ accessors
    def chunk_range(self, tensor_id: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of the chunks of ``tensor_id``."""
        self._tensor_ok(tensor_id)
        return int(self.tensor_ptr[tensor_id]), int(self.tensor_ptr[tensor_id + 1])

    def tensor_of(self, chunk_ids: Any) -> np.ndarray:
        """Tensor id of each chunk (int64)."""
        ids = self._ids(chunk_ids)
        return np.searchsorted(self.tensor_ptr, ids, side="right") - 1

    def lengths(self, chunk_ids: Any) -> np.ndarray:
        """Byte length of each chunk, ``prod(sizes) * itemsize`` (int64); the chunks are validated."""
        ids = self._ids(chunk_ids)
        return self._row_rules(ids, self.tensor_of(ids))[1]

    def ranks(self, chunk_ids: Any) -> np.ndarray:
        """Writer rank of each chunk (from its file; -1 when unknown)."""
        ids = self._ids(chunk_ids)
        self._row_rules(ids, self.tensor_of(ids))
        return self.file_rank[self.file[ids]].astype(np.int64)

    def byte_spans(self, chunk_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ptr, start, length)`` CSR: chunk ``chunk_ids[i]``'s bytes are the segments
        ``ptr[i]:ptr[i+1]`` of its file (one for distckpt chunks, several for split ``.ckpt`` values)."""
        ids = self._ids(chunk_ids)
        return self._spans(ids, self.lengths(ids))

    def _spans(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        S = len(self.seg_chunk)
        k = np.searchsorted(self.seg_chunk, ids)
        kk = np.minimum(k, max(S - 1, 0))
        multi = (k < S) & (self.seg_chunk[kk] == ids) if S else np.zeros(len(ids), bool)
        counts = np.ones(len(ids), np.int64)
        counts[multi] = self.seg_ptr[kk[multi] + 1] - self.seg_ptr[kk[multi]]
        ptr = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        start = np.empty(int(ptr[-1]), np.int64)
        length = np.empty(int(ptr[-1]), np.int64)
        single = ~multi
        start[ptr[:-1][single]] = self.start[ids[single]]
        length[ptr[:-1][single]] = lengths[single]
        if multi.any():
            src = _runs(self.seg_ptr[kk[multi]], counts[multi])
            dst = _runs(ptr[:-1][multi], counts[multi])
            start[dst] = self.seg_start[src]
            length[dst] = self.seg_len[src]
        return ptr, start, length

    def segments(self, chunk_id: int) -> list[tuple[int, int]]:
        """(file byte offset, length) pieces of one chunk."""
        _, s, n = self.byte_spans([chunk_id])
        return [(int(a), int(b)) for a, b in zip(s, n)]

    def to_records(self) -> list[ChunkRecord]:
        """Every chunk as a :class:`ChunkRecord`: one Python object per chunk, for small tables
        (inspect, version-1 export, tests) only."""
        self.check()
        ids = np.arange(self.n_chunks)
        ptr, s, n = self.byte_spans(ids)
        t = self.tensor_of(ids)
        nd = self._ctx.ndims[t]
        nbs = _nblocks(self.lengths(ids), self.block_log2)
        crcs = self.crcs
        if crcs is None and self.n_crcs:
            raise ValueError(f"{self.where}: table opened without its crc blob")
        out = []
        for i in range(self.n_chunks):
            bl = int(self.block_log2[i])
            cs = int(self.crc_start[i])
            out.append(
                ChunkRecord(
                    int(t[i]),
                    tuple(int(v) for v in self.offsets[i, : nd[i]]),
                    tuple(int(v) for v in self.sizes[i, : nd[i]]),
                    int(self.file[i]),
                    tuple((int(a), int(b)) for a, b in zip(s[ptr[i] : ptr[i + 1]], n[ptr[i] : ptr[i + 1]])),
                    tuple(int(c) for c in crcs[cs : cs + int(nbs[i])]) if bl and crcs is not None else None,
                    (1 << bl) if bl else 0,
                )
            )
        return out

    # ------------------------------------------------------------------ lookup
    def overlapping(
        self, tensor_id: int, offsets: Sequence[int], sizes: Sequence[int], *, cover: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunks of ``tensor_id`` that share an element with the box ``offsets``+``sizes``.

        Returns ``(chunk_ids, inter_offsets, inter_sizes)``, the last two [k, ndim] int64 in tensor
        coordinates, chunk ids ascending.  See :meth:`overlapping_many`.
        """
        self._tensor_ok(tensor_id)
        nd = int(self._ctx.ndims[tensor_id])
        if len(offsets) != nd or len(sizes) != nd:
            raise LayoutError(
                f"{self.where}: box {list(offsets)}+{list(sizes)} does not have the {nd} dims of tensor {self._ctx.tname(tensor_id)}"
            )
        h = self.overlapping_many(
            np.array([tensor_id]), np.array(offsets, np.int64).reshape(1, nd), np.array(sizes, np.int64).reshape(1, nd), cover=cover
        )
        return h.chunk_ids, h.inter_offsets[:, :nd], h.inter_sizes[:, :nd]

    def overlapping_many(self, tensor_ids: Any, box_offsets: Any, box_sizes: Any, *, cover: bool | None = None) -> Hits:
        """:meth:`overlapping` for R requests at once (boxes [R, <= D], padded with 0 / 1).

        Requests run in tensor order, in batches of about :data:`LOOKUP_ROWS` table rows: a
        vectorized bisection on the dim-0 starts (from ``box_start - tensor_max0 + 1`` to
        ``box_end``) bounds each request's candidates, which are then intersected one dim at a
        time.  What is returned is validated: every hit passes the single-chunk rules, the hits of
        a request are pairwise disjoint and, with ``cover`` (default: unless the table is partial),
        fill the box exactly; otherwise FormatError.  When the table is an ``mmap``, each batch's
        pages are released once its hits are copied out, so a plan that touches every tensor of a
        10^7-chunk table holds about one batch of it in memory.  Time O(R log C + candidates);
        memory O(R + hits + one batch).
        """
        ctx = self._ctx
        D = ctx.ndim
        cover = (not self.partial) if cover is None else cover
        t = np.asarray(tensor_ids, dtype=np.int64).reshape(-1)
        R = len(t)
        bo = _pad(box_offsets, R, D, 0, "box offsets")
        bs = _pad(box_sizes, R, D, 1, "box sizes")
        if R:
            if t.min() < 0 or t.max() >= ctx.n_tensors:
                raise LayoutError(f"{self.where}: tensor id {int(t[(t < 0) | (t >= ctx.n_tensors)][0])} outside 0..{ctx.n_tensors - 1}")
            shp = ctx.shapes[t]
            bad = (bo < 0) | (bs < 0) | (bo > shp) | (bs > shp - bo) | (self._padmask[t] & ((bo != 0) | (bs != 1)))
            if bad.any():
                r = int(np.flatnonzero(bad.any(axis=1))[0])
                nd = int(ctx.ndims[t[r]])
                raise LayoutError(
                    f"{self.where}: box {bo[r, :nd].tolist()}+{bs[r, :nd].tolist()} is not inside tensor "
                    f"{ctx.tname(int(t[r]))} of shape {ctx.shapes[t[r], :nd].tolist()}"
                )
        order = np.argsort(t, kind="stable")
        rows = np.cumsum(self.tensor_ptr[t[order] + 1] - self.tensor_ptr[t[order]])
        parts: list[tuple[np.ndarray, ...]] = []
        i0 = 0
        while i0 < R:
            base = int(rows[i0 - 1]) if i0 else 0
            i1 = max(int(np.searchsorted(rows, base + LOOKUP_ROWS, side="right")), i0 + 1)
            idx = order[i0:i1]
            parts.append(self._lookup(idx, t, bo, bs, cover))
            self._release(int(self.tensor_ptr[t[idx[0]]]), int(self.tensor_ptr[t[idx[-1]] + 1]))
            i0 = i1
        if parts:
            cols = [np.concatenate(c) for c in zip(*parts)]
        else:
            cols = [np.zeros(0, np.int64)] * 2 + [np.zeros((0, D), np.int64)] * 4 + [np.zeros(0, np.int64)] * 5
        req, *fields = cols
        ptr = np.zeros(R + 1, np.int64)
        np.cumsum(np.bincount(req, minlength=R), out=ptr[1:])
        if len(req) > 1 and (req[1:] < req[:-1]).any():
            back = np.argsort(req, kind="stable")  # request order; chunk order within a request is kept
            fields = [f[back] for f in fields]
        return Hits(ptr, *fields)

    def _lookup(self, idx: np.ndarray, t: np.ndarray, bo: np.ndarray, bs: np.ndarray, cover: bool) -> tuple[np.ndarray, ...]:
        """Hits of requests ``idx`` (ascending tensor ids), validated, as Hits columns led by the request."""
        D = self.ndim
        ti, boi, bsi = t[idx], bo[idx], bs[idx]
        p0 = self.tensor_ptr[ti]
        p1 = self.tensor_ptr[ti + 1]
        if D:
            o0 = self.offsets[:, 0]
            if len(idx) <= _FEW:  # a scalar search per request beats ~60 vectorized bisection steps
                lo = np.empty(len(idx), np.int64)
                hi = np.empty(len(idx), np.int64)
                # the box is inside the shape and tensor_max0 inside dim 0, so both keys fit the column's dtype
                keys0 = (boi[:, 0] - self.tensor_max0[ti] + 1).tolist()
                keys1 = (boi[:, 0] + bsi[:, 0]).tolist()
                for r, (a, b) in enumerate(zip(p0.tolist(), p1.tolist())):
                    col = o0[a:b]
                    lo[r] = a + int(np.searchsorted(col, keys0[r]))
                    hi[r] = a + int(np.searchsorted(col, keys1[r]))
            else:
                lo = _bisect_left(o0, p0, p1, boi[:, 0] - self.tensor_max0[ti] + 1)
                hi = _bisect_left(o0, lo, p1, boi[:, 0] + bsi[:, 0])
            counts = np.where((bsi == 0).any(axis=1), 0, hi - lo)
        else:
            lo, counts = p0, p1 - p0
        out = []
        csum = np.cumsum(counts)
        small = self.offsets.dtype == np.int32 and self.sizes.dtype == np.int32 and not self._ctx.wide
        b_lo = boi.astype(np.int32) if small else boi
        b_hi = (boi + bsi).astype(np.int32) if small else boi + bsi
        r0 = 0
        while r0 < len(idx):
            base = int(csum[r0 - 1]) if r0 else 0
            r1 = max(int(np.searchsorted(csum, base + LOOKUP_BATCH, side="right")), r0 + 1)
            cnt = counts[r0:r1]
            cand = _runs(lo[r0:r1], cnt)
            owner = np.repeat(np.arange(r0, r1), cnt)
            # a mask per dim, dropping misses as soon as they show (dim 0 last: the window already
            # nearly matches it), in the columns' own dtype; intersections only for the survivors
            for k, d in enumerate([*range(1, D), 0][:D]):
                if k == 0:
                    blo, bhi = np.repeat(b_lo[r0:r1, d], cnt), np.repeat(b_hi[r0:r1, d], cnt)
                else:
                    blo, bhi = b_lo[owner, d], b_hi[owner, d]
                od = self.offsets[:, d][cand]
                m = (od < bhi) & (od + self.sizes[:, d][cand] > blo)
                if not m.all():
                    cand, owner = cand[m], owner[m]
            co = self.offsets[cand].astype(np.int64)
            ilo = np.maximum(co, boi[owner])
            ihi = np.minimum(co + self.sizes[cand], boi[owner] + bsi[owner])
            keep = (ihi > ilo).all(axis=1)  # exact, in int64 (hostile values may wrap in int32)
            if not keep.all():
                cand, owner, ilo, ihi = cand[keep], owner[keep], ilo[keep], ihi[keep]
            out.append((owner, cand, ilo, ihi - ilo))
            r0 = r1
        owner, cand, ilo, isz = (np.concatenate(c) for c in zip(*out)) if out else (np.zeros(0, np.int64),) * 2 + (np.zeros((0, D), np.int64),) * 2
        _, length, _ = self._row_rules(cand, ti[owner])
        ptr = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(np.bincount(owner, minlength=len(idx)), out=ptr[1:])
        self._check_hits(ptr, cand, ilo, isz, ti, boi, bsi, cover)
        return (
            idx[owner],
            cand,
            ilo,
            isz,
            self.offsets[cand].astype(np.int64),
            self.sizes[cand].astype(np.int64),
            self.file[cand].astype(np.int64),
            self.start[cand],
            length,
            self.block_log2[cand].astype(np.int64),
            self.crc_start[cand],
        )

    def _release(self, row_lo: int, row_hi: int) -> None:
        """Drop the pages of rows [row_lo, row_hi) of the per-chunk columns from this process
        (``madvise(MADV_DONTNEED)`` on the mapped table; the page cache keeps them)."""
        mm = self._mmap
        if mm is None or row_hi <= row_lo:
            return
        page = mmap.PAGESIZE
        for name in ("offsets", "sizes", "file", "start", "block_log2", "crc_start"):
            col = getattr(self, name)
            off = self._col_offset[name]
            row = col.strides[0]
            a = -(-(off + row_lo * row) // page) * page
            b = (off + row_hi * row) // page * page
            if b > a:
                try:
                    mm.madvise(mmap.MADV_DONTNEED, a, b - a)
                except (OSError, ValueError):  # closed, or not supported: only memory is at stake
                    return

    # ------------------------------------------------------------------ checksums
    def block_spans(self, chunk_ids: Any, byte_lo: Any, byte_hi: Any) -> Blocks:
        """The crc blocks covering bytes ``[byte_lo, byte_hi)`` of each chunk's bytes (no crc read)."""
        ids = self._ids(chunk_ids)
        try:
            return _block_spans(self.lengths(ids), self.block_log2[ids], self.crc_start[ids], byte_lo, byte_hi)
        except LayoutError as exc:
            raise LayoutError(f"{self.where}: {exc}") from None

    def blocks_for(self, chunk_ids: Any, byte_lo: Any, byte_hi: Any, *, read: Callable[[int, int], Any] | None = None) -> Blocks:
        """:meth:`block_spans` with the checksum values (see :meth:`fetch_crcs`)."""
        return self.fetch_crcs(self.block_spans(chunk_ids, byte_lo, byte_hi), read=read)

    def crc_range(self, lo: int, hi: int, *, read: Callable[[int, int], Any] | None = None) -> np.ndarray:
        """Checksums ``[lo, hi)`` of the crc column (uint32): from the attached blob, else through
        ``read(offset, length)`` as :meth:`fetch_crcs` does (one read for the run)."""
        if not (_is_int(lo) and _is_int(hi) and 0 <= lo <= hi <= self.n_crcs):
            raise LayoutError(f"{self.where}: checksums [{lo}, {hi}) outside 0..{self.n_crcs}")
        if self.crcs is not None:
            return np.asarray(self.crcs[lo:hi])
        if read is None:
            raise ValueError(f"{self.where}: the table was opened without its crc blob; pass read= or call attach_crcs")
        return self._read_crcs(np.array([lo], np.int64), np.array([hi - lo], np.int64), read)

    def fetch_crcs(self, blocks: Blocks, *, read: Callable[[int, int], Any] | None = None) -> Blocks:
        """Fill ``blocks.crcs``: from the crc column when the blob was given (an ``mmap`` pages in
        what it touches), else through ``read(offset, length) -> bytes`` over the crc blob (its
        header on first use, then one read per run of nearby blocks): a remote store, or
        ``os.pread`` so a multi-GB crc blob is never mapped."""
        lo, n = blocks.crc_lo, blocks.crc_hi - blocks.crc_lo
        if len(lo) and ((lo < 0) | (n < 0) | (blocks.crc_hi > self.n_crcs)).any():
            raise LayoutError(f"{self.where}: checksum index outside 0..{self.n_crcs}")
        if self.crcs is not None:
            return blocks._replace(crcs=_gather_runs(self.crcs, lo, n))
        if read is None:
            raise ValueError(f"{self.where}: the table was opened without its crc blob; pass read= or call attach_crcs")
        return blocks._replace(crcs=self._read_crcs(lo, n, read))

    # ------------------------------------------------------------------ validation
    def check(self, tensor_ids: Any = None, *, files: bool = False) -> None:
        """Every per-chunk and per-tensor rule for ``tensor_ids`` (all when None); cached per tensor.

        O(C_t * D) per tensor, vectorized in windows of :data:`CHECK_WINDOW` rows; with every
        tensor, the chunks' block counts must also add up to the crc column's length.
        ``files=True`` also proves that no two chunks share a file byte or a checksum (sorts:
        O(C log C)), so every checksum belongs to exactly one chunk.
        """
        T = self.n_tensors
        if tensor_ids is None:
            todo = np.flatnonzero(~self._checked)
            whole = True
        else:
            t = np.unique(np.asarray(tensor_ids, dtype=np.int64).reshape(-1))
            if len(t) and (t[0] < 0 or t[-1] >= T):
                raise LayoutError(f"{self.where}: tensor id outside 0..{T - 1}")
            todo = t[~self._checked[t]]
            whole = False
        if len(todo):
            self._check_tensors(todo)
        if whole:
            total = sum(self._blocks.tolist())  # exact
            if total != self.n_crcs:
                self._fail(f"the chunks have {total} checksum blocks; the crc column has {self.n_crcs}")
        if files and not self._files_checked:
            self.check()
            self._check_files()

    # ------------------------------------------------------------------ internals
    def _ids(self, chunk_ids: Any) -> np.ndarray:
        ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_chunks):
            raise LayoutError(f"{self.where}: chunk id outside 0..{self.n_chunks - 1}")
        return ids

    def _tensor_ok(self, t: Any) -> None:
        if not _is_int(t) or not 0 <= t < self.n_tensors:
            raise LayoutError(f"{self.where}: tensor id {t!r} outside 0..{self.n_tensors - 1}")

    def _fail(self, msg: str) -> NoReturn:
        raise FormatError(f"{self.where}: {msg}")

    def _row(self, i: int) -> str:
        t = int(np.searchsorted(self.tensor_ptr, i, side="right") - 1)
        nd = int(self._ctx.ndims[t]) if 0 <= t < self.n_tensors else self.ndim
        return (
            f"chunk {i} (tensor {self._ctx.tname(t)}, offsets {self.offsets[i, :nd].tolist()}, "
            f"sizes {self.sizes[i, :nd].tolist()})"
        )

    def _check_structure(self) -> None:
        """Open-time rules: O(T + F + S)."""
        ctx = self._ctx
        T, D, F = ctx.n_tensors, ctx.ndim, self.n_files
        C = self.n_chunks
        for name in ("start", "block_log2", "crc_start"):
            if getattr(self, name).shape != (C,):
                self._fail(f"column {name!r} has {getattr(self, name).shape[0]} rows; column 'file' has {C}")
        for name in ("offsets", "sizes"):
            if getattr(self, name).shape != (C, D):
                self._fail(
                    f"column {name!r} has shape {list(getattr(self, name).shape)}; expected [{C}, {D}] "
                    f"({C} chunks, largest tensor ndim {D})"
                )
        ptr = self.tensor_ptr
        if ptr.shape != (T + 1,):
            self._fail(f"column 'tensor_ptr' has {ptr.shape[0]} entries; expected {T + 1} for {T} tensors")
        if ptr[0] != 0 or ptr[-1] != C:
            self._fail(f"column 'tensor_ptr' runs from {int(ptr[0])} to {int(ptr[-1])}; expected 0 to {C} (the chunk count)")
        dec = ptr[1:] < ptr[:-1]
        if dec.any():
            t = _first_true(dec)
            self._fail(f"column 'tensor_ptr' decreases at tensor {ctx.tname(t)}: {int(ptr[t])} then {int(ptr[t + 1])}")
        m0 = self.tensor_max0
        if m0.shape != (T,):
            self._fail(f"column 'tensor_max0' has {m0.shape[0]} entries for {T} tensors")
        if T and D and ((m0 < 0) | (m0 > ctx.shapes[:, 0])).any():
            t = _first_true((m0 < 0) | (m0 > ctx.shapes[:, 0]))
            self._fail(f"column 'tensor_max0' holds {int(m0[t])} for tensor {ctx.tname(t)} whose dim 0 is {int(ctx.shapes[t, 0])}")
        if self.file_rank.shape != (F,):
            self._fail(f"column 'file_rank' has {self.file_rank.shape[0]} entries for {F} files")
        if F and self.file_rank.min() < -1:
            self._fail(f"column 'file_rank' holds {int(self.file_rank.min())}; ranks are >= 0 (-1: unknown)")
        if self.crcs is not None and len(self.crcs) != self.n_crcs:
            self._fail(f"crc column has {len(self.crcs)} entries, the table says {self.n_crcs}")
        # segments
        S, N = self.seg_chunk.shape[0], self.seg_start.shape[0]
        sc, sp = self.seg_chunk, self.seg_ptr
        if sp.shape != (S + 1,):
            self._fail(f"column 'seg_ptr' has {sp.shape[0]} entries for {S} segmented chunks")
        if self.seg_len.shape != (N,):
            self._fail(f"column 'seg_len' has {self.seg_len.shape[0]} entries, 'seg_start' has {N}")
        if sp[0] != 0 or sp[-1] != N:
            self._fail(f"column 'seg_ptr' runs from {int(sp[0])} to {int(sp[-1])}; expected 0 to {N}")
        if not S:
            return
        if (sp[1:] <= sp[:-1]).any():
            self._fail("column 'seg_ptr' must strictly increase (every segmented chunk has segments)")
        if sc[0] < 0 or sc[-1] >= C or (sc[1:] <= sc[:-1]).any():
            self._fail(f"column 'seg_chunk' must be strictly increasing chunk ids in 0..{C - 1}")
        ss, sl = self.seg_start, self.seg_len
        if ss.min() < 0 or sl.min() < 0:
            self._fail("columns 'seg_start'/'seg_len' hold a negative value")
        f = self.file[sc].astype(np.int64)
        if f.min() < 0 or f.max() >= F:
            i = int(sc[_first_true((f < 0) | (f >= F))])
            self._fail(f"column 'file': {self._row(i)} names file {int(self.file[i])}; there are {F} files")
        owner = np.repeat(np.arange(S), sp[1:] - sp[:-1])
        fsz = ctx.file_sizes[f][owner]
        bad = (ss > fsz) | (sl > fsz - ss)
        if bad.any():
            k = _first_true(bad)
            self._fail(
                f"segment [{int(ss[k])}, +{int(sl[k])}) of {self._row(int(sc[owner[k]]))} lies past the end of "
                f"file {ctx.fname(int(f[owner[k]]))} ({int(fsz[k])} bytes)"
            )
        # each length fits its file (< 2**62); a float sum first keeps the int64 sums from wrapping
        if (np.add.reduceat(sl.astype(np.float64), sp[:-1]) > 2.0**62).any():
            self._fail("column 'seg_len': a chunk's segments sum past 2**62 bytes")
        self._seg_total = np.add.reduceat(sl, sp[:-1])

    def _row_rules(self, rows: Any, tid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rules of single chunks, for ``rows`` (a slice or chunk ids) of tensors ``tid``:
        file id, offsets/sizes inside the shape (padding exact), bytes inside the file (segments
        summing to the length), block size, checksums inside the crc column.

        Returns (numel, length, blocks) per row.
        """
        ctx = self._ctx
        D, F, S = ctx.ndim, self.n_files, len(self.seg_chunk)
        if isinstance(rows, slice):
            n = rows.stop - rows.start

            def row(i: int) -> int:
                return rows.start + int(i)
        else:
            n = len(rows)

            def row(i: int) -> int:
                return int(rows[i])

        if n == 0:
            z = np.zeros(0, np.int64)
            return z, z, z
        fil = self.file[rows]
        if fil.min() < 0 or fil.max() >= F:
            i = _first_true((fil < 0) | (fil >= F))
            self._fail(f"column 'file': {self._row(row(i))} names file {int(fil[i])}; there are {F} files")
        if D:
            o = self.offsets[rows]
            s = self.sizes[rows]
            if o.dtype == np.int32 and not ctx.wide:
                shp = self._shapes32[tid]  # all int32: s <= shp and o <= shp - s cannot wrap
            else:
                o, s, shp = o.astype(np.int64), s.astype(np.int64), ctx.shapes[tid]
            bad2 = (o < 0) | (s < 0) | (s > shp) | (o > shp - s)
            if self._padded:
                bad2 |= self._padmask[tid] & ((o != 0) | (s != 1))
            if bad2.any():
                i = _first_true(bad2.any(1))
                t = int(tid[i])
                self._fail(
                    f"columns 'offsets'/'sizes': {self._row(row(i))} is not inside the shape "
                    f"{ctx.shapes[t, : ctx.ndims[t]].tolist()} (sizes >= 0; padded dims offset 0, size 1; "
                    f"raw row {o[i].tolist()}+{s[i].tolist()})"
                )
            numel = s[:, 0].astype(np.int64)
            for d in range(1, D):
                numel *= s[:, d]
        else:
            numel = np.ones(n, np.int64)
        length = numel * ctx.itemsizes[tid]
        st = self.start[rows]
        neg = st == -1
        if S:
            ids = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
            k = np.searchsorted(self.seg_chunk, ids)
            kk = np.minimum(k, S - 1)
            listed = (k < S) & (self.seg_chunk[kk] == ids)
        else:
            listed = kk = None
        if (neg.any() if listed is None else (listed != neg).any()):
            i = _first_true(neg if listed is None else listed != neg)
            if neg[i]:
                self._fail(f"column 'start': {self._row(row(i))} has start -1 (segmented) but is not listed in 'seg_chunk'")
            self._fail(f"column 'seg_chunk' lists {self._row(row(i))}, but its start is {int(st[i])}, not -1")
        if listed is not None and kk is not None and listed.any():
            badl = listed & (self._seg_total[kk] != length)
            if badl.any():
                i = _first_true(badl)
                self._fail(
                    f"column 'seg_len': the segments of {self._row(row(i))} hold {int(self._seg_total[kk[i]])} bytes; "
                    f"its sizes x itemsize need {int(length[i])}"
                )
        fsz = ctx.file_sizes[fil]
        bad = (st < 0) | (st > fsz) | (length > fsz - st)
        if listed is not None:
            bad &= ~neg
        if bad.any():
            i = _first_true(bad)
            self._fail(
                f"column 'start': {self._row(row(i))} spans bytes [{int(st[i])}, {int(st[i]) + int(length[i])}), "
                f"outside file {ctx.fname(int(fil[i]))} ({int(fsz[i])} bytes)"
            )
        bl = self.block_log2[rows]
        if bl.max() > _MAX_BLOCK_LOG2:
            i = _first_true(bl > _MAX_BLOCK_LOG2)
            self._fail(f"column 'block_log2': {self._row(row(i))} has block_log2 {int(bl[i])}; at most {_MAX_BLOCK_LOG2}")
        nb = _nblocks(length, bl)
        cs = self.crc_start[rows]
        B = self.n_crcs
        bad = (cs < 0) | (cs > B) | (nb > B - cs)
        if bad.any():
            i = _first_true(bad)
            self._fail(
                f"column 'crc_start': {self._row(row(i))} needs checksums [{int(cs[i])}, {int(cs[i]) + int(nb[i])}); "
                f"the crc column has {B}"
            )
        return numel, length, nb

    def _check_hits(
        self, ptr: np.ndarray, ids: np.ndarray, io: np.ndarray, isz: np.ndarray, t: np.ndarray, bo: np.ndarray, bs: np.ndarray, cover: bool
    ) -> None:
        """The hits of each request (CSR ``ptr``) are pairwise disjoint and, with ``cover``, fill its box."""
        R = len(t)
        owner = np.repeat(np.arange(R), ptr[1:] - ptr[:-1])
        if len(ids) > 1:
            same = owner[1:] == owner[:-1]
            _, banded = _pair_flags(io, isz)
            for r in np.unique(owner[:-1][same & ~banded]):
                a, b = int(ptr[r]), int(ptr[r + 1])
                pair = _first_overlap(io[a:b], io[a:b] + isz[a:b])
                if pair is not None:
                    self._fail(f"{self._row(int(ids[a + pair[0]]))} and {self._row(int(ids[a + pair[1]]))} overlap")
        if cover and R:
            vol = np.zeros(R, np.uint64)
            nz = ptr[1:] > ptr[:-1]
            if len(ids):
                numel = isz[:, 0].astype(np.uint64) if self.ndim else np.ones(len(ids), np.uint64)
                for d in range(1, self.ndim):
                    numel *= isz[:, d].astype(np.uint64)
                vol[nz] = np.add.reduceat(numel, ptr[:-1][nz])
            want = np.prod(bs, axis=1, dtype=np.int64).astype(np.uint64)
            bad = vol != want
            if bad.any():
                r = _first_true(bad)
                nd = int(self._ctx.ndims[t[r]])
                self._fail(
                    f"the chunks of tensor {self._ctx.tname(int(t[r]))} cover {int(vol[r])} of the {int(want[r])} "
                    f"elements of box {bo[r, :nd].tolist()}+{bs[r, :nd].tolist()}: a gap "
                    "(missing chunk, unsorted table or wrong tensor_max0)"
                )

    def _check_tensors(self, todo: np.ndarray) -> None:
        """Every rule over the rows of tensors ``todo`` (sorted unique), in windows."""
        ptr = self.tensor_ptr
        brk = np.flatnonzero(np.diff(todo) != 1) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [len(todo)]])
        vol = np.zeros(self.n_tensors, np.uint64)
        max0 = np.zeros(self.n_tensors, np.int64)
        blocks = np.zeros(self.n_tensors, np.int64)
        exact: list[np.ndarray] = []
        for a, b in zip(todo[starts], todo[ends - 1]):
            run_lo, run_hi = int(ptr[a]), int(ptr[b + 1])
            lo = run_lo
            while lo < run_hi:
                hi = min(lo + CHECK_WINDOW, run_hi)
                exact.append(self._check_window(lo, hi, run_hi, vol, max0, blocks))
                lo = hi
        for t in np.unique(np.concatenate(exact)) if exact else []:
            self._check_overlap_exact(int(t))
        ctx = self._ctx
        if ctx.ndim:
            bad = max0[todo] != self.tensor_max0[todo]
            if bad.any():
                t = int(todo[_first_true(bad)])
                self._fail(f"column 'tensor_max0' says {int(self.tensor_max0[t])} for tensor {ctx.tname(t)}; its chunks' largest dim-0 size is {int(max0[t])}")
        got = vol[todo]
        want = ctx.numels[todo].astype(np.uint64)
        bad = got > want if self.partial else got != want
        if bad.any():
            t = int(todo[_first_true(bad)])
            g, w = int(vol[t]), int(ctx.numels[t])
            self._fail(
                f"the chunks of tensor {ctx.tname(t)} (shape {ctx.shapes[t, : ctx.ndims[t]].tolist()}) "
                f"cover {g} of its {w} elements: " + ("a gap (missing chunk)" if g < w else "overlapping chunks")
            )
        self._blocks[todo] = blocks[todo]
        self._checked[todo] = True

    def _check_window(self, lo: int, hi: int, run_hi: int, vol: np.ndarray, max0: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Rules for rows [lo, hi), plus the pair (hi - 1, hi) when row hi is in the same run;
        returns the tensors that need the exact overlap test."""
        ctx = self._ctx
        D = ctx.ndim
        ptr = self.tensor_ptr
        ext = min(hi + 1, run_hi)
        n, m = hi - lo, ext - lo
        t0 = int(np.searchsorted(ptr, lo, side="right")) - 1
        t1 = int(np.searchsorted(ptr, ext - 1, side="right")) - 1
        tw = np.arange(t0, t1 + 1)
        cnt = np.minimum(ptr[tw + 1], ext) - np.maximum(ptr[tw], lo)
        tid = np.repeat(tw, cnt)
        numel, _, nb = self._row_rules(slice(lo, hi), tid[:n])
        need = np.zeros(0, np.int64)
        if m > 1:
            o = self.offsets[lo:ext]
            s = self.sizes[lo:ext]
            same = tid[1:] == tid[:-1]
            unsorted, banded = _pair_flags(o, s)
            bad = same & unsorted
            if bad.any():
                i = _first_true(bad)
                self._fail(f"the table is not sorted: {self._row(lo + i)} comes before {self._row(lo + i + 1)}")
            need = np.unique(tid[:-1][same & ~banded])
        # per-tensor volume (exact modulo 2**64; < 2**62 once no chunks overlap) and dim-0 extent
        nz = cnt.copy()
        nz[-1] -= m - n  # the extra row belongs to the next window
        keep = nz > 0
        firsts = (np.cumsum(nz) - nz)[keep]
        tk = tw[keep]
        if len(tk):
            vol[tk] += np.add.reduceat(numel.astype(np.uint64), firsts)
            blocks[tk] += np.add.reduceat(nb, firsts)  # each <= n_crcs <= 2**40: no wrap
            if (blocks[tk] > self.n_crcs).any():
                t = int(tk[_first_true(blocks[tk] > self.n_crcs)])
                self._fail(f"the chunks of tensor {ctx.tname(t)} need more checksum blocks than the crc column's {self.n_crcs}")
            if D:
                s0 = self.sizes[lo:hi, 0].astype(np.int64)
                max0[tk] = np.maximum(max0[tk], np.maximum.reduceat(s0, firsts))
        return need

    def _check_overlap_exact(self, t: int) -> None:
        """Exact pairwise overlap test along dim 0 for one tensor that is not band-wise."""
        p0, p1 = int(self.tensor_ptr[t]), int(self.tensor_ptr[t + 1])
        if self.ndim == 0:
            if p1 - p0 > 1:
                self._fail(f"{self._row(p0 + 1)} overlaps {self._row(p0)} (a scalar has one chunk)")
            return
        o = self.offsets[p0:p1].astype(np.int64)
        pair = _first_overlap(o, o + self.sizes[p0:p1])
        if pair is not None:
            self._fail(f"{self._row(p0 + pair[0])} and {self._row(p0 + pair[1])} overlap")

    def _check_files(self) -> None:
        """No two chunks (or segments) share a byte of a file: one sort by (file, start)."""
        ids = np.arange(self.n_chunks)
        tid = np.repeat(np.arange(self.n_tensors), self.tensor_ptr[1:] - self.tensor_ptr[:-1])
        sizes = self.sizes
        lengths = self._ctx.itemsizes[tid]
        for d in range(self.ndim):
            lengths = lengths * sizes[:, d]  # every rule already held (check() ran first)
        ptr, start, length = self._spans(ids, lengths)
        owner = np.repeat(ids, ptr[1:] - ptr[:-1])
        f = self.file[owner].astype(np.int64)
        nz = length > 0
        f, start, length, owner = f[nz], start[nz], length[nz], owner[nz]
        order = np.lexsort((start, f))
        f, start, length, owner = f[order], start[order], length[order], owner[order]
        bad = (f[1:] == f[:-1]) & (start[1:] < start[:-1] + length[:-1])
        if bad.any():
            i = _first_true(bad)
            self._fail(
                f"{self._row(int(owner[i]))} (bytes [{int(start[i])}, {int(start[i] + length[i])})) and "
                f"{self._row(int(owner[i + 1]))} (from byte {int(start[i + 1])}) share bytes of file {self._ctx.fname(int(f[i]))}"
            )
        nb = _nblocks(lengths, self.block_log2)
        has = np.flatnonzero(nb > 0)
        order = has[np.argsort(self.crc_start[has], kind="stable")]
        cs, n = self.crc_start[order], nb[order]
        bad = cs[1:] < cs[:-1] + n[:-1]
        if bad.any():
            i = _first_true(bad)
            self._fail(
                f"column 'crc_start': {self._row(int(order[i]))} (checksums [{int(cs[i])}, {int(cs[i] + n[i])})) and "
                f"{self._row(int(order[i + 1]))} (from {int(cs[i + 1])}) share checksums"
            )
        self._files_checked = True

    def _read_crcs(self, crc_lo: np.ndarray, counts: np.ndarray, read: Callable[[int, int], Any]) -> np.ndarray:
        where = f"{self.where} (crc blob)"

        def get(off: int, n: int) -> bytes:
            data = bytes(read(off, n))
            if len(data) != n:
                raise FormatError(f"{where}: {n} bytes at {off} requested, {len(data)} read (truncated blob?)")
            return data

        if self._crc_data_offset < 0:
            n = int.from_bytes(get(0, 8), "little")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{where}: header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES}")
            # the data section is as long as the table says; a shorter blob fails the reads below
            meta, ents = _parse_header(get(8, n), 8 + n, 4 * self.n_crcs, where, "crc")
            dt, shape, off = _crc_column(meta, ents, where)
            if dt != np.dtype("<u4") or shape != [self.n_crcs]:
                raise FormatError(f"{where}: crc column must be U32[{self.n_crcs}], got {dt}{shape}")
            self._crc_data_offset = off
        out = np.empty(int(counts.sum()), np.uint32)
        keep = np.flatnonzero(counts > 0)
        if not len(keep):
            return out
        dest = (np.cumsum(counts) - counts)[keep]
        order = np.argsort(crc_lo[keep], kind="stable")
        s, cnt, dest = crc_lo[keep][order], counts[keep][order], dest[order]
        e = s + cnt
        # one read per run of spans closer than CRC_GAP checksums; runs read CRC_BATCH at a time
        new = np.concatenate([[True], s[1:] > np.maximum.accumulate(e)[:-1] + CRC_GAP])
        first = np.flatnonzero(new)  # first span of each run
        rs, re = s[first], np.maximum.reduceat(e, first)
        run_of = np.cumsum(new) - 1
        csum = np.cumsum(re - rs)
        k0 = 0
        while k0 < len(rs):
            base0 = int(csum[k0 - 1]) if k0 else 0
            k1 = max(int(np.searchsorted(csum, base0 + CRC_BATCH, side="right")), k0 + 1)
            data = np.frombuffer(
                b"".join(get(self._crc_data_offset + 4 * a, 4 * (b - a)) for a, b in zip(rs[k0:k1].tolist(), re[k0:k1].tolist())),
                dtype="<u4",
            )
            sp = slice(int(first[k0]), int(first[k1]) if k1 < len(rs) else len(s))
            r = run_of[sp]
            src = s[sp] - rs[r] + (csum[r] - (re[r] - rs[r]) - base0)
            out[_runs(dest[sp], cnt[sp])] = data[_runs(src, cnt[sp])]
            self.crc_bytes_read += data.nbytes
            k0 = k1
        return out


def _pair_flags(o: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For consecutive boxes (k, k+1): (unsorted, banded).

    ``unsorted``: k+1's offsets are lexicographically smaller.  ``banded``: at the first dim j
    where the offsets differ, the sizes agree on every dim before j and k+1 starts at or after
    k's end on j.  If every consecutive pair of a sorted run is banded, the run's boxes are
    pairwise disjoint (induction over the bands of equal leading offsets).
    """
    m = len(o) - 1
    D = o.shape[1] if o.ndim == 2 else 0
    if m <= 0 or D == 0:
        z = np.zeros(max(m, 0), bool)
        return z, z
    d = o[1:] != o[:-1]
    j = np.argmax(d, axis=1)
    r = np.arange(m)
    anyd = d[r, j]
    oj0 = o[:-1][r, j].astype(np.int64)
    oj1 = o[1:][r, j].astype(np.int64)
    unsorted = anyd & (oj1 < oj0)
    sd = s[1:] != s[:-1]
    f = np.where(sd.any(axis=1), np.argmax(sd, axis=1), D)
    banded = anyd & (f >= j) & (oj1 >= oj0 + s[:-1][r, j])
    return unsorted, banded


def _first_overlap(o: np.ndarray, e: np.ndarray) -> tuple[int, int] | None:
    """Exact: the first pair of boxes ``[o, e)`` (any order) that share an element, or None.

    Sweep along dim 0: each non-empty box is tested against the boxes that start before its dim-0
    end, O(n log n + P * D) for P such pairs, in batches of :data:`PAIR_BATCH`.
    """
    o = np.asarray(o, dtype=np.int64)
    e = np.asarray(e, dtype=np.int64)
    rows = np.flatnonzero((e > o).all(axis=1))  # empty boxes overlap nothing
    if len(rows) < 2:
        return None
    if o.shape[1] == 0:
        return int(rows[0]), int(rows[1])
    rows = rows[np.argsort(o[rows, 0], kind="stable")]
    o, e = o[rows], e[rows]
    n = len(rows)
    hi = np.searchsorted(o[:, 0], e[:, 0], side="left")
    cnt = np.maximum(hi - np.arange(n) - 1, 0)
    incl = np.cumsum(cnt)
    P = int(incl[-1])
    for k0 in range(0, P, PAIR_BATCH):
        k = np.arange(k0, min(k0 + PAIR_BATCH, P), dtype=np.int64)
        i = np.searchsorted(incl, k, side="right")
        j = i + 1 + (k - (incl[i] - cnt[i]))
        hit = (np.maximum(o[i], o[j]) < np.minimum(e[i], e[j])).all(axis=1)
        if hit.any():
            q = _first_true(hit)
            a, b = int(rows[i[q]]), int(rows[j[q]])
            return min(a, b), max(a, b)
    return None


def _sort_order(tid: np.ndarray, offs: np.ndarray, ctx: _Context) -> np.ndarray:
    """Permutation sorting rows by (tensor id, offsets lexicographically); identity when sorted.

    One int64 key (argsort) when the mixed-radix key fits, else ``np.lexsort``.
    """
    C = len(tid)
    if C <= 1:
        return np.arange(C)
    D = offs.shape[1]
    # already sorted? (a per-rank or generated table usually is)
    dt = np.diff(tid)
    if (dt >= 0).all():
        if D == 0:
            return np.arange(C)
        d = offs[1:] != offs[:-1]
        j = np.argmax(d, axis=1)
        r = np.arange(C - 1)
        ok = (dt > 0) | ~d[r, j] | (offs[1:][r, j] > offs[:-1][r, j])
        if ok.all():
            return np.arange(C)
    radix = [int(ctx.n_tensors)] + [int(ctx.shapes[:, k].max(initial=1)) + 1 for k in range(D)]
    if math.prod(radix) < (1 << 62) and (offs.min(initial=0) >= 0):
        key = tid.copy()
        for k in range(D):
            key = key * radix[k + 1] + np.minimum(offs[:, k], radix[k + 1] - 1)
        return np.argsort(key, kind="stable")
    return np.lexsort(tuple(offs[:, k] for k in range(D - 1, -1, -1)) + (tid,))


def concat(
    tables: Sequence[ChunkTable], file_offsets: Sequence[int] | None = None, *, where: str | None = None, partial: bool = False
) -> ChunkTable:
    """One table from per-rank tables over the same tensors (the commit at scale).

    Table ``k``'s file ``f`` becomes global file ``file_offsets[k] + f`` (default: files numbered
    in table order).  Rows are merged into sorted order (one vectorized sort), checksums follow
    their chunks.  The result is not checked; the commit calls :meth:`ChunkTable.check` with
    ``files=True`` before writing it.
    """
    if not tables:
        raise LayoutError("concat needs at least one table")
    ctx0 = tables[0]._ctx
    where = where or ctx0.where
    for k, tb in enumerate(tables):
        if not tb._ctx.specs.same(ctx0.specs):
            raise LayoutError(f"{where}: table {k} ({tb.where}) describes different tensors than table 0")
        if tb.crcs is None and tb.n_crcs:
            raise LayoutError(f"{where}: table {k} ({tb.where}) was opened without its crc blob")
    if file_offsets is None:
        nf = [tb.n_files for tb in tables]
        fo = np.cumsum([0, *nf[:-1]]).astype(np.int64)
    else:
        fo = np.asarray(list(file_offsets), dtype=np.int64)
        if fo.shape != (len(tables),) or (fo < 0).any():
            raise LayoutError(f"{where}: need one non-negative file offset per table, got {list(file_offsets)[:8]}")
    F = int(max((int(o) + tb.n_files for o, tb in zip(fo, tables)), default=0))
    file_sizes = np.full(F, -1, np.int64)
    file_rank = np.full(F, -1, np.int64)
    file_names: list[str] | None = [""] * F if all(tb._ctx.file_names is not None for tb in tables) else None
    for k, (o, tb) in enumerate(zip(fo, tables)):
        sl = slice(int(o), int(o) + tb.n_files)
        if (file_sizes[sl] != -1).any():
            raise LayoutError(f"{where}: table {k}'s files {sl.start}..{sl.stop - 1} overlap another table's")
        file_sizes[sl] = tb._ctx.file_sizes
        file_rank[sl] = tb.file_rank
        if file_names is not None:
            file_names[sl] = tb._ctx.file_names  # type: ignore[assignment]
    if (file_sizes < 0).any():
        raise LayoutError(f"{where}: global file {_first_true(file_sizes < 0)} belongs to no table")
    tids, offs, szs, fil, sta, bl, css = [], [], [], [], [], [], []
    crcs = []
    seg_c, seg_p, seg_s, seg_l = [], [], [], []
    row0 = crc0 = seg0 = 0
    for o, tb in zip(fo, tables):
        C = tb.n_chunks
        tids.append(np.repeat(np.arange(tb.n_tensors), np.diff(tb.tensor_ptr)))
        offs.append(tb.offsets)
        szs.append(tb.sizes)
        fil.append(tb.file.astype(np.int64) + o)
        sta.append(tb.start)
        bl.append(tb.block_log2)
        css.append(tb.crc_start + crc0)
        crcs.append(tb.crcs if tb.crcs is not None else np.zeros(0, np.uint32))
        seg_c.append(tb.seg_chunk + row0)
        seg_p.append(tb.seg_ptr[:-1] + seg0)
        seg_s.append(tb.seg_start)
        seg_l.append(tb.seg_len)
        row0 += C
        crc0 += tb.n_crcs
        seg0 += len(tb.seg_start)
    segs = Segments(np.concatenate(seg_c), np.concatenate([*seg_p, [seg0]]).astype(np.int64), np.concatenate(seg_s), np.concatenate(seg_l))
    return ChunkTable.from_arrays(
        tensor_ids=np.concatenate(tids),
        offsets=np.concatenate(offs),
        sizes=np.concatenate(szs),
        file=np.concatenate(fil),
        start=np.concatenate(sta),
        block_log2=np.concatenate(bl),
        crc_start=np.concatenate(css),
        crcs=np.concatenate(crcs),
        file_rank=file_rank,
        segments=segs,
        tensor_shapes=ctx0.specs,
        file_sizes=file_sizes.tolist(),
        file_names=file_names,
        where=where,
        check=False,
        partial=partial,
    )


class TableMerger:
    """One table from many partial ones, added one at a time (the commit at scale, streaming).

    Unlike :func:`concat`, each added table may describe its own tensors (a rank's report lists
    only what it wrote): ``tensor_ids[t]`` is the id in ``specs`` of the added table's tensor
    ``t``, whose shape and item size must be the same there.  :meth:`add` copies the table's
    columns (remapped: tensor ids, file ids shifted past the files added before, checksum indices
    past the checksums added before), so the caller may drop the table's buffers at once;
    :meth:`finish` sorts them into one table.  Memory: the merged columns, about the size of the
    final table.  Nothing is checked across tables here; the caller checks the result.
    """

    def __init__(self, specs: TensorSpecs, *, where: str):
        self.specs = specs
        self.where = where
        self._cols: dict[str, list[np.ndarray]] = {k: [] for k in ("tid", "offsets", "sizes", "file", "start", "bl", "cs", "crcs")}
        self._segs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_chunks = 0
        self.n_files = 0
        self.n_crcs = 0
        self._n_segs = 0

    def add(self, table: ChunkTable, tensor_ids: Any) -> int:
        """Add ``table``'s chunks; return the global id of its first file (its files follow in order)."""
        ids = np.asarray(tensor_ids, dtype=np.int64).reshape(-1)
        tw = table.where
        if len(ids) != table.n_tensors:
            raise LayoutError(f"{tw}: {len(ids)} tensor ids for the {table.n_tensors} tensors of the table")
        T, D = len(self.specs), int(self.specs.shapes.shape[1])
        if len(ids) and (ids.min() < 0 or ids.max() >= T):
            raise LayoutError(f"{tw}: tensor id outside 0..{T - 1}")
        loc = table.specs
        d = int(loc.shapes.shape[1])
        if d > D:
            raise LayoutError(f"{tw}: a tensor has {d} dims; the merged tensors have at most {D}")
        g_shapes = self.specs.shapes[ids][:, :d] if len(ids) else np.zeros((0, d), np.int64)
        same = (self.specs.ndims[ids] == loc.ndims) & (self.specs.itemsizes[ids] == loc.itemsizes)
        same &= (g_shapes == loc.shapes).all(axis=1) if d else True
        if D > d and len(ids):
            same &= (self.specs.shapes[ids][:, d:] == 1).all(axis=1)
        if not np.all(same):
            t = _first_true(~np.asarray(same, dtype=bool).reshape(-1))
            raise LayoutError(
                f"{tw}: tensor {loc.names[t] if loc.names else t!r} is {loc.shape(t)} x {int(loc.itemsizes[t])} bytes here "
                f"but {self.specs.shape(int(ids[t]))} x {int(self.specs.itemsizes[ids[t]])} bytes in the merged table"
            )
        C = table.n_chunks
        crcs = table.crcs
        if crcs is None and table.n_crcs:
            raise LayoutError(f"{tw}: table opened without its crc blob")
        c = self._cols
        c["tid"].append(np.repeat(ids, np.diff(table.tensor_ptr)))
        for name, fill in (("offsets", 0), ("sizes", 1)):
            col = np.asarray(getattr(table, name), dtype=np.int64)
            if D > d:
                col = np.concatenate([col, np.full((C, D - d), fill, np.int64)], axis=1)
            c[name].append(col)
        first_file = self.n_files
        c["file"].append(table.file.astype(np.int64) + first_file)
        c["start"].append(np.array(table.start, dtype=np.int64))
        c["bl"].append(np.array(table.block_log2, dtype=np.int64))
        c["cs"].append(table.crc_start.astype(np.int64) + self.n_crcs)
        c["crcs"].append(np.array(crcs if crcs is not None else np.zeros(0, np.uint32), dtype=np.uint32))
        if len(table.seg_chunk):
            self._segs.append((table.seg_chunk + self.n_chunks, table.seg_ptr[:-1] + self._n_segs,
                               np.array(table.seg_start), np.array(table.seg_len)))
            self._n_segs += len(table.seg_start)
        self.n_chunks += C
        self.n_files += table.n_files
        self.n_crcs += table.n_crcs
        return first_file

    def finish(
        self, *, file_sizes: Sequence[int], file_rank: Any = None, file_names: Sequence[str] | None = None, partial: bool = False
    ) -> ChunkTable:
        """The merged table, sorted; not checked (call :meth:`ChunkTable.check`)."""
        if len(file_sizes) != self.n_files:
            raise LayoutError(f"{self.where}: {len(file_sizes)} file sizes for the {self.n_files} files added")
        D = int(self.specs.shapes.shape[1])
        c = self._cols

        def cat(k: str, shape: tuple[int, ...], dt: Any) -> np.ndarray:
            return np.concatenate(c[k]) if c[k] else np.zeros(shape, dt)

        if self._segs:
            sc, sp, ss, sl = (np.concatenate(x) for x in zip(*self._segs))
            segs = Segments(sc, np.concatenate([sp, [self._n_segs]]).astype(np.int64), ss, sl)
        else:
            segs = None
        table = ChunkTable.from_arrays(
            tensor_ids=cat("tid", (0,), np.int64),
            offsets=cat("offsets", (0, D), np.int64),
            sizes=cat("sizes", (0, D), np.int64),
            file=cat("file", (0,), np.int64),
            start=cat("start", (0,), np.int64),
            block_log2=cat("bl", (0,), np.int64),
            crc_start=cat("cs", (0,), np.int64),
            crcs=cat("crcs", (0,), np.uint32),
            file_rank=file_rank,
            segments=segs,
            tensor_shapes=self.specs,
            file_sizes=file_sizes,
            file_names=file_names,
            where=self.where,
            check=False,
            partial=partial,
        )
        for v in c.values():
            v.clear()
        self._segs.clear()
        return table
