"""The commit protocol of a distckpt checkpoint: markers, rank reports, the index, finalize and gc.

Who does what, in which order, for one save into directory D:

1. (coordinator, before any data file exists) :func:`write_marker` writes
   ``.distckpt-save-{save_id}.json`` -- the proof, for :func:`gc`, that files
   of this save id in D are distckpt's;
2. (every writing rank) writes ``data-{save_id}-{rank}.safetensors``, then its
   report: a small JSON head (its files, the tensors it wrote, its error if
   any) and its chunk table (:func:`rank_table`), packed as one byte string
   (:func:`pack_report`).  Under mpirun the reports travel to the coordinator
   only (``gather_bytes``); a rank-mode save writes the packed report as
   ``.manifest-{rank}-{save_id}.chunks`` and then, atomically,
   ``.manifest-{rank}.json`` (:func:`write_manifest`: the head plus the blob's
   size and crc32c);
3. (coordinator) an :class:`IndexBuilder` is declared every report's tensors
   (the union, every shape agreed), then takes the reports one at a time: each
   is opened and checked on its own, so an error names the rank and its report,
   and merged (:class:`~distckpt.chunktable.TableMerger`); :meth:`IndexBuilder.finish`
   checks the merged table (every tensor tiled exactly) and wraps it in an
   :class:`~distckpt.index.Index`; then :func:`commit`: the chunk table and the
   checksum column, then the index root, last and atomically -- its presence
   *is* the commit -- then the files of the previous committed save that the
   new index does not name, and this save's marker (the index now proves its
   files).  :func:`finalize` is step 3 of a rank-mode save, streaming the
   manifests: memory is the merged table (about 40 bytes a chunk), not the reports.

The reports are the only O(world) input, and rank 0 handles them in one linear
pass; every other rank's work depends on its own chunks only.  The index is one
table rather than a hierarchy of per-rank tables: at about 40 bytes a chunk, one
process merges and checks 512,000 chunks in about a second, and a reader maps
one file and binary-searches it instead of opening one file per writer rank.

:func:`commit` writes index version 2 unless told otherwise (``version=1``, or
``DISTCKPT_INDEX_VERSION=1`` in the environment: for readers older than
version 2); both versions are read.

:func:`gc` deletes only what it can prove distckpt wrote: data files, index
blobs and manifest tables of a save whose marker or manifest is present and
that the committed index does not name, markers of saves that can no longer
commit, temp files of our writes, and leftover staging areas whose own marker
proves them (:func:`distckpt.storage.find_staging_debris`).  A directory with
no index, no marker and no manifest is not a distckpt checkpoint: ``gc``
refuses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import crc32c as _crc
import numpy as np

from . import dtypes, jsonutil, naming
from .chunktable import ChunkTable, Segments, TableMerger, TensorSpecs
from .codecs.strategy import strategy_from_json
from .errors import (
    ConfigError,
    DistCkptError,
    FormatError,
    LayoutError,
    NotCommittedError,
    NotFoundError,
    StrategyError,
)
from .index import MAX_INDEX_BYTES, VERSION, VERSIONS, Blob, Chunk, Index, decode_value, encode_value
from .layout import MAX_DEVICES, MAX_NDIM
from .storage import Store, open_storage, safe_name

__all__ = [
    "write_marker",
    "report",
    "rank_table",
    "pack_report",
    "unpack_report",
    "write_manifest",
    "strategy_digest",
    "IndexBuilder",
    "build_index",
    "commit",
    "finalize",
    "gc",
    "values_json",
    "distckpt_files",
    "index_version",
]

#: First bytes of a packed rank report.
REPORT_MAGIC = b"DCKREPT2"
_REPORT_HEAD = struct.Struct("<8sQQQ")
#: Largest JSON head of a rank report (its tensor list).
MAX_REPORT_HEAD = 1 << 28
#: Largest chunk table one rank may report (a rank-mode manifest table is read whole).
MAX_REPORT_BYTES = 1 << 34
MANIFEST_FORMAT = "distckpt-manifest"


def index_version(version: int | None = None) -> int:
    """The index version to write: ``version``, else ``DISTCKPT_INDEX_VERSION``, else the newest."""
    v: Any = version if version is not None else os.environ.get("DISTCKPT_INDEX_VERSION", "").strip() or VERSION
    try:
        v = int(v)
    except (TypeError, ValueError):
        v = None
    if v not in VERSIONS:
        raise ConfigError(f"index version {version or os.environ.get('DISTCKPT_INDEX_VERSION')!r} is not one of {VERSIONS}")
    return int(v)


def write_marker(store: Store, save_id: str, *, rank: int | None = None) -> None:
    """Record that a save with ``save_id`` writes into ``store`` (before any of its data files)."""
    doc = {"format": "distckpt-save", "save_id": save_id, "rank": rank, "pid": os.getpid(),
           "host": socket.gethostname(), "time": time.time()}
    store.makedirs()
    store.put(naming.save_marker(save_id), json.dumps(doc).encode())


def values_json(values: Mapping[str, Any]) -> dict:
    return {k: encode_value(k, v) for k, v in values.items()}


def strategy_digest(strategy: dict | None) -> str:
    """A short fingerprint of a strategy's JSON: every manifest carries it, rank 0's the strategy itself."""
    return hashlib.sha256(json.dumps(strategy, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


# ------------------------------------------------------------------ rank reports
def report(rank: int, files: Mapping[str, int], tensors: Mapping[str, tuple[str, tuple[int, ...]]],
           chunks: Mapping[str, list[Chunk]]) -> dict:
    """One rank's report as JSON (offline writers, which gather it as JSON): what it wrote."""
    return {
        "rank": rank,
        "files": dict(files),
        "tensors": {n: [dt, list(s)] for n, (dt, s) in tensors.items()},
        "chunks": {n: [c.to_json() for c in cs] for n, cs in chunks.items()},
    }


