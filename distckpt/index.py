"""The distckpt index, never pickled: version 1 (one JSON document) and version 2 (a small JSON
root beside a columnar chunk table).

A checkpoint is a directory of data files (valid safetensors) plus ``distckpt.index.json``,
written last; its presence is the commit.  The README ("On-disk format") gives both schemas.

Version 1 lists every chunk as a JSON object; :meth:`Index.from_json` validates all of them and
builds one :class:`Chunk` each.  Version 2's root lists the tensors (names, dtypes, shapes), the
data files (names, sizes, writer ranks) and names two blobs written before it: the chunk table
``chunks-{save_id}.safetensors`` (a :class:`~distckpt.chunktable.ChunkTable`: tensor id =
position in the root's tensor list, file id = position in its file list) and the checksum column
``crc32c-{save_id}.bin``.  Who calls what:

1. :func:`distckpt.sources.distckpt.read_index` -> :meth:`Index.loads` with ``store=``: the root
   is parsed and validated, O(tensors + files); the table is mapped (local disks) or read (other
   stores) and opened, O(tensors + files), no work per chunk; the checksum column is mapped, or
   read by range where it lies;
2. the read path asks :meth:`TensorInfo.overlapping`.  A version-2 tensor's ``chunks`` is a
   :class:`TableChunks`: a box is looked up in the table (binary search, hits validated) and
   :class:`Chunk` objects are built for the hits only, each with a :class:`CrcSpan` that fetches
   just the checksum blocks a read touches.  :meth:`Index.prefetch` looks up a whole plan's boxes
   in one vectorized pass first;
3. ``verify`` calls :meth:`Index.check`: every rule on every chunk, and the blobs' crc32c;
4. the commit (:mod:`distckpt.commit`) builds an Index around a merged table (or from chunk
   records) and writes :meth:`Index.root_json` (version 2) or :meth:`Index.to_json` (version 1).

Everything read from storage is validated before it is used: names, offsets, sizes, byte
counts, checksums; every error names the file it is about.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import crc32c as _crc
import numpy as np

from . import dtypes, jsonutil, naming
from .chunktable import ChunkRecord, ChunkTable, TensorSpecs
from .errors import FormatError, LayoutError
from .layout import Box, check_tiling
from .naming import INDEX_NAME
from .plan import ChunkLookup
from .storage import safe_name

if TYPE_CHECKING:
    from .storage import Store

__all__ = [
    "INDEX_NAME",
    "FORMAT",
    "VERSION",
    "VERSIONS",
    "MAX_INDEX_BYTES",
    "MAX_TABLE_BYTES",
    "Chunk",
    "CrcSpan",
    "TableChunks",
    "TensorInfo",
    "Blob",
    "Index",
    "encode_value",
    "decode_value",
]

FORMAT = "distckpt"
#: The newest index version: what a commit writes unless told otherwise.
VERSION = 2
#: The versions this distckpt reads.
VERSIONS = (1, 2)
MAX_INDEX_BYTES = 1 << 30
#: Largest chunk table read into memory from a store that is not a local disk (local tables are mapped).
MAX_TABLE_BYTES = 1 << 34
#: A checksum column up to this size on such a store is read whole with the table (one round trip);
#: a larger one stays there and is read by range, the blocks a read verifies only.
MAX_INLINE_CRC_BYTES = 64 << 20
#: Rows validated and turned into :class:`Chunk` objects per step when a tensor's chunks are iterated.
_ROWS_PER_STEP = 4096
_MAX_DIMS = 32  # numpy arrays have at most 32 dims (layout.MAX_NDIM)
_MAX_INT = 1 << 62


@dataclass(frozen=True)
class Chunk:
    """A box of a tensor stored as C-order bytes in one file.

    ``segments`` are (absolute byte offset, length) pieces whose concatenation
    is the chunk's bytes; distckpt files always have one segment, MindSpore
    ``.ckpt`` tensors split over several values have more.  ``crcs`` are
    crc32c values of consecutive ``block_size`` blocks of the chunk bytes (a tuple, or a
    :class:`CrcSpan` that reads them from a version-2 checksum column on demand).
    """

    box: Box
    file: str
    segments: tuple[tuple[int, int], ...]
    crcs: Sequence[int] | None = None
    block_size: int = 0
    rank: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.segments)

    def to_json(self) -> dict:
        if len(self.segments) != 1:
            raise FormatError(f"chunk in {self.file} has {len(self.segments)} segments; distckpt chunks have one")
        start, length = self.segments[0]
        out: dict[str, Any] = {
            "offsets": list(self.box.offsets),
            "sizes": list(self.box.sizes),
            "file": self.file,
            "start": start,
            "length": length,
        }
        if self.crcs is not None:
            out["block_size"] = self.block_size
            out["crc32c"] = list(self.crcs)
        if self.rank is not None:
            out["rank"] = self.rank
        return out


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: dtype, global shape, and the chunks that tile it.

    Readers ask :meth:`overlapping` for the chunks a box touches.  With a tuple of chunks
    (version 1, and the virtual indexes of other sources) it binary-searches a lookup built once
    per tensor; with :class:`TableChunks` (version 2) the chunk table answers and only the hits
    become Python objects.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Sequence[Chunk] = field(default=())

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    def overlapping(self, box: Box) -> list[tuple[int, Chunk, Box]]:
        """``(chunk number, chunk, intersection)`` for every chunk that overlaps ``box``."""
        if isinstance(self.chunks, TableChunks):
            return self.chunks.overlapping(box)
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = ChunkLookup([c.box for c in self.chunks])
            object.__setattr__(self, "_lookup", lookup)
        return [(i, self.chunks[i], inter) for i, inter in lookup.overlapping(box)]

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)


# ------------------------------------------------------------------ version 2: the table seen as chunks
class CrcSpan(Sequence[int]):
    """The crc32c values of one chunk's blocks in a version-2 checksum column, read on demand.

    :meth:`span` returns blocks ``[b0, b1)`` (uint32) in one read; indexing and iteration work
    too (for small uses: each index is one read).
    """

    __slots__ = ("_src", "_start", "_n")

    def __init__(self, src: _TableSource, start: int, n: int):
        self._src, self._start, self._n = src, start, n

    def __len__(self) -> int:
        return self._n

    def span(self, b0: int, b1: int) -> np.ndarray:
        b0, b1 = max(int(b0), 0), min(int(b1), self._n)
        if b1 <= b0:
            return np.zeros(0, np.uint32)
        return self._src.crc_range(self._start + b0, self._start + b1)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[int, ...]: ...

    def __getitem__(self, i: int | slice) -> int | tuple[int, ...]:
        if isinstance(i, slice):
            r = range(self._n)[i]
            if r.step == 1:
                return tuple(int(x) for x in self.span(r.start, r.stop))
            return tuple(int(x) for x in self.span(0, self._n)[i])
        if not -self._n <= i < self._n:
            raise IndexError(f"checksum block {i} of a chunk with {self._n} blocks")
        j = i % self._n
        return int(self.span(j, j + 1)[0])

    def __iter__(self) -> Iterator[int]:
        return iter(self.span(0, self._n).tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CrcSpan):
            return (other._src is self._src and other._start == self._start and other._n == self._n) or tuple(self) == tuple(other)
        if isinstance(other, Sequence):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self._src), self._start, self._n))

    def __repr__(self) -> str:
        return f"CrcSpan({self._n} blocks from checksum {self._start})"


class _TableSource:
    """An opened version-2 chunk table as the read path sees it: file names, writer ranks,
    checksums (mapped, or read through ``read_crcs``), and the hits :meth:`Index.prefetch` found."""

    def __init__(self, table: ChunkTable, file_names: tuple[str, ...], read_crcs: Callable[[int, int], Any] | None,
                 keep: tuple[Any, ...] = (), store: Store | None = None):
        self.table = table
        self.file_names = file_names
        self.ranks = table.file_rank.tolist()
        self.read_crcs = read_crcs
        self.keep = keep  # the mapped blobs: alive as long as the table
        self.store = store
        self.sizes: dict[str, int] = {}  # file name -> its real size, asked once
        self.cache: dict[tuple, list[tuple[int, Chunk, Box]]] = {}

    def check_sizes(self, tensor: str, hits: Sequence[tuple[int, Chunk, Box]]) -> None:
        """The chunks a read of ``tensor`` touches must lie inside their files' *real* bytes, before the
        read allocates its result: an index may claim a 1 TiB tensor in a 100-byte file.  One size
        query per file reads touch, never one per file of the checkpoint, nor a scan of every chunk."""
        store = self.store
        if store is None:
            return
        need: dict[str, int] = {}
        for _i, c, _b in hits:
            e = max(s + n for s, n in c.segments)
            if e > need.get(c.file, -1):
                need[c.file] = e
        for name, e in need.items():
            if name not in self.sizes:
                try:
                    self.sizes[name] = store.size(name)
                except FileNotFoundError:
                    from .errors import NotFoundError

                    raise NotFoundError(
                        f"{store.child_url(name)}: data file of tensor {tensor!r} is missing (named by the index)"
                    ) from None
            if e > self.sizes[name]:
                raise FormatError(
                    f"{store.child_url(name)}: tensor {tensor!r} needs bytes up to {e}, but the file has "
                    f"{self.sizes[name]} bytes: it is truncated, or the index claims more than it holds"
                )

    def crc_range(self, lo: int, hi: int) -> np.ndarray:
        return self.table.crc_range(lo, hi, read=self.read_crcs)

    def _chunk(self, nd: int, cid: int, offs: list, sizes: list, f: int, start: int, length: int, bl: int, cs: int) -> Chunk:
        segs = ((start, length),) if start >= 0 else tuple(self.table.segments(cid))
        if bl:
            bs = 1 << bl
            crcs: CrcSpan | None = CrcSpan(self, cs, -(-length // bs) if length else 0)
        else:
            bs, crcs = 0, None
        rank = self.ranks[f]
        return Chunk(Box(tuple(offs[:nd]), tuple(sizes[:nd])), self.file_names[f], segs, crcs, bs, rank if rank >= 0 else None)

    def rows(self, t: int, ids: np.ndarray) -> list[Chunk]:
        """Chunks ``ids`` (of tensor ``t``), validated by the single-chunk rules."""
        tb = self.table
        length = tb.lengths(ids).tolist()
        nd = len(tb.specs.shape(t))
        offs, sizes = tb.offsets[ids].tolist(), tb.sizes[ids].tolist()
        f, st = tb.file[ids].tolist(), tb.start[ids].tolist()
        bl, cs = tb.block_log2[ids].tolist(), tb.crc_start[ids].tolist()
        return [self._chunk(nd, int(ids[k]), offs[k], sizes[k], f[k], st[k], length[k], bl[k], cs[k]) for k in range(len(ids))]

    def lookup(self, tids: Sequence[int], boxes: Sequence[Box]) -> list[list[tuple[int, Chunk, Box]]]:
        """``TensorInfo.overlapping`` of many (tensor id, box) pairs, in one vectorized pass."""
        tb = self.table
        D = tb.ndim
        R = len(tids)
        bo = np.zeros((R, D), np.int64)
        bs = np.ones((R, D), np.int64)
        for r, b in enumerate(boxes):
            bo[r, : b.ndim] = b.offsets
            bs[r, : b.ndim] = b.sizes
        h = tb.overlapping_many(np.asarray(tids, np.int64), bo, bs, cover=True)
        ptr = h.ptr.tolist()
        ids = h.chunk_ids.tolist()
        io, isz = h.inter_offsets.tolist(), h.inter_sizes.tolist()
        co, cz = h.chunk_offsets.tolist(), h.chunk_sizes.tolist()
        f, st, ln = h.file.tolist(), h.start.tolist(), h.length.tolist()
        bl, cs = h.block_log2.tolist(), h.crc_start.tolist()
        first = tb.tensor_ptr[np.asarray(tids, np.int64)].tolist() if R else []
        out = []
        for r in range(R):
            nd = boxes[r].ndim
            hits = []
            for k in range(ptr[r], ptr[r + 1]):
                c = self._chunk(nd, ids[k], co[k], cz[k], f[k], st[k], ln[k], bl[k], cs[k])
                hits.append((ids[k] - first[r], c, Box(tuple(io[k][:nd]), tuple(isz[k][:nd]))))
            out.append(hits)
        return out


class TableChunks(Sequence[Chunk]):
    """The chunks of one tensor of a version-2 index, as :class:`Chunk` objects built on demand.

    ``len`` is free; indexing and iteration validate the rows they build (iteration a few
    thousand at a time); :meth:`overlapping` looks a box up in the table.
    """

    __slots__ = ("_src", "_t", "_lo", "_hi", "_where", "_name")

    def __init__(self, src: _TableSource | None, t: int, where: str, name: str = ""):
        self._src, self._t, self._where, self._name = src, t, where, name
        self._lo, self._hi = src.table.chunk_range(t) if src is not None else (0, 0)

    def _source(self) -> _TableSource:
        if self._src is None:
            raise FormatError(f"{self._where}: the chunk table was not opened (read the index with its store)")
        return self._src

    def __len__(self) -> int:
        self._source()
        return self._hi - self._lo

    @overload
    def __getitem__(self, i: int) -> Chunk: ...

    @overload
    def __getitem__(self, i: slice) -> list[Chunk]: ...

    def __getitem__(self, i: int | slice) -> Chunk | list[Chunk]:
        src = self._source()
        n = self._hi - self._lo
        if isinstance(i, slice):
            return src.rows(self._t, np.arange(self._lo, self._hi)[i])
        if not -n <= i < n:
            raise IndexError(f"chunk {i} of a tensor with {n} chunks")
        return src.rows(self._t, np.array([self._lo + i % n]))[0]

    def __iter__(self) -> Iterator[Chunk]:
        src = self._source()
        for a in range(self._lo, self._hi, _ROWS_PER_STEP):
            yield from src.rows(self._t, np.arange(a, min(a + _ROWS_PER_STEP, self._hi)))

    def overlapping(self, box: Box) -> list[tuple[int, Chunk, Box]]:
        """The chunks a read of ``box`` touches (prefetched or looked up), their files' real sizes checked."""
        src = self._source()
        got = src.cache.pop((self._t, box.offsets, box.sizes), None)
        if got is None:
            got = src.lookup([self._t], [box])[0]
        src.check_sizes(self._name, got)
        return got

    def __repr__(self) -> str:
        return f"TableChunks(tensor {self._t}, {self._hi - self._lo} chunks)"


