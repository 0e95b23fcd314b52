"""The distckpt index: versioned JSON, never pickle.

A checkpoint is a directory of data files (valid safetensors) plus
``distckpt.index.json``, written last; its presence is the commit.  See the
README for the full schema.  Everything read from storage is validated here
before it is used: names, offsets, sizes, byte counts, checksums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import dtypes, jsonutil
from .errors import FormatError, LayoutError
from .layout import Box, check_tiling
from .naming import INDEX_NAME
from .plan import ChunkLookup
from .storage import safe_name

__all__ = [
    "INDEX_NAME",
    "FORMAT",
    "VERSION",
    "MAX_INDEX_BYTES",
    "Chunk",
    "TensorInfo",
    "Index",
    "encode_value",
    "decode_value",
]

FORMAT = "distckpt"
VERSION = 1
MAX_INDEX_BYTES = 1 << 30
_MAX_DIMS = 32  # numpy arrays have at most 32 dims (layout.MAX_NDIM)
_MAX_INT = 1 << 62


@dataclass(frozen=True)
class Chunk:
    """A box of a tensor stored as C-order bytes in one file.

    ``segments`` are (absolute byte offset, length) pieces whose concatenation
    is the chunk's bytes; distckpt files always have one segment, MindSpore
    ``.ckpt`` tensors split over several values have more.  ``crcs`` are
    crc32c values of consecutive ``block_size`` blocks of the chunk bytes.
    """

    box: Box
    file: str
    segments: tuple[tuple[int, int], ...]
    crcs: tuple[int, ...] | None = None
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

    Readers ask :meth:`overlapping` for the chunks a box touches; it binary-searches
    a lookup built once per tensor (not once per read).  A columnar index
    (version 2) provides the same method over its table without building a
    Python object per chunk.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...] = field(default=())

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    def overlapping(self, box: Box) -> list[tuple[int, Chunk, Box]]:
        """``(chunk number, chunk, intersection)`` for every chunk that overlaps ``box``."""
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = ChunkLookup([c.box for c in self.chunks])
            object.__setattr__(self, "_lookup", lookup)
        return [(i, self.chunks[i], inter) for i, inter in lookup.overlapping(box)]

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)


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


@dataclass
class Index:
    """The committed description of a checkpoint."""

    tensors: dict[str, TensorInfo]
    values: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    save_id: str = ""
    block_size: int = 1 << 20
    checksum: str = "crc32c"
    strategy: dict | None = None
    metadata: dict = field(default_factory=dict)
    world_size: int = 1

    # ---------------------------------------------------------------- json
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
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
        return jsonutil.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes, *, where: str = INDEX_NAME) -> Index:
        return cls.from_json(jsonutil.loads(data, where=f"{where}: index"), where=where)

    @classmethod
    def from_json(cls, doc: Any, *, where: str = INDEX_NAME) -> Index:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{where}: not a distckpt index (missing \"format\": \"{FORMAT}\")")
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION or version < 1:
            raise FormatError(f"{where}: index version {version!r} is not supported (this distckpt reads <= {VERSION})")
        ck = doc.get("checksum") or {}
        if not isinstance(ck, dict):
            raise FormatError(f"{where}: 'checksum' must be an object")
        algorithm = ck.get("algorithm", "crc32c")
        if algorithm not in ("crc32c", "none"):
            raise FormatError(f"{where}: unknown checksum algorithm {algorithm!r}")
        block_size = _int(ck.get("block_size", 1 << 20), f"{where}: checksum.block_size", lo=1)
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
        world = doc.get("world_size", 1)
        return cls(
            tensors=tensors,
            values=values,
            files=files,
            save_id=save_id,
            block_size=block_size,
            checksum=algorithm,
            strategy=strategy,
            metadata=metadata,
            world_size=_int(world, f"{where}: world_size", lo=1),
        )