def _block_log2(block_size: int, where: str) -> int:
    if block_size < 2 or block_size & (block_size - 1):
        raise LayoutError(f"{where}: checksum block size {block_size} is not a power of two >= 2")
    return block_size.bit_length() - 1


def rank_table(
    rank: int,
    files: Mapping[str, int],
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    chunks: Mapping[str, Sequence[Chunk]],
    *,
    where: str = "rank report",
) -> tuple[list, list, ChunkTable]:
    """One rank's chunks as a partial chunk table, with the head lists it is read against.

    Returns ``(files, tensors, table)``: ``files`` ``[[name, size], ...]`` (file id = position),
    ``tensors`` ``[[name, dtype, shape], ...]`` (tensor id = position) for the tensors that have
    chunks.  Chunks whose ``crcs`` are None have no checksums; block sizes must be powers of two.
    """
    names = [n for n in tensors if chunks.get(n)]
    fnames = list(files)
    fid = {f: i for i, f in enumerate(fnames)}
    ndims = [len(tensors[n][1]) for n in names]
    D = max(ndims, default=0)
    C = sum(len(chunks[n]) for n in names)
    offs = np.zeros((C, D), np.int64)
    szs = np.ones((C, D), np.int64)
    tid = np.zeros(C, np.int64)
    fil = np.zeros(C, np.int64)
    start = np.zeros(C, np.int64)
    bl = np.zeros(C, np.int64)
    cs = np.zeros(C, np.int64)
    crcs: list[Sequence[int]] = []
    seg_chunk: list[int] = []
    seg_ptr = [0]
    seg_start: list[int] = []
    seg_len: list[int] = []
    i = ncrc = 0
    for t, n in enumerate(names):
        nd = ndims[t]
        for c in chunks[n]:
            if c.file not in fid:
                raise FormatError(f"{where}: a chunk of tensor {n!r} names file {c.file!r}, which the rank did not write")
            if c.box.ndim != nd:
                raise FormatError(f"{where}: a chunk of tensor {n!r} has {c.box.ndim} dims; the tensor has {nd}")
            offs[i, :nd] = c.box.offsets
            szs[i, :nd] = c.box.sizes
            tid[i], fil[i], start[i] = t, fid[c.file], c.segments[0][0]
            if len(c.segments) > 1:
                seg_chunk.append(i)
                seg_start.extend(s for s, _ in c.segments)
                seg_len.extend(k for _, k in c.segments)
                seg_ptr.append(len(seg_start))
            if c.crcs is not None:
                bl[i] = _block_log2(c.block_size, where)
                cs[i] = ncrc
                crcs.append(c.crcs)
                ncrc += len(c.crcs)
            i += 1
    crc_arr = np.fromiter((x for cc in crcs for x in cc), dtype=np.uint64, count=ncrc)
    if ncrc and int(crc_arr.max()) >= 1 << 32:
        raise FormatError(f"{where}: a crc32c value is not a 32-bit integer")
    segs = Segments(*(np.asarray(a, np.int64) for a in (seg_chunk, seg_ptr, seg_start, seg_len))) if seg_chunk else None
    try:
        table = ChunkTable.from_arrays(
            tensor_ids=tid, offsets=offs, sizes=szs, file=fil, start=start, block_log2=bl, crc_start=cs,
            crcs=crc_arr.astype(np.uint32), segments=segs, tensor_shapes=[tensors[n][1] for n in names],
            tensor_itemsizes=[dtypes.itemsize(tensors[n][0]) for n in names], tensor_names=names,
            file_sizes=[files[f] for f in fnames], file_rank=np.full(len(fnames), rank, np.int64), file_names=fnames,
            where=where, check=False, partial=True,
        )
    except LayoutError as exc:
        raise FormatError(str(exc)) from None
    head_tensors = [[n, tensors[n][0], [int(v) for v in tensors[n][1]]] for n in names]
    return [[f, int(files[f])] for f in fnames], head_tensors, table


def pack_report(head: dict, table: ChunkTable | None) -> bytes:
    """A rank's report as one byte string: magic, three lengths, the JSON head, the table blob, the crc blob."""
    js = jsonutil.dumps(head, separators=(",", ":")).encode()
    if table is None:
        tb = cb = b""
    else:
        tb, cb = table.to_bytes()
    return b"".join([_REPORT_HEAD.pack(REPORT_MAGIC, len(js), len(tb), len(cb)), js, tb, cb])