def encode_value(name: str, v: Any) -> dict:
    if isinstance(v, bool):
        return {"type": "bool", "value": v}
    if isinstance(v, int):
        return {"type": "int", "value": v}
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return {"type": "float", "value": repr(v)}
        return {"type": "float", "value": v}
    if isinstance(v, str):
        return {"type": "str", "value": v}
    raise FormatError(f"value {name!r} has unsupported type {type(v).__name__}; use int, float, bool, str or an array")


def decode_value(name: str, d: Any) -> Any:
    if not isinstance(d, dict) or "type" not in d or "value" not in d:
        raise FormatError(f"value {name!r}: expected {{'type', 'value'}}, got {str(d)[:80]}")
    t, v = d["type"], d["value"]
    if t == "bool" and isinstance(v, bool):
        return v
    if t == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t == "float" and isinstance(v, (int, float, str)) and not isinstance(v, bool):
        try:
            return float(v)
        except ValueError:
            pass
    if t == "str" and isinstance(v, str):
        return v
    raise FormatError(f"value {name!r}: bad {t!r} value {str(v)[:80]}")


def _int_list(x: Any, what: str, *, lo: int = 0) -> tuple[int, ...]:
    if not isinstance(x, list) or len(x) > _MAX_DIMS:
        raise FormatError(f"{what} must be a list of at most {_MAX_DIMS} integers, got {str(x)[:80]}")
    for v in x:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > _MAX_INT:
            raise FormatError(f"{what} holds {v!r}: must be an integer in [{lo}, 2**62]")
    return tuple(x)


