"""The safetensors format: parse a header without trusting it, write a file in one pass.

Layout: 8-byte little-endian header length ``N``; ``N`` bytes of UTF-8 JSON
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``,
padded with spaces to a multiple of 8); then the data, offsets relative to ``8 + N``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

from .. import jsonutil
from ..dtypes import from_safetensors_name, itemsize, safetensors_name
from ..errors import FormatError, UsageError
from . import Entry
from .ckpt import _byteview, _check_shape

__all__ = ["MAX_HEADER_BYTES", "read_safetensors_header", "SafetensorsWriter"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Largest JSON header accepted (the reference implementation's limit is 100 MB)."""

_METADATA_KEY = "__metadata__"
_MAX_NDIM = 32  # numpy arrays have at most 32 dims (layout.MAX_NDIM)


def _read_exact(f: BinaryIO, n: int, fname: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{fname}: truncated safetensors file: {what} needs {n} bytes, got {len(data)}")
    return bytes(data)



def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(f: BinaryIO, *, size: int, name: str) -> tuple[list[Entry], dict[str, str] | None]:
    """Parse and validate the header of a safetensors file of ``size`` bytes.

    Returns the entries in file order (by data offset; segments are absolute file
    offsets) and the ``__metadata__`` dict (``None`` if absent).  Raises
    :class:`~distckpt.errors.FormatError` naming the file and tensor for a header
    longer than the file or :data:`MAX_HEADER_BYTES`, bad JSON, unknown dtypes,
    bad shapes, offsets out of bounds, overlapping or not matching the shape.
    """
    if size < 8:
        raise FormatError(f"{name}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    f.seek(0)
    n = int.from_bytes(_read_exact(f, 8, name, "header length"), "little")
    if n > size - 8:
        raise FormatError(f"{name}: not a safetensors file: header length {n} exceeds the file size {size}")
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{name}: safetensors header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes (100 MiB)"
        )
    raw = _read_exact(f, n, name, "JSON header")
    header = jsonutil.loads(raw, where=f"{name}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{name}: safetensors header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise FormatError(f"{name}: safetensors __metadata__ must map strings to strings, got {metadata!r:.200}")

    data_start = 8 + n
    data_len = size - data_start
    entries: list[tuple[int, Entry]] = []
    for tname, info in header.items():
        where = f"{name}: tensor {tname!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{where}: header entry is not an object")
        missing = {"dtype", "shape", "data_offsets"} - info.keys()
        if missing:
            raise FormatError(f"{where}: header entry lacks {', '.join(sorted(missing))}")
        st_dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(st_dtype, str):
            raise FormatError(f"{where}: dtype {st_dtype!r} is not a string")
        dtype = from_safetensors_name(st_dtype, where=f" in {name}, tensor {tname!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FormatError(f"{where}: shape {shape!r:.200} must be a list of non-negative integers")
        if len(shape) > _MAX_NDIM:
            raise FormatError(f"{where}: shape has {len(shape)} dims; at most {_MAX_NDIM} are supported (numpy's limit)")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise FormatError(f"{where}: data_offsets {offsets!r:.200} must be [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise FormatError(f"{where}: data_offsets {offsets} run past the end of the data ({data_len} bytes)")
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise FormatError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes, {st_dtype}{shape} needs {expected}"
            )
        segs = ((data_start + begin, end - begin),) if end > begin else ()
        entries.append((begin, Entry(tname, dtype, tuple(shape), segs)))

    entries.sort(key=lambda t: (t[0], t[1].nbytes, t[1].name))
    prev_end, prev_name = 0, None
    for begin, e in entries:
        if e.nbytes and begin < prev_end:
            raise FormatError(f"{name}: tensor {e.name!r} overlaps tensor {prev_name!r} in the data section")
        if e.nbytes:
            prev_end, prev_name = begin + e.nbytes, e.name
    return [e for _, e in entries], metadata


class SafetensorsWriter:
    """Write a safetensors file in one sequential pass (or give the layout to ``pwrite`` callers).

    The header is computed from ``specs`` (``(name, dtype, shape)``, dtype a
    distckpt name) and written at once; tensors are laid out in spec order.
    Then call :meth:`write` for each tensor in spec order (several calls per tensor
    are fine; zero-byte tensors may be skipped), then :meth:`close`, which checks
    every tensor is complete (it does not close ``f``).  With ``f=None`` nothing is
    written: use :attr:`header_bytes` and :meth:`data_offset` to write yourself.
    """

    def __init__(
        self,
        f: BinaryIO | None,
        specs: Sequence[tuple[str, str, Iterable[int]]],
        *,
        metadata: dict[str, str] | None = None,
        name: str = "<safetensors>",
    ):
        self.f = f
        self.name = name
        header: dict[str, Any] = {}
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise FormatError(f"{name}: safetensors metadata must map str to str, got {metadata!r:.200}")
            header[_METADATA_KEY] = dict(metadata)
        self._specs: list[tuple[str, str, tuple[int, ...]]] = []
        self._names: list[str] = []
        self._sizes: list[int] = []
        self._rel: dict[str, int] = {}
        specs_l = list(specs)
        offset = 0
        for tname, dtype, shape in specs_l:
            if not isinstance(tname, str) or tname == _METADATA_KEY:
                raise FormatError(f"{name}: invalid tensor name {tname!r}")
            if tname in self._rel:
                raise FormatError(f"{name}: tensor {tname!r} listed twice")
            shape_l = list(_check_shape(name, tname, shape))
            nbytes = math.prod(shape_l) * itemsize(dtype)
            header[tname] = {
                "dtype": safetensors_name(dtype),
                "shape": shape_l,
                "data_offsets": [offset, offset + nbytes],
            }
            self._specs.append((tname, dtype, tuple(shape_l)))
            self._names.append(tname)
            self._sizes.append(nbytes)
            self._rel[tname] = offset
            offset += nbytes
        js = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        js += b" " * (-len(js) % 8)
        self.header_bytes: bytes = len(js).to_bytes(8, "little") + js
        self.data_start = len(self.header_bytes)
        self.total_size = self.data_start + offset
        self._i = 0
        self._done = 0  # bytes written of tensor self._i
        self._closed = False
        if f is not None:
            f.write(self.header_bytes)

    def data_offset(self, name: str) -> int:
        """Absolute file offset of the first byte of tensor ``name``."""
        try:
            return self.data_start + self._rel[name]
        except KeyError:
            raise KeyError(f"{self.name}: no tensor {name!r} in this file") from None

    @property
    def entries(self) -> list[Entry]:
        """The entries of the file being written (absolute segments)."""
        return [
            Entry(t, d, s, ((self.data_offset(t), n),) if n else ()) for (t, d, s), n in zip(self._specs, self._sizes)
        ]

    def write(self, name: str, data: Any) -> None:
        """Append bytes (numpy array of any dtype, or bytes-like) of tensor ``name``."""
        if self.f is None:
            raise UsageError(f"{self.name}: writer has no file; write the bytes yourself at data_offset()")
        if self._closed:
            raise UsageError(f"{self.name}: writer is closed; cannot write {name!r}")
        mv = _byteview(data, f"{self.name}: tensor {name!r}: ")
        while self._i < len(self._names) and self._names[self._i] != name and self._done == self._sizes[self._i]:
            self._i += 1
            self._done = 0
        if self._i >= len(self._names) or self._names[self._i] != name:
            expected = self._names[self._i] if self._i < len(self._names) else "nothing more"
            if name not in self._rel:
                raise FormatError(f"{self.name}: no tensor {name!r} in the header")
            raise FormatError(f"{self.name}: tensor {name!r} written out of order; expected {expected!r}")
        size = self._sizes[self._i]
        if self._done + len(mv) > size:
            raise FormatError(f"{self.name}: tensor {name!r}: {self._done + len(mv)} bytes written, header says {size}")
        self.f.write(mv)
        self._done += len(mv)

    def close(self) -> None:
        """Check every tensor was written in full.  Idempotent; does not close ``f``."""
        if self._closed or self.f is None:
            self._closed = True
            return
        for i in range(self._i, len(self._names)):
            done = self._done if i == self._i else 0
            if done != self._sizes[i]:
                raise FormatError(
                    f"{self.name}: tensor {self._names[i]!r}: {done} of {self._sizes[i]} bytes written before close"
                )
        self._closed = True

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