def unpack_report(buf: Any, *, where: str) -> tuple[dict, memoryview, memoryview]:
    """``(head, table blob, crc blob)`` of a packed report (the blobs are views of ``buf``; empty: no table)."""
    mv = memoryview(buf).cast("B")
    if len(mv) < _REPORT_HEAD.size:
        raise FormatError(f"{where}: a rank report of {len(mv)} bytes is too short")
    magic, nj, nt, nc = _REPORT_HEAD.unpack_from(mv)
    if magic != REPORT_MAGIC:
        raise FormatError(f"{where}: not a distckpt rank report (bad magic {bytes(magic)!r})")
    if nj > MAX_REPORT_HEAD:
        raise FormatError(f"{where}: report head of {nj} bytes exceeds the limit of {MAX_REPORT_HEAD}")
    if _REPORT_HEAD.size + nj + nt + nc != len(mv):
        raise FormatError(f"{where}: report lengths {nj} + {nt} + {nc} disagree with its {len(mv)} bytes")
    a = _REPORT_HEAD.size
    head = jsonutil.loads(mv[a : a + nj], where=f"{where}: report head")
    if not isinstance(head, dict):
        raise FormatError(f"{where}: report head must be a JSON object")
    return head, mv[a + nj : a + nj + nt], mv[a + nj + nt :]


# ------------------------------------------------------------------ the commit at scale
_MAX_DIM = 1 << 62
_DTYPES = frozenset(dtypes.DTYPES)


def _shape(x: Any, what: str) -> tuple[int, ...]:
    if type(x) is list and len(x) <= 32:
        for v in x:
            if type(v) is not int or v < 0 or v > _MAX_DIM:
                break
        else:
            return tuple(x)
    raise FormatError(f"{what}: shape {str(x)[:80]} must be a list of at most 32 integers in [0, 2**62]")


def _tensor_list(tensors: Any, where: str) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
    """A report's ``[[name, dtype, shape], ...]``, every entry checked (a few hundred ns each: the commit
    checks one per rank and tensor)."""
    if type(tensors) is not list:
        raise FormatError(f"{where}: 'tensors' must be a list of [name, dtype, shape]")
    names: list[str] = []
    dts: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for e in tensors:
        if type(e) is not list or len(e) != 3 or type(e[0]) is not str or type(e[1]) is not str:
            raise FormatError(f"{where}: tensor entry {str(e)[:80]} is not [name, dtype, shape]")
        if e[1] not in _DTYPES:
            raise FormatError(f"{where}: tensor {e[0]!r} has unknown dtype {e[1]!r}")
        names.append(e[0])
        dts.append(e[1])
        shapes.append(_shape(e[2], f"{where}: tensor {e[0]!r}"))
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise FormatError(f"{where}: tensor {dup!r} is listed twice")
    return names, dts, shapes


def _file_list(files: Any, where: str) -> tuple[list[str], list[int]]:
    if not isinstance(files, list):
        raise FormatError(f"{where}: 'files' must be a list of [name, size]")
    names, sizes = [], []
    for e in files:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int and 0 <= e[1] <= 1 << 62):
            raise FormatError(f"{where}: file entry {str(e)[:80]} is not [name, size]")
        safe_name(e[0], what=f"data file name in {where}")
        if not naming.is_data_file(e[0]):
            raise FormatError(f"{where}: {e[0]!r} is not a distckpt data file name")
        names.append(e[0])
        sizes.append(e[1])
    return names, sizes