def _int(x: Any, what: str, *, lo: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo or x > _MAX_INT:
        raise FormatError(f"{what} is {x!r}: must be an integer in [{lo}, 2**62]")
    return x


def _check_disjoint(tensors: dict[str, TensorInfo], where: str) -> None:
    """No two chunks may share a byte of a file: distckpt never writes that, and an
    index that does would read one tensor's bytes as another's."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for name, t in tensors.items():
        for c in t.chunks:
            for start, length in c.segments:
                if length:
                    spans.setdefault(c.file, []).append((start, start + length, name))
    for fname, ss in spans.items():
        ss.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(ss, ss[1:]):
            if s1 < e0:
                raise FormatError(
                    f"{where}: chunks of tensor {n0!r} (bytes [{s0}, {e0})) and tensor {n1!r} (bytes [{s1}, {e1})) "
                    f"overlap in {fname}; the index is corrupt"
                )


@dataclass(frozen=True)
class Blob:
    """A file of a version-2 index beside the root (the chunk table, the checksum column)."""

    name: str
    size: int
    crc32c: int

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "crc32c": self.crc32c}


@dataclass
class Index:
    """The committed description of a checkpoint (see the module docstring).

    ``files`` are the data files (name -> size); a version-2 index also has ``file_ranks``
    (name -> writer rank, -1 unknown), ``table_blob`` and ``crc_blob`` (its table and checksum
    column) and, once opened, ``table``.  An Index built in memory from chunk records (version 1,
    other sources) has ``table`` None and tuples of :class:`Chunk`.
    """

    tensors: dict[str, TensorInfo]
    values: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    save_id: str = ""
    block_size: int = 1 << 20
    checksum: str = "crc32c"
    strategy: dict | None = None
    metadata: dict = field(default_factory=dict)
    world_size: int = 1
    version: int = 1
    file_ranks: dict[str, int] = field(default_factory=dict)
    table_blob: Blob | None = None
    crc_blob: Blob | None = None
    table: ChunkTable | None = field(default=None, repr=False, compare=False)
    _source: _TableSource | None = field(default=None, repr=False, compare=False)
    _store: Any = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- files
    def blob_names(self) -> list[str]:
        """The version-2 blobs this index names (chunk table, checksum column)."""
        return [b.name for b in (self.table_blob, self.crc_blob) if b is not None]

    def all_files(self) -> list[str]:
        """Every file the index names besides itself: data files, then its blobs."""
        return sorted(self.files) + self.blob_names()

    # ---------------------------------------------------------------- tables
    @classmethod
    def of_table(
        cls, table: ChunkTable, *, dtype_names: Sequence[str], file_names: Sequence[str], values: dict | None = None,
        save_id: str = "", block_size: int = 1 << 20, checksum: str = "crc32c", strategy: dict | None = None,
        metadata: dict | None = None, world_size: int = 1,
    ) -> Index:
        """An index around a whole (checked) table: tensor names from ``table.specs``, files in file-id order."""
        names = table.specs.names
        if names is None or len(names) != table.n_tensors or len(dtype_names) != table.n_tensors:
            raise LayoutError("Index.of_table needs a table whose specs name every tensor, and one dtype per tensor")
        fnames = tuple(file_names)
        src = _TableSource(table, fnames, None)
        tensors = {
            n: TensorInfo(n, dt, table.specs.shape(t), TableChunks(src, t, n, n)) for t, (n, dt) in enumerate(zip(names, dtype_names))
        }
        sizes = table.file_sizes.tolist()
        ranks = table.file_rank.tolist()
        return cls(
            tensors=tensors, values=dict(values or {}), files=dict(zip(fnames, sizes)), save_id=save_id,
            block_size=block_size, checksum=checksum, strategy=strategy, metadata=dict(metadata or {}),
            world_size=world_size, version=VERSION, file_ranks=dict(zip(fnames, ranks)), table=table, _source=src,
        )

    def chunk_table(self) -> ChunkTable:
        """The chunk table of this index: its own (version 2), else built from its chunk records (checked)."""
        if self.table is not None:
            return self.table
        names = list(self.tensors)
        fnames = list(self.files)
        fid = {f: i for i, f in enumerate(fnames)}
        ranks = [-1] * len(fnames)
        records = []
        for t, name in enumerate(names):
            for c in self.tensors[name].chunks:
                if c.file not in fid:
                    raise FormatError(f"tensor {name!r}: a chunk names file {c.file!r}, which the index does not list")
                if c.rank is not None:
                    ranks[fid[c.file]] = c.rank
                crcs = tuple(c.crcs) if c.crcs is not None else None
                records.append(ChunkRecord(t, c.box.offsets, c.box.sizes, fid[c.file], c.segments, crcs, c.block_size if crcs is not None else 0))
        try:
            return ChunkTable.from_records(
                records, tensor_shapes=[self.tensors[n].shape for n in names],
                tensor_itemsizes=[self.tensors[n].itemsize for n in names], tensor_names=names,
                file_sizes=[self.files[f] for f in fnames], file_rank=np.asarray(ranks, np.int64), file_names=fnames,
                where="chunk table",
            )
        except LayoutError as exc:
            raise FormatError(str(exc)) from None

    def check(self) -> None:
        """Every rule on every chunk: version 2 checks its whole table (files and checksum column
        included) and the blobs' crc32c; version 1 was checked when parsed."""
        src = self._source
        if src is None:
            return
        src.table.check(files=True)
        store = self._store
        if store is None:
            return
        for blob, buf in zip((self.table_blob, self.crc_blob), src.keep):
            if blob is None:
                continue
            got = _crc.crc32c(buf) if buf is not None else _stream_crc(store, blob.name)
            if got != blob.crc32c:
                raise FormatError(
                    f"{store.child_url(blob.name)}: crc32c {got:#010x}, the index says {blob.crc32c:#010x}: the file is "
                    "corrupt; restore it or re-save the checkpoint"
                )

    def prefetch(self, items: Iterable[tuple[str, Box]]) -> None:
        """Look up the chunks of many (tensor name, box) reads at once (a load's plan), so that each
        later :meth:`TensorInfo.overlapping` of one of them is a dict lookup.  Version 1: nothing."""
        src = self._source
        if src is None:
            return
        tids, boxes = [], []
        for name, box in items:
            info = self.tensors.get(name)
            if info is not None and isinstance(info.chunks, TableChunks) and info.chunks._src is src:
                tids.append(info.chunks._t)
                boxes.append(box)
        for t, b, hits in zip(tids, boxes, src.lookup(tids, boxes) if tids else []):
            src.cache[(t, b.offsets, b.sizes)] = hits

    # ---------------------------------------------------------------- json
    def to_json(self) -> dict:
        """The version-1 document (every chunk a JSON object)."""
        return {
            "format": FORMAT,
            "version": 1,
            "save_id": self.save_id,
            "world_size": self.world_size,
            "checksum": {"algorithm": self.checksum, "block_size": self.block_size},
            "files": {k: {"size": v} for k, v in sorted(self.files.items())},
            "tensors": {
                name: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "chunks": [c.to_json() for c in t.chunks],
                }
                for name, t in self.tensors.items()
            },
            "values": {k: encode_value(k, v) for k, v in self.values.items()},
            "strategy": self.strategy,
            "metadata": self.metadata,
        }

    def dumps(self) -> bytes:
        """The version-1 document as bytes."""
        return jsonutil.dumps(self.to_json(), separators=(",", ":")).encode()

    def root_json(self, table: ChunkTable, table_blob: Blob, crc_blob: Blob) -> dict:
        """The version-2 root for ``table`` (whose tensor and file ids are this index's
        tensors and files in order) written as ``table_blob`` and ``crc_blob``."""
        specs = table.specs
        names = list(specs.names or ())
        if names != list(self.tensors):
            raise LayoutError("the chunk table's tensors are not this index's tensors in order")
        fnames = list(self.files)
        return {
            "format": FORMAT,
            "version": 2,
            "save_id": self.save_id,
            "world_size": self.world_size,
            "checksum": {"algorithm": self.checksum, "block_size": self.block_size},
            "files": {
                "names": fnames,
                "sizes": [self.files[f] for f in fnames],
                "ranks": table.file_rank.tolist(),
            },
            "tensors": {
                "names": names,
                "dtypes": [self.tensors[n].dtype for n in names],
                "shapes": [list(self.tensors[n].shape) for n in names],
            },
            "chunks": {
                "count": table.n_chunks,
                "table": table_blob.to_json(),
                "crcs": {**crc_blob.to_json(), "count": table.n_crcs},
            },
            "values": {k: encode_value(k, v) for k, v in self.values.items()},
            "strategy": self.strategy,
            "metadata": self.metadata,
        }

    @classmethod
    def loads(cls, data: bytes, *, where: str = INDEX_NAME, store: Store | None = None) -> Index:
        """Parse an index (either version).  A version-2 root read without ``store`` knows its
        tensors, files and values, but not its chunks (enough for ``gc`` and metrics)."""
        return cls.from_json(jsonutil.loads(data, where=f"{where}: index"), where=where, store=store)

    @classmethod
    def from_json(cls, doc: Any, *, where: str = INDEX_NAME, store: Store | None = None) -> Index:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{where}: not a distckpt index (missing \"format\": \"{FORMAT}\")")
        version = doc.get("version")
        if isinstance(version, bool) or version not in VERSIONS:
            raise FormatError(f"{where}: index version {version!r} is not supported (this distckpt reads {', '.join(map(str, VERSIONS))})")
        common = _common(doc, where)
        if version == 2:
            return _from_root(doc, where, store, common)
        return _from_v1(doc, where, common)