class IndexBuilder:
    """Rank 0's side of a commit: the union of the ranks' tensors, then their chunk tables merged.

    :meth:`declare` every report's tensors (``declared`` does it for an iterable of ``(rank,
    tensors, where)`` at once; ``tensors`` as in a report head): every rank must describe a tensor
    with the same dtype and global shape.  Then :meth:`add` each report (in any order, each once),
    then :meth:`finish`.  Only the union is kept from the declarations, so a caller may stream them.
    """

    def __init__(self, declared: Iterable[tuple[int, Any, str]] = (), *, where: str):
        self.where = where
        self._seen: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self._merger: TableMerger | None = None
        for rank, tensors, rw in declared:
            self.declare(rank, tensors, rw)
        self.file_names: list[str] = []
        self.file_sizes: list[int] = []
        self.file_ranks: list[int] = []
        self._files: set[str] = set()

    def declare(self, rank: int, tensors: Any, where: str) -> None:
        """The tensors one rank reports chunks of (before any :meth:`add`)."""
        if self._merger is not None:
            raise LayoutError(f"{self.where}: every report must be declared before the first is added")
        seen = self._seen
        for n, dt, shape in zip(*_tensor_list(tensors, where)):
            old = seen.get(n)
            if old is None:
                seen[n] = (dt, shape, rank)
            elif old[:2] != (dt, shape):
                raise StrategyError(
                    f"{self.where}: {n}: rank {rank} saved it as {dt}{list(shape)}, rank {old[2]} as "
                    f"{old[0]}{list(old[1])}: every rank must describe the same global tensor"
                )

    @property
    def merger(self) -> TableMerger:
        """The merge, begun once every report is declared (the tensors are then known)."""
        if self._merger is None:
            seen = self._seen
            self.names = sorted(seen)
            self.dtypes = [seen[n][0] for n in self.names]
            self.ids = {n: i for i, n in enumerate(self.names)}
            try:
                specs = TensorSpecs.of([seen[n][1] for n in self.names], [dtypes.itemsize(d) for d in self.dtypes],
                                       self.names, where=self.where)
            except LayoutError as exc:
                raise FormatError(str(exc)) from None
            self._merger = TableMerger(specs, where=self.where)
        return self._merger

    def add(self, rank: int, files: Any, tensors: Any, table_blob: Any, crc_blob: Any, *, where: str) -> None:
        """Open one rank's report (its head's ``files`` and ``tensors``, its two blobs), check it, merge it."""
        fnames, fsizes = _file_list(files, where)
        names, dts, shapes = _tensor_list(tensors, where)
        merger, seen = self.merger, self._seen
        ids = []
        for n, dt, shape in zip(names, dts, shapes):
            g = seen.get(n)
            if g is None or g[0] != dt or g[1] != shape:
                raise FormatError(f"{where}: tensor {n!r} {dt}{list(shape)} is not the one declared for the save "
                                  f"({'none' if g is None else f'{g[0]}{list(g[1])}'})")
            ids.append(self.ids[n])
        if not len(table_blob):
            if names:
                raise FormatError(f"{where}: the report lists tensors but holds no chunk table")
            table = None
        else:
            try:
                table = ChunkTable.from_buffer(table_blob, crc_blob, n_tensors=len(names), file_sizes=fsizes,
                                               tensor_shapes=merger.specs.take(ids), file_names=fnames, where=where,
                                               partial=True)
            except LayoutError as exc:
                raise FormatError(str(exc)) from None
        self.add_table(rank, fnames, fsizes, names, table, where=where)

    def add_table(self, rank: int, fnames: list[str], fsizes: list[int], names: list[str], table: ChunkTable | None,
                  *, where: str) -> None:
        merger = self.merger
        for f in fnames:
            if f in self._files:
                raise FormatError(f"{where}: data file {f!r} is reported twice")
            self._files.add(f)
        if table is not None:
            table.check(files=True)
            if (table.file_rank != rank).any():
                raise FormatError(f"{where}: the chunk table says its files were written by rank(s) "
                                  f"{sorted(set(table.file_rank.tolist()))[:4]}, not rank {rank}")
            try:
                ids = [self.ids[n] for n in names]
            except KeyError as exc:
                raise FormatError(f"{where}: tensor {exc.args[0]!r} was not declared") from None
            try:
                merger.add(table, ids)
            except LayoutError as exc:
                raise FormatError(str(exc)) from None
        elif fnames:
            merger.n_files += len(fnames)  # files without chunks (an empty data file) keep their place
        self.file_names += fnames
        self.file_sizes += fsizes
        self.file_ranks += [rank] * len(fnames)

    def finish(self, *, save_id: str, world_size: int, checksum: str, block_size: int, strategy: dict | None,
               metadata: Mapping[str, Any], values: dict) -> Index:
        """The merged table, checked (every tensor tiled exactly), as an :class:`Index` (``values``
        encoded as by :func:`values_json`)."""
        decoded = {k: decode_value(k, v) for k, v in values.items()}
        _check_metadata(metadata, self.where)
        merger = self.merger
        try:
            table = merger.finish(file_sizes=self.file_sizes, file_rank=np.asarray(self.file_ranks, np.int64),
                                       file_names=self.file_names)
            table.check()
        except LayoutError as exc:
            raise FormatError(str(exc)) from None
        return Index.of_table(
            table, dtype_names=self.dtypes, file_names=self.file_names, values=decoded, save_id=save_id,
            block_size=block_size, checksum=checksum, strategy=strategy, metadata=dict(metadata),
            world_size=world_size,
        )


def _json_chunks(rep: dict, where: str) -> dict[str, list[Chunk]]:
    """The chunk records of a JSON report (:func:`report`), types checked (the table checks the rest)."""
    from .layout import Box

    chunks_doc = rep.get("chunks")
    if not isinstance(chunks_doc, dict):
        raise FormatError(f"{where}: 'chunks' must be an object")
    out: dict[str, list[Chunk]] = {}
    for name, cs in chunks_doc.items():
        if not isinstance(cs, list):
            raise FormatError(f"{where}: chunks of {name!r} must be a list")
        lst = out.setdefault(name, [])
        for c in cs:
            ok = isinstance(c, dict) and all(type(c.get(k)) is int for k in ("start", "length")) and isinstance(c.get("file"), str)
            offs, sizes = (c.get("offsets"), c.get("sizes")) if isinstance(c, dict) else (None, None)
            if not ok or not isinstance(offs, list) or not isinstance(sizes, list) or len(offs) != len(sizes) or len(offs) > 32:
                raise FormatError(f"{where}: chunk {str(c)[:120]} of {name!r} is malformed")
            if not all(type(v) is int and 0 <= v <= 1 << 62 for v in offs + sizes):
                raise FormatError(f"{where}: chunk of {name!r} has offsets/sizes outside [0, 2**62]")
            crcs = c.get("crc32c")
            if crcs is not None and not (isinstance(crcs, list) and all(type(x) is int and 0 <= x < 1 << 32 for x in crcs)):
                raise FormatError(f"{where}: chunk of {name!r} has malformed crc32c values")
            bs = c.get("block_size", 0)
            if type(bs) is not int:
                raise FormatError(f"{where}: chunk of {name!r} has block_size {bs!r}")
            lst.append(Chunk(Box(tuple(offs), tuple(sizes)), c["file"], ((c["start"], c["length"]),),
                             tuple(crcs) if crcs is not None else None, bs))
    return out


def _json_report_table(rep: dict, rank: int, where: str) -> tuple[list, list, ChunkTable | None]:
    files = rep.get("files")
    tens = rep.get("tensors")
    if not isinstance(files, dict) or not isinstance(tens, dict):
        raise FormatError(f"{where}: 'files' and 'tensors' must be objects")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for n, v in tens.items():
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in dtypes.DTYPES):
            raise FormatError(f"{where}: tensor {n!r}: expected [dtype, shape], got {str(v)[:80]}")
        tensors[n] = (v[0], _shape(v[1], f"{where}: tensor {n!r}"))
    for f, s in files.items():
        if type(s) is not int or s < 0:
            raise FormatError(f"{where}: file {f!r} has size {s!r}")
    chunks = _json_chunks(rep, where)
    unknown = set(chunks) - set(tensors)
    if unknown:
        raise FormatError(f"{where}: chunks of tensor {sorted(unknown)[0]!r}, which the report does not describe")
    if not any(chunks.values()):
        return [[f, s] for f, s in files.items()], [], None
    f_list, t_list, table = rank_table(rank, files, tensors, chunks, where=where)
    return f_list, t_list, table


def build_index(
    reports: list[dict],
    *,
    save_id: str,
    world_size: int,
    checksum: str,
    block_size: int,
    strategy: dict | None,
    metadata: Mapping[str, Any],
    values: dict,
    where: str,
) -> Index:
    """The index of a save from every writing rank's JSON report (:func:`report`); refuses chunks
    that do not tile a tensor.  (The mpirun save and :func:`finalize` use :class:`IndexBuilder`
    on packed reports.)"""
    _check_metadata(metadata, where)
    parts = []
    for k, rep in enumerate(reports):
        rank = rep.get("rank", k)
        if type(rank) is not int:
            raise FormatError(f"{where}: report {k} has rank {rank!r}")
        rw = f"{where} (report of rank {rank})"
        parts.append((rank, rw, *_json_report_table(rep, rank, rw)))
    builder = IndexBuilder(((r, t, rw) for r, rw, _f, t, _tb in parts), where=where)
    for r, rw, f, t, tb in parts:
        builder.add_table(r, *_file_list(f, rw), [e[0] for e in t], tb, where=rw)
    return builder.finish(save_id=save_id, world_size=world_size, checksum=checksum, block_size=block_size,
                          strategy=strategy, metadata=metadata, values=values)


# ------------------------------------------------------------------ commit
def _index_of(store: Store, *, where: str | None = None) -> Index | None:
    """The committed index's root (no tables opened), or None if there is none or it is unreadable."""
    if not store.exists(naming.INDEX_NAME):
        return None
    try:
        return Index.loads(store.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES),
                           where=where or store.child_url(naming.INDEX_NAME))
    except DistCkptError:
        return None


def _committed_files(store: Store) -> set[str]:
    idx = _index_of(store)
    return set(idx.all_files()) if idx is not None else set()


def _put_blob(store: Store, name: str, parts: Sequence[Any]) -> Blob:
    """Write one blob of the index (durably) from its parts; return its name, size and crc32c."""
    crc = size = 0
    w = store.open_write(name)
    try:
        for p in parts:
            crc = _crc.crc32c(p, crc)
            size += len(p)
            w.write(p)
        store.close_durable(w)
    except BaseException:
        w.abort()
        raise
    return Blob(name, size, crc)