def _common(doc: dict, where: str) -> dict[str, Any]:
    """The fields both versions share, validated."""
    ck = doc.get("checksum") or {}
    if not isinstance(ck, dict):
        raise FormatError(f"{where}: 'checksum' must be an object")
    algorithm = ck.get("algorithm", "crc32c")
    if algorithm not in ("crc32c", "none"):
        raise FormatError(f"{where}: unknown checksum algorithm {algorithm!r}")
    block_size = _int(ck.get("block_size", 1 << 20), f"{where}: checksum.block_size", lo=1)
    values_doc = doc.get("values", {})
    if not isinstance(values_doc, dict):
        raise FormatError(f"{where}: 'values' must be an object")
    values = {k: decode_value(k, v) for k, v in values_doc.items()}
    strategy = doc.get("strategy")
    if strategy is not None and not isinstance(strategy, dict):
        raise FormatError(f"{where}: 'strategy' must be an object or null")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{where}: 'metadata' must be an object")
    save_id = doc.get("save_id", "")
    if not isinstance(save_id, str):
        raise FormatError(f"{where}: 'save_id' must be a string")
    return {
        "values": values, "save_id": save_id, "block_size": block_size, "checksum": algorithm, "strategy": strategy,
        "metadata": metadata, "world_size": _int(doc.get("world_size", 1), f"{where}: world_size", lo=1),
    }