def commit(store: Store, index: Index, *, version: int | None = None) -> list[str]:
    """Write the index (version 2: its chunk table and checksum column first, then the root) last and
    atomically, then drop the files no committed index names, and the save's marker.

    Returns the names written, the index last.
    """
    v = index_version(version)
    old = _committed_files(store)
    if v == 1:
        store.put_atomic(naming.INDEX_NAME, index.dumps())
        new = sorted(index.files)
    else:
        table = index.chunk_table()
        sid = index.save_id if naming.SAVE_ID.match(index.save_id or "") else naming.new_save_id()
        tparts, cparts = table.to_parts()
        blobs = [naming.chunk_table_file(sid), naming.crc_file(sid)]
        try:
            tb = _put_blob(store, blobs[0], tparts)
            cb = _put_blob(store, blobs[1], cparts)
            root = index.root_json(table, tb, cb)
            store.put_atomic(naming.INDEX_NAME, jsonutil.dumps(root, separators=(",", ":")).encode())
        except BaseException:
            if blobs[0] not in old:  # not committed: what this commit wrote is nobody's
                try:
                    store.remove(blobs)
                except Exception:  # noqa: BLE001 - the first error is the one to report; gc can prove these
                    pass
            raise
        new = sorted(index.files) + blobs
    store.remove(sorted(old - set(new)))
    if index.save_id:
        store.remove([naming.save_marker(index.save_id)])
    return new + [naming.INDEX_NAME]


# ------------------------------------------------------------------ rank-mode manifests
def write_manifest(store: Store, head: dict, packed: bytes) -> None:
    """A rank-mode save's report: the packed report as ``.manifest-{rank}-{save_id}.chunks``, then
    ``.manifest-{rank}.json`` (atomic: its presence is the rank's part done) naming it."""
    rank, sid = head["rank"], head["save_id"]
    blob = naming.manifest_table_file(rank, sid)
    store.put(blob, packed)
    doc = {"format": MANIFEST_FORMAT, "version": 2, **head,
           "report": {"name": blob, "size": len(packed), "crc32c": _crc.crc32c(packed)}}
    store.put_atomic(naming.manifest_file(rank), jsonutil.dumps(doc).encode())


def _read_manifest(store: Store, name: str) -> dict:
    """One rank's manifest, checked field by field; every error names the manifest."""
    where = store.child_url(name)
    doc = jsonutil.loads(store.read_bytes(name, limit=MAX_INDEX_BYTES), where=f"{where}: manifest")
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: manifest must be a JSON object")
    legacy = "report" not in doc  # written by distckpt before index version 2: chunk records inline
    need: dict[str, type] = {"rank": int, "save_id": str, "world_size": int, "files": dict if legacy else list,
                             "tensors": dict if legacy else list, "block_size": int, "checksum": str, "metadata": dict}
    need.update({"chunks": dict} if legacy else {"report": dict})
    for key, typ in need.items():
        if not isinstance(doc.get(key), typ) or isinstance(doc.get(key), bool):
            raise FormatError(f"{where}: manifest field {key!r} is missing or not a {typ.__name__}")
    if not 1 <= doc["world_size"] <= MAX_DEVICES:
        raise FormatError(f"{where}: world_size {doc['world_size']} is not between 1 and {MAX_DEVICES}")
    if doc["rank"] != naming.rank_of_manifest(name):
        raise FormatError(f"{where}: manifest says rank {doc['rank']} but is named for rank {naming.rank_of_manifest(name)}")
    if not naming.SAVE_ID.match(doc["save_id"]):
        raise FormatError(f"{where}: save_id {doc['save_id']!r} is not a distckpt save id")
    files = doc["files"].items() if legacy else [tuple(e) if isinstance(e, list) and len(e) == 2 else (e, None)
                                                 for e in doc["files"]]
    for fname, size in files:
        if (not isinstance(fname, str) or naming.save_id_of(fname) != doc["save_id"] or not naming.is_data_file(fname)
                or not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise FormatError(f"{where}: file entry {fname!r}: {size!r} is not one of this save's data files with a size")
    if legacy:
        for tname, entry in doc["tensors"].items():
            _check_tensor_entry(where, tname, entry)
        for tname, cs in doc["chunks"].items():
            if tname not in doc["tensors"] or not isinstance(cs, list):
                raise FormatError(f"{where}: chunks of {tname!r} must be a list, for a tensor the manifest lists")
            for i, c in enumerate(cs):
                if not isinstance(c, dict) or c.get("file") not in doc["files"]:
                    raise FormatError(f"{where}: tensor {tname!r} chunk {i}: not an object naming one of this manifest's files")
        doc["strategy_sha256"] = strategy_digest(doc.get("strategy"))
    else:
        rep = doc["report"]
        if rep.get("name") != naming.manifest_table_file(doc["rank"], doc["save_id"]):
            raise FormatError(f"{where}: manifest names report {rep.get('name')!r}, expected "
                              f"{naming.manifest_table_file(doc['rank'], doc['save_id'])!r}")
        for key in ("size", "crc32c"):
            if type(rep.get(key)) is not int or rep[key] < 0:
                raise FormatError(f"{where}: manifest field report.{key} must be a non-negative integer")
        if not isinstance(doc.get("strategy_sha256"), str):
            raise FormatError(f"{where}: manifest field 'strategy_sha256' is missing")
    values = doc.get("values", {})
    if not isinstance(values, dict):
        raise FormatError(f"{where}: manifest field 'values' must be an object")
    for k, v in values.items():
        try:
            decode_value(k, v)
        except DistCkptError as exc:
            raise FormatError(f"{where}: {exc}") from None
    if doc.get("strategy") is not None:
        strategy_from_json(doc["strategy"], name=f"{where}: strategy")
    _check_metadata(doc["metadata"], where)
    return doc


def _check_tensor_entry(where: str, name: str, entry: Any) -> None:
    """A legacy report's ``tensors`` entry: ``[dtype, global shape]``."""
    ok = (
        isinstance(entry, list) and len(entry) == 2 and entry[0] in dtypes.DTYPES and isinstance(entry[1], list)
        and len(entry[1]) <= MAX_NDIM
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 62 for d in entry[1])
    )
    if not ok:
        raise FormatError(f"{where}: tensor {name!r} must be [dtype, shape] with a known dtype, got {str(entry)[:80]}")


def _check_metadata(metadata: Mapping[str, Any], where: str) -> None:
    """``metadata.name`` becomes output file names (``merge``): it must be a plain file name."""
    name = metadata.get("name")
    if name is None:
        return
    try:
        safe_name(name if isinstance(name, str) else "", what="model name")
    except DistCkptError:
        raise FormatError(f"{where}: metadata.name {name!r} is not a plain file name") from None


def _declared(doc: dict) -> Any:
    """The tensors a manifest reports chunks of, as a report head lists them."""
    if "report" in doc:
        return doc["tensors"]
    return [[n, *v] if isinstance(v, list) else [n, v, None] for n, v in doc["tensors"].items() if doc["chunks"].get(n)]


def _manifest_report(store: Store, doc: dict, name: str) -> tuple[Any, Any, memoryview, memoryview, str]:
    """``(files, tensors, table blob, crc blob, where)`` of one manifest, reading its report blob."""
    rep = doc["report"]
    where = store.child_url(rep["name"])
    try:
        size = store.size(rep["name"])
    except FileNotFoundError:
        raise NotCommittedError(f"{where}: the report of rank {doc['rank']} is missing; re-run that rank's save") from None
    if size != rep["size"] or size > MAX_REPORT_BYTES:
        raise NotCommittedError(f"{where}: {size} bytes, the manifest says {rep['size']}; re-run rank {doc['rank']}'s save")
    data = store.read_bytes(rep["name"], limit=MAX_REPORT_BYTES)
    if _crc.crc32c(data) != rep["crc32c"]:
        raise NotCommittedError(f"{where}: crc32c differs from the manifest's; re-run rank {doc['rank']}'s save")
    head, tb, cb = unpack_report(data, where=where)
    if head.get("rank") != doc["rank"] or head.get("save_id") != doc["save_id"] or head.get("files") != doc["files"]:
        raise FormatError(f"{where}: the report is rank {head.get('rank')!r}'s of save {head.get('save_id')!r} "
                          f"(files {str(head.get('files'))[:80]}), not the manifest's")
    return head["files"], head.get("tensors"), tb, cb, where


def finalize(path, *, storage_options: dict | None = None) -> dict:
    """Commit a rank-mode save once every rank's manifest is present (streaming the manifests)."""
    store = open_storage(path, storage_options)
    if not store.exists():
        raise NotFoundError(f"{store.url}: no such directory")
    listing = store.listdir()
    names = sorted(n for n in listing if naming.is_manifest(n))
    if not names:
        raise NotCommittedError(f"{store.url}: no rank manifests to finalize (did every rank call save(rank=...)?)")
    where = store.child_url(naming.INDEX_NAME)
    builder = IndexBuilder(where=where)
    heads = []
    for n in names:  # the heads only; a report's tensor list is read again from its own blob (pass 2)
        h = _read_manifest(store, n)
        builder.declare(h["rank"], _declared(h), store.child_url(n))
        if "report" in h:
            del h["tensors"]
        heads.append(h)
    world = heads[0]["world_size"]
    for n, r in zip(names, heads):
        if r["world_size"] != world:
            raise FormatError(
                f"{store.child_url(names[0])} says the job has {world} ranks but {store.child_url(n)} says "
                f"{r['world_size']}: these manifests are not from one save; re-run the save"
            )
    ranks = sorted(r["rank"] for r in heads)  # distinct: one manifest name per rank
    if len(ranks) != world or ranks[-1] != world - 1:
        extra = [r for r in ranks if r >= world][:8]
        have = set(ranks)
        missing = list(itertools.islice((r for r in range(world) if r not in have), 8))
        what = f"rank(s) {missing} are missing" if missing else f"rank(s) {extra} are outside the world"
        raise NotCommittedError(
            f"{store.url}: manifests of {what}; every one of the {world} ranks must save before finalize"
        )
    base = next(h for h in heads if h["rank"] == 0)
    if strategy_digest(base.get("strategy")) != base["strategy_sha256"]:
        raise FormatError(f"{store.child_url(naming.manifest_file(0))}: the strategy does not match its digest")
    for r in heads:
        if r["strategy_sha256"] != base["strategy_sha256"] or r["world_size"] != world:
            raise StrategyError(f"{store.url}: rank {r['rank']} saved with a different strategy or world size than rank 0")
    junk = names + [naming.manifest_table_file(h["rank"], h["save_id"]) for h in heads if "report" in h]
    junk += [naming.save_marker(h["save_id"]) for h in heads]
    done = _index_of(store)
    if done is not None and done.save_id == base["save_id"]:  # committed before; only the clean-up was lost
        store.remove(junk)
        return {"path": store.url, "tensors": len(done.tensors), "files": len(done.files)}
    for n, h in zip(names, heads):  # one report in memory at a time
        if "report" in h:
            f, t, tb, cb, rw = _manifest_report(store, h, n)
            builder.add(h["rank"], f, t, tb, cb, where=rw)
            del tb, cb
        else:
            rw = store.child_url(n)
            f, t, table = _json_report_table(h, h["rank"], rw)
            builder.add_table(h["rank"], *_file_list(f, rw), [e[0] for e in t], table, where=rw)
    index = builder.finish(save_id=base["save_id"], world_size=world, checksum=base["checksum"],
                           block_size=base["block_size"], strategy=base.get("strategy"), metadata=base["metadata"],
                           values=base.get("values") or {})
    sizes = {n: store.size(n) for n in index.files if n in listing}
    for fname, size in index.files.items():
        if sizes.get(fname) != size:
            raise NotCommittedError(f"{store.child_url(fname)}: data file missing or of the wrong size; re-run the save")
    commit(store, index)
    store.remove(junk)
    return {"path": store.url, "tensors": len(index.tensors), "files": len(index.files)}