def _from_v1(doc: dict, where: str, common: dict[str, Any]) -> Index:
    block_size = common["block_size"]
    files_doc = doc.get("files", {})
    if not isinstance(files_doc, dict):
        raise FormatError(f"{where}: 'files' must be an object")
    files: dict[str, int] = {}
    for fname, meta in files_doc.items():
        safe_name(fname, what=f"data file name in {where}")
        if not isinstance(meta, dict):
            raise FormatError(f"{where}: files[{fname!r}] must be an object")
        files[fname] = _int(meta.get("size"), f"{where}: files[{fname!r}].size")
    tensors_doc = doc.get("tensors", {})
    if not isinstance(tensors_doc, dict):
        raise FormatError(f"{where}: 'tensors' must be an object")
    tensors: dict[str, TensorInfo] = {}
    for name, t in tensors_doc.items():
        tw = f"{where}: tensor {name!r}"
        if not isinstance(t, dict):
            raise FormatError(f"{tw}: must be an object")
        dtype = t.get("dtype")
        if not isinstance(dtype, str) or dtype not in dtypes.DTYPES:
            raise FormatError(f"{tw}: unknown dtype {dtype!r}")
        shape = _int_list(t.get("shape"), f"{tw}: shape")
        item = dtypes.itemsize(dtype)
        chunks_doc = t.get("chunks")
        if not isinstance(chunks_doc, list):
            raise FormatError(f"{tw}: 'chunks' must be a list")
        chunks = []
        for i, c in enumerate(chunks_doc):
            cw = f"{tw} chunk {i}"
            if not isinstance(c, dict):
                raise FormatError(f"{cw}: must be an object")
            offsets = _int_list(c.get("offsets"), f"{cw}: offsets")
            sizes = _int_list(c.get("sizes"), f"{cw}: sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise FormatError(f"{cw}: offsets/sizes rank differs from shape {list(shape)}")
            for d, (o, s, n) in enumerate(zip(offsets, sizes, shape)):
                if o + s > n:
                    raise FormatError(f"{cw}: dim {d} offset {o} + size {s} exceeds shape {n}")
            fname = c.get("file")
            if fname not in files:
                safe_name(fname if isinstance(fname, str) else "", what=f"file name in {cw}")
                raise FormatError(f"{cw}: file {fname!r} is not listed in 'files'")
            start = _int(c.get("start"), f"{cw}: start")
            length = _int(c.get("length"), f"{cw}: length")
            if length != math.prod(sizes) * item:
                raise FormatError(
                    f"{cw}: length {length} bytes disagrees with sizes {list(sizes)} x {item}-byte {dtype}"
                )
            if start + length > files[fname]:
                raise FormatError(f"{cw}: bytes [{start}, {start + length}) lie past the end of {fname} ({files[fname]} bytes)")
            crcs = None
            chunk_bs = _int(c.get("block_size", block_size), f"{cw}: block_size", lo=1)
            if "crc32c" in c:
                crc_list = c["crc32c"]
                if not isinstance(crc_list, list):
                    raise FormatError(f"{cw}: crc32c must be a list")
                want = -(-length // chunk_bs) if length else 0
                if len(crc_list) != want:
                    raise FormatError(f"{cw}: {len(crc_list)} checksums for {want} blocks")
                crcs = tuple(_int(x, f"{cw}: crc32c") for x in crc_list)
            rank = c.get("rank")
            chunks.append(
                Chunk(
                    Box(offsets, sizes),
                    fname,
                    ((start, length),),
                    crcs,
                    chunk_bs,
                    rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
                )
            )
        try:
            check_tiling(shape, [c.box for c in chunks], name=name)
        except LayoutError as exc:
            raise FormatError(f"{where}: {exc}") from None
        tensors[name] = TensorInfo(name, dtype, shape, tuple(chunks))
    _check_disjoint(tensors, where)
    return Index(tensors=tensors, files=files, version=1, **common)


# ------------------------------------------------------------------ version 2: the root
def _list(doc: Any, key: str, n: int | None, where: str) -> list:
    v = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(v, list):
        raise FormatError(f"{where}: {key!r} must be a list")
    if n is not None and len(v) != n:
        raise FormatError(f"{where}: {key!r} has {len(v)} entries; expected {n}")
    return v


def _blob(doc: Any, where: str, what: str, pattern: Callable[[str], bool]) -> Blob:
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: {what} must be an object with name, size and crc32c")
    name = doc.get("name")
    if not isinstance(name, str):
        raise FormatError(f"{where}: {what} name {name!r} must be a string")
    safe_name(name, what=f"{what} name in {where}")
    if not pattern(name):
        raise FormatError(f"{where}: {what} name {name!r} is not a distckpt index blob name")
    crc = doc.get("crc32c")
    if isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc < 1 << 32:
        raise FormatError(f"{where}: {what} crc32c {crc!r} must be an integer in [0, 2**32)")
    return Blob(name, _int(doc.get("size"), f"{where}: {what} size"), crc)


def _from_root(doc: dict, where: str, store: Store | None, common: dict[str, Any]) -> Index:
    fdoc = doc.get("files")
    if not isinstance(fdoc, dict):
        raise FormatError(f"{where}: 'files' must be an object with names, sizes and ranks")
    fnames = _list(fdoc, "names", None, f"{where}: files")
    F = len(fnames)
    sizes = _list(fdoc, "sizes", F, f"{where}: files")
    ranks = _list(fdoc, "ranks", F, f"{where}: files")
    files: dict[str, int] = {}
    for i, f in enumerate(fnames):
        safe_name(f if isinstance(f, str) else "", what=f"data file name in {where}")
        if f in files:
            raise FormatError(f"{where}: data file {f!r} is listed twice")
        files[f] = _int(sizes[i], f"{where}: size of data file {f!r}")
        r = ranks[i]
        if isinstance(r, bool) or not isinstance(r, int) or not -1 <= r < 1 << 31:
            raise FormatError(f"{where}: writer rank of data file {f!r} is {r!r}: must be an integer >= -1")
    tdoc = doc.get("tensors")
    if not isinstance(tdoc, dict):
        raise FormatError(f"{where}: 'tensors' must be an object with names, dtypes and shapes")
    names = _list(tdoc, "names", None, f"{where}: tensors")
    T = len(names)
    dts = _list(tdoc, "dtypes", T, f"{where}: tensors")
    shapes_doc = _list(tdoc, "shapes", T, f"{where}: tensors")
    seen: set[str] = set()
    shapes: list[tuple[int, ...]] = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise FormatError(f"{where}: tensor name #{i} is {n!r}; names are strings")
        if n in seen:
            raise FormatError(f"{where}: tensor {n!r} is listed twice")
        seen.add(n)
        if not isinstance(dts[i], str) or dts[i] not in dtypes.DTYPES:
            raise FormatError(f"{where}: tensor {n!r}: unknown dtype {dts[i]!r}")
        shapes.append(_int_list(shapes_doc[i], f"{where}: tensor {n!r}: shape"))
    cdoc = doc.get("chunks")
    if not isinstance(cdoc, dict):
        raise FormatError(f"{where}: 'chunks' must be an object naming the chunk table")
    count = _int(cdoc.get("count"), f"{where}: chunks.count")
    table_blob = _blob(cdoc.get("table"), where, "chunk table", lambda s: naming.is_index_blob(s) and s.startswith("chunks-"))
    crc_blob = _blob(cdoc.get("crcs"), where, "checksum column", lambda s: naming.is_index_blob(s) and s.startswith("crc32c-"))
    n_crcs = _int((cdoc.get("crcs") or {}).get("count"), f"{where}: chunks.crcs.count")
    try:
        specs = TensorSpecs.of(shapes, [dtypes.itemsize(d) for d in dts], names, where=where)
    except LayoutError as exc:
        raise FormatError(str(exc)) from None
    src = None
    table = None
    if store is not None:
        src = _open_table(store, specs, files, ranks, table_blob, crc_blob, count, n_crcs)
        table = src.table
    tensors = {n: TensorInfo(n, dts[t], shapes[t], TableChunks(src, t, where, n)) for t, n in enumerate(names)}
    return Index(
        tensors=tensors, files=files, version=2, file_ranks=dict(zip(fnames, ranks)), table_blob=table_blob,
        crc_blob=crc_blob, table=table, _source=src, _store=store, **common,
    )


def _mapped(store: Store, blob: Blob, what: str) -> mmap.mmap | bytes | None:
    """A blob mapped, on a local disk; elsewhere None (the caller reads it).  Either way its size must be
    what the root says."""
    where = store.child_url(blob.name)
    if store.is_local:
        from .storage.local import open_regular

        path = store.path(blob.name)
        check = getattr(store, "_check_inside", None)
        if check is not None:
            check(path)
        try:
            fd = open_regular(path, where)
        except FileNotFoundError:
            raise FormatError(f"{where}: the {what} the index names is missing; restore it or re-save the checkpoint") from None
        except OSError as exc:
            raise FormatError(f"{where}: cannot open the {what}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            _check_size(where, what, size, blob.size)
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
        finally:
            os.close(fd)
    try:
        size = store.size(blob.name)
    except FileNotFoundError:
        raise FormatError(f"{where}: the {what} the index names is missing; restore it or re-save the checkpoint") from None
    _check_size(where, what, size, blob.size)
    return None


def _check_size(where: str, what: str, size: int, want: int) -> None:
    if size != want:
        raise FormatError(f"{where}: the {what} has {size} bytes, the index says {want} (truncated or replaced)")


def _stream_crc(store: Store, name: str) -> int:
    crc = 0
    for part in store.open_stream(name).chunks:
        crc = _crc.crc32c(part, crc)
    return crc


def _open_table(store: Store, specs: TensorSpecs, files: dict[str, int], ranks: list[int], table_blob: Blob,
                crc_blob: Blob, count: int, n_crcs: int) -> _TableSource:
    """Open the blobs a version-2 root names and check they are the ones it describes."""
    tw = store.child_url(table_blob.name)
    cw = store.child_url(crc_blob.name)
    buf: Any = _mapped(store, table_blob, "chunk table")
    cbuf: Any = None
    if buf is None:  # not a local disk: the table (and a small checksum column) in one concurrent round trip
        if table_blob.size > MAX_TABLE_BYTES:
            raise FormatError(f"{tw}: a chunk table of {table_blob.size} bytes exceeds the limit of {MAX_TABLE_BYTES}")
        _mapped(store, crc_blob, "checksum column")  # its size
        buf = bytearray(table_blob.size)
        jobs = [(table_blob.name, 0, buf)]
        if crc_blob.size <= MAX_INLINE_CRC_BYTES:
            cbuf = bytearray(crc_blob.size)
            jobs.append((crc_blob.name, 0, cbuf))
        store.read_many(jobs)
    else:
        cbuf = _mapped(store, crc_blob, "checksum column")
    try:
        table = ChunkTable.from_buffer(
            buf, None, n_tensors=len(specs), file_sizes=list(files.values()), tensor_shapes=specs, where=tw,
            file_names=list(files),
        )
    except LayoutError as exc:
        raise FormatError(str(exc)) from None
    if table.n_chunks != count:
        raise FormatError(f"{tw}: the chunk table holds {table.n_chunks} chunks, the index says {count}")
    if table.n_crcs != n_crcs:
        raise FormatError(f"{tw}: the chunk table counts {table.n_crcs} checksums, the index says {n_crcs}")
    if table.file_rank.tolist() != ranks:
        raise FormatError(f"{tw}: the chunk table's writer ranks of the data files disagree with the index")
    if crc_blob.size < 8 + 4 * n_crcs:
        raise FormatError(f"{cw}: a checksum column of {crc_blob.size} bytes cannot hold the {n_crcs} checksums the index counts")
    read = None
    if cbuf is not None:
        try:
            table.attach_crcs(cbuf)
        except LayoutError as exc:
            raise FormatError(f"{cw}: {exc}") from None
        except FormatError as exc:
            raise FormatError(str(exc).replace(tw, cw, 1)) from None
    else:
        def read(off: int, n: int) -> bytes:
            return bytes(store.read_range(crc_blob.name, off, n))

        try:
            table.crc_range(0, 0, read=read)  # the header, checked now
        except FormatError as exc:
            raise FormatError(str(exc).replace(f"{tw} (crc blob)", cw, 1)) from None
    return _TableSource(table, tuple(files), read, (buf, cbuf), store)