# ------------------------------------------------------------------ gc
def gc(path, *, storage_options: dict | None = None, dry_run: bool = False) -> list[str]:
    """Remove what failed saves left behind, and only what is provably distckpt's (see the module doc)."""
    from .storage import find_staging_debris

    store = open_storage(path, storage_options)
    if not store.exists():
        raise NotFoundError(f"{store.url}: no such directory")
    if not store.isdir():
        raise NotFoundError(f"{store.url}: is a file; gc takes a checkpoint directory (or the parent of one)")
    names = store.listdir()
    staging = find_staging_debris(store)
    committed: set[str] = set()
    committed_id = ""
    if naming.INDEX_NAME in names:
        try:
            idx = Index.loads(store.read_bytes(naming.INDEX_NAME, limit=MAX_INDEX_BYTES),
                              where=store.child_url(naming.INDEX_NAME))
        except DistCkptError as exc:
            raise FormatError(f"{exc}; gc refuses to guess what to delete next to a corrupt index") from None
        committed, committed_id = set(idx.all_files()), idx.save_id
    markers = {naming.save_id_of(n) for n in names if naming.is_save_marker(n)}
    manifests = [n for n in names if naming.is_manifest(n)]
    proven: set[str] = {s for s in markers if s}
    for m in manifests:
        try:
            proven.add(_read_manifest(store, m)["save_id"])
        except DistCkptError:
            continue  # not provably ours: leave it
    if not committed and not proven and not staging and naming.INDEX_NAME not in names:
        raise NotCommittedError(
            f"{store.url} is not a distckpt checkpoint directory (no {naming.INDEX_NAME}, no save markers, no manifests, "
            "no distckpt staging areas): gc deletes only files distckpt can prove it wrote"
        )
    debris = []
    for n in names:
        sid = naming.save_id_of(n)
        if (naming.is_data_file(n) or naming.is_index_blob(n)) and n not in committed and sid in proven:
            debris.append(n)
        elif naming.is_save_marker(n) and sid != committed_id:
            debris.append(n)  # a save that did not commit (a committed save's marker goes at commit)
        elif naming.is_manifest(n) and committed_id:
            debris.append(n)
        elif naming.is_manifest_table(n) and (committed_id or sid in proven):
            debris.append(n)
        elif (committed or proven) and _our_temp(n):
            debris.append(n)  # a write of one of our files interrupted before its rename
    debris += [n for n in staging if n not in debris]
    if not dry_run:
        store.remove(debris)
    return sorted(debris)


def _our_temp(name: str) -> bool:
    """A temporary name (``.{base}.tmp-{id}``) of a file only distckpt writes (index, blobs, manifests, markers, data)."""
    from .storage.base import TMP_NAME_RE

    m = TMP_NAME_RE.match(name)
    if not m:
        return False
    base = m.group("base")
    return (base == naming.INDEX_NAME or naming.is_manifest(base) or naming.is_save_marker(base)
            or naming.is_data_file(base) or naming.is_index_blob(base) or naming.is_manifest_table(base))


def distckpt_files(store: Store) -> list[str]:
    """Every file of a distckpt checkpoint in ``store`` that distckpt can prove it wrote (index last).

    For callers that replace a distributed save with another layout in the same
    directory (``save_pretrained``): the files the committed index names, debris
    that :func:`gc` would remove, then the index itself.
    """
    names = store.listdir()
    if naming.INDEX_NAME not in names and not any(naming.is_save_marker(n) or naming.is_manifest(n) for n in names):
        return []
    out = gc(store, dry_run=True)
    if naming.INDEX_NAME in names:
        idx = _index_of(store)
        if idx is not None:
            out += [f for f in idx.all_files() if f not in out]
        out.append(naming.INDEX_NAME)
    return out

