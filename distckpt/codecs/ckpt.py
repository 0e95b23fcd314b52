"""MindSpore ``.ckpt`` files: stream-scan, stream-write, read one entry.

The format (proto2, no package)::

    Checkpoint    { repeated Value value = 1; }
    Value         { required string tag = 1;
                    oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    TensorProto   { repeated int64 dims = 1; required string tensor_type = 2;
                    required bytes tensor_content = 3; }

A file is a concatenation of single-``Value`` ``Checkpoint`` messages, optionally
followed by a 17-byte trailer ``b"crc_num" + crc32(all preceding bytes)`` as 10
big-endian bytes.  A tensor larger than :data:`SPLIT_BYTES` is stored as several
consecutive Values with the same tag, each repeating the full ``dims`` and
``tensor_type``; the contents concatenate to the tensor's bytes (MindSpore cuts
at exact byte boundaries or with ``np.array_split`` along axis 0; readers accept
any cut).  Strings are ``dims=[0]``, ``tensor_type="str"``, UTF-32LE content.

The scanner reads only headers: it seeks over ``tensor_content``, reads in
:data:`READ_CHUNK`-byte blocks and keeps O(number of values) state, so it works
on multi-GB and remote (fsspec) files.  Nothing here imports MindSpore.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from ..dtypes import ckpt_name, from_ckpt_name, itemsize, to_numpy
from ..errors import ChecksumError, FormatError, UsageError
from . import STR_DTYPE, Entry
from .proto import encode_varint

__all__ = [
    "SPLIT_BYTES",
    "CRC_MAGIC",
    "CRC_TRAILER_BYTES",
    "scan_ckpt",
    "read_entry",
    "read_crc_trailer",
    "verify_ckpt_crc",
    "CkptWriter",
]

SPLIT_BYTES = 512 * 1024 * 1024
"""Largest ``tensor_content`` MindSpore writes in one Value (its ``SLICE_SIZE`` KiB)."""
CRC_MAGIC = b"crc_num"
CRC_TRAILER_BYTES = len(CRC_MAGIC) + 10
READ_CHUNK = 64 * 1024
"""Bytes read at once while scanning headers (small values are read through, large ones seeked over)."""

_MAX_TAG_BYTES = 1 << 20
_MAX_TYPE_BYTES = 256
_MAX_DIMS = 32  # numpy arrays have at most 32 dims (layout.MAX_NDIM)
_FAST_WINDOW = 1024  # bytes of a Value header expected in the buffer for the fast path

# wire types
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


# ---------------------------------------------------------------------------- varints


def _decode_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """Decode a varint at ``buf[pos:end]``; return ``(value, new_pos)``, ``None`` if
    it runs past ``end``.  Raises ``ValueError`` for a varint longer than 10 bytes."""
    result = 0
    shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")
    return None




def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------------------- scanning


class _Reader:
    """Forward reader over ``f[.. end)`` that buffers small reads and seeks over big skips."""

    def __init__(self, f: BinaryIO, fname: str, end: int):
        self.f = f
        self.fname = fname
        self.end = end
        self.pos = 0
        self.buf = b""
        self.buf_start = 0
        self.bytes_read = 0

    def fail(self, msg: str, tensor: str | None = None) -> FormatError:
        where = f", tensor {tensor!r}" if tensor is not None else ""
        return FormatError(f"{self.fname}: not a valid MindSpore checkpoint{where}: {msg} (at byte {self.pos})")

    def _ensure(self, n: int, limit: int) -> None:
        """Make ``buf`` hold ``[pos, pos + min(n, limit - pos))``."""
        want_end = min(self.pos + n, limit)
        if self.buf_start <= self.pos and want_end <= self.buf_start + len(self.buf):
            return
        read_end = min(max(want_end, self.pos + READ_CHUNK), self.end)
        self.f.seek(self.pos)
        data = self.f.read(read_end - self.pos)
        if not isinstance(data, bytes):
            data = bytes(data)
        self.bytes_read += len(data)
        self.buf = data
        self.buf_start = self.pos
        if self.pos + len(data) < want_end:
            raise self.fail(f"file is truncated: expected {want_end - self.pos} more bytes, got {len(data)}")

    def varint(self, limit: int, tensor: str | None = None) -> int:
        rel = self.pos - self.buf_start
        if self.pos < limit and 0 <= rel < len(self.buf):  # fast path: one-byte varint in the buffer
            b = self.buf[rel]
            if b < 0x80:
                self.pos += 1
                return b
        if self.pos >= limit:
            raise self.fail("truncated varint", tensor)
        self._ensure(10, limit)
        rel = self.pos - self.buf_start
        try:
            got = _decode_varint(self.buf, rel, min(len(self.buf), limit - self.buf_start))
        except ValueError as exc:
            raise self.fail(str(exc), tensor) from None
        if got is None:
            raise self.fail("truncated varint", tensor)
        value, new_rel = got
        self.pos = self.buf_start + new_rel
        return value

    def read(self, n: int, limit: int, tensor: str | None = None) -> bytes:
        if self.pos + n > limit:
            raise self.fail(f"field of {n} bytes runs past the end of its message", tensor)
        rel = self.pos - self.buf_start
        if rel < 0 or rel + n > len(self.buf):
            self._ensure(n, limit)
            rel = self.pos - self.buf_start
        self.pos += n
        return self.buf[rel : rel + n]

    def skip(self, n: int, limit: int, tensor: str | None = None) -> None:
        if self.pos + n > limit:
            raise self.fail(f"field of {n} bytes runs past the end of its message", tensor)
        self.pos += n

    def length(self, limit: int, tensor: str | None = None) -> int:
        n = self.varint(limit, tensor)
        if self.pos + n > limit:
            raise self.fail(f"length {n} runs past the end of its message ({limit - self.pos} bytes left)", tensor)
        return n

    def skip_field(self, wire_type: int, limit: int, tensor: str | None = None) -> None:
        if wire_type == _VARINT:
            self.varint(limit, tensor)
        elif wire_type == _I64:
            self.skip(8, limit, tensor)
        elif wire_type == _I32:
            self.skip(4, limit, tensor)
        elif wire_type == _LEN:
            self.skip(self.length(limit, tensor), limit, tensor)
        else:
            raise self.fail(f"unsupported protobuf wire type {wire_type}", tensor)


class _Value:
    __slots__ = ("tag", "dims", "ttype", "content", "is_map", "has_tensor")

    def __init__(self) -> None:
        self.tag: str | None = None
        self.dims: list[int] = []
        self.ttype: str | None = None
        self.content: tuple[int, int] | None = None
        self.is_map = False
        self.has_tensor = False


def _fast_varint(buf: bytes, i: int, n: int) -> tuple[int, int]:
    b = buf[i]  # IndexError past the buffer: the caller falls back
    if b < 0x80:
        return b, i + 1
    got = _decode_varint(buf, i, n)
    if got is None:
        raise IndexError
    return got


def _fast_value(buf: bytes, i: int) -> tuple[str, list[int], str, int, int, int] | None:
    """Parse one Value framed exactly as MindSpore writes it, entirely from ``buf``.

    Returns ``(tag, dims, tensor_type, content_start, content_len, value_end)``
    (offsets relative to ``buf``), or ``None`` whenever anything is unusual or not
    in the buffer; the caller then re-parses with the general (slow, precise) path.
    """
    n = len(buf)
    try:
        if buf[i] != 0x0A:
            return None
        vlen, i = _fast_varint(buf, i + 1, n)
        vend = i + vlen
        if buf[i] != 0x0A:
            return None
        tl, i = _fast_varint(buf, i + 1, n)
        if i + tl > n or tl > _MAX_TAG_BYTES:
            return None
        tag = buf[i : i + tl].decode("utf-8")
        i += tl
        if buf[i] != 0x12:
            return None
        tlen, i = _fast_varint(buf, i + 1, n)
        if i + tlen != vend:
            return None
        dims: list[int] = []
        while buf[i] == 0x08:
            d, i = _fast_varint(buf, i + 1, n)
            if d >= 1 << 63 or len(dims) >= _MAX_DIMS:
                return None
            dims.append(d)
        if buf[i] != 0x12:
            return None
        yl, i = _fast_varint(buf, i + 1, n)
        if i + yl > n or yl > _MAX_TYPE_BYTES:
            return None
        ttype = buf[i : i + yl].decode("utf-8")
        i += yl
        if buf[i] != 0x1A:
            return None
        cl, i = _fast_varint(buf, i + 1, n)
        if i + cl != vend:
            return None
        return tag, dims, ttype, i, cl, vend
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _parse_tensor(r: _Reader, end: int, v: _Value) -> None:
    v.has_tensor = True  # several tensor fields merge, as protobuf does
    while r.pos < end:
        key = r.varint(end, v.tag)
        field, wt = key >> 3, key & 7
        if field == 1 and wt == _VARINT:
            v.dims.append(_as_int64(r.varint(end, v.tag)))
        elif field == 1 and wt == _LEN:  # packed dims: legal protobuf, MindSpore never writes it
            pend = r.length(end, v.tag)
            pend += r.pos
            while r.pos < pend:
                v.dims.append(_as_int64(r.varint(pend, v.tag)))
                if len(v.dims) > _MAX_DIMS:
                    break
        elif field == 2 and wt == _LEN:
            n = r.length(end, v.tag)
            if n > _MAX_TYPE_BYTES:
                raise r.fail(f"tensor_type of {n} bytes", v.tag)
            raw = r.read(n, end, v.tag)
            try:
                v.ttype = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise r.fail(f"tensor_type {raw!r} is not UTF-8", v.tag) from None
        elif field == 3 and wt == _LEN:
            n = r.length(end, v.tag)
            v.content = (r.pos, n)
            r.skip(n, end, v.tag)
        elif field == 0:
            raise r.fail("invalid protobuf field number 0", v.tag)
        else:
            r.skip_field(wt, end, v.tag)
        if len(v.dims) > _MAX_DIMS:
            raise r.fail(f"more than {_MAX_DIMS} dims", v.tag)


def _parse_value(r: _Reader, end: int) -> _Value:
    v = _Value()
    while r.pos < end:
        key = r.varint(end, v.tag)
        field, wt = key >> 3, key & 7
        if field == 1 and wt == _LEN:
            n = r.length(end, v.tag)
            if n > _MAX_TAG_BYTES:
                raise r.fail(f"tag of {n} bytes")
            raw = r.read(n, end)
            try:
                v.tag = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise r.fail(f"tag {raw[:80]!r} is not UTF-8") from None
        elif field == 2 and wt == _LEN:
            tend = r.length(end, v.tag)
            tend += r.pos
            _parse_tensor(r, tend, v)
            if r.pos != tend:
                raise r.fail("tensor message overruns its length", v.tag)
        elif field == 3 and wt == _LEN:
            v.is_map = True
            r.skip(r.length(end, v.tag), end, v.tag)
        elif field == 0:
            raise r.fail("invalid protobuf field number 0", v.tag)
        else:
            r.skip_field(wt, end, v.tag)
    return v


def read_crc_trailer(f: BinaryIO, *, size: int) -> int | None:
    """The CRC stored in the file's trailer, or ``None`` if it has none.

    Like MindSpore, any file whose bytes ``[-17:-10]`` are ``b"crc_num"`` has a trailer.
    """
    if size < CRC_TRAILER_BYTES:
        return None
    f.seek(size - CRC_TRAILER_BYTES)
    tail = f.read(CRC_TRAILER_BYTES)
    if len(tail) != CRC_TRAILER_BYTES or tail[: len(CRC_MAGIC)] != CRC_MAGIC:
        return None
    return int.from_bytes(tail[len(CRC_MAGIC) :], "big")


def scan_ckpt(f: BinaryIO, *, size: int, name: str) -> list[Entry]:
    """Describe every value of a MindSpore ``.ckpt`` without reading tensor bytes.

    ``f`` is a seekable binary file of ``size`` bytes; ``name`` is used in messages.
    Consecutive Values with the same tag become one :class:`Entry` with several
    segments.  Strings become ``dtype="str"``, ``shape=()``.  A legacy scalar
    (``dims=[0]`` with one element of content, as MindSpore 1.x wrote) gets ``shape=()``.

    Raises :class:`~distckpt.errors.FormatError` (naming the file and, when known,
    the tensor) for anything MindSpore could not load or distckpt cannot represent:
    truncation, bad protobuf, unknown ``tensor_type``, map tensors, sizes that do
    not match the dims, a name repeated non-consecutively.
    """
    if size < 0:
        raise FormatError(f"{name}: negative file size {size}")
    data_end = size - CRC_TRAILER_BYTES if read_crc_trailer(f, size=size) is not None else size
    r = _Reader(f, name, data_end)
    entries: list[Entry] = []
    seen: set[str] = set()
    cur: _Value | None = None
    cur_segs: list[tuple[int, int]] = []
    cur_total = 0

    def finish() -> None:
        assert cur is not None and cur.tag is not None and cur.ttype is not None
        entries.append(_make_entry(name, cur.tag, cur.ttype, cur.dims, cur_segs, cur_total))

    while r.pos < data_end:
        start = r.pos
        r._ensure(_FAST_WINDOW, data_end)
        fast = _fast_value(r.buf, start - r.buf_start)
        if fast is not None and r.buf_start + fast[5] <= data_end:
            v = _Value()
            v.tag, v.dims, v.ttype, coff, clen, vend = fast
            v.has_tensor = True
            v.content = (r.buf_start + coff, clen)
            r.pos = r.buf_start + vend
        else:
            key = r.varint(data_end)
            if key != (1 << 3 | _LEN):
                raise r.fail(
                    f"expected a Value (field 1, length-delimited), found field {key >> 3} wire type {key & 7}"
                )
            vend = r.length(data_end)
            vend += r.pos
            v = _parse_value(r, vend)
            if r.pos != vend:
                raise r.fail("value overruns its length", v.tag)
        if v.tag is None:
            raise FormatError(f"{name}: value at byte {start} has no tag")
        if v.is_map:
            raise FormatError(
                f"{name}: tensor {v.tag!r} is a MindSpore map tensor (MapParameter); map tensors are unsupported"
            )
        if not v.has_tensor or v.ttype is None or v.content is None:
            raise FormatError(f"{name}: tensor {v.tag!r}: value at byte {start} lacks tensor_type or tensor_content")
        if any(d < 0 for d in v.dims):
            raise FormatError(f"{name}: tensor {v.tag!r}: negative dims {v.dims}")
        if cur is not None and v.tag == cur.tag:
            if v.dims != cur.dims or v.ttype != cur.ttype:
                raise FormatError(
                    f"{name}: tensor {v.tag!r} is split over values that disagree: dims {cur.dims} "
                    f"{cur.ttype} then {v.dims} {v.ttype}"
                )
        else:
            if cur is not None:
                finish()
            if v.tag in seen:
                raise FormatError(f"{name}: tensor {v.tag!r} appears twice, not consecutively")
            seen.add(v.tag)
            cur, cur_segs, cur_total = v, [], 0
        off, n = v.content
        if n:
            if cur_segs and cur_segs[-1][0] + cur_segs[-1][1] == off:  # cannot happen, but keep segments minimal
                cur_segs[-1] = (cur_segs[-1][0], cur_segs[-1][1] + n)
            else:
                cur_segs.append((off, n))
            cur_total += n
    if cur is not None:
        finish()
    return entries


def _make_entry(fname: str, tag: str, ttype: str, dims: list[int], segs: list[tuple[int, int]], total: int) -> Entry:
    if ttype == STR_DTYPE:
        if total % 4:
            raise FormatError(f"{fname}: string {tag!r} has {total} bytes, not a multiple of 4 (UTF-32)")
        return Entry(tag, STR_DTYPE, (), tuple(segs))
    dtype = from_ckpt_name(ttype, where=f" in {fname}, tensor {tag!r}")
    isz = itemsize(dtype)
    shape = tuple(dims)
    if shape == (0,) and total == isz:
        shape = ()  # MindSpore 1.x wrote scalars as dims=[0]; MindSpore's loader maps [0] to []
    expected = math.prod(shape) * isz
    if total != expected:
        raise FormatError(
            f"{fname}: tensor {tag!r}: content has {total} bytes but dims {list(dims)} of {ttype} need {expected}"
        )
    return Entry(tag, dtype, shape, tuple(segs))


def verify_ckpt_crc(f: BinaryIO, *, size: int, name: str, chunk: int = 16 << 20) -> bool:
    """Check the CRC trailer against the file's bytes (reads the whole file in chunks).

    Returns ``False`` when the file has no trailer; raises
    :class:`~distckpt.errors.ChecksumError` when it does not match.
    """
    stored = read_crc_trailer(f, size=size)
    if stored is None:
        return False
    end = size - CRC_TRAILER_BYTES
    crc = 0
    f.seek(0)
    pos = 0
    while pos < end:
        data = f.read(min(chunk, end - pos))
        if not data:
            raise FormatError(f"{name}: file is truncated at byte {pos}")
        crc = zlib.crc32(data, crc)
        pos += len(data)
    if crc != stored:
        raise ChecksumError(f"{name}: CRC trailer says {stored:#010x} but the values hash to {crc:#010x}")
    return True


# ---------------------------------------------------------------------------- reading


def _readinto_exact(f: BinaryIO, mv: memoryview, where: str) -> None:
    readinto = getattr(f, "readinto", None)
    pos = 0
    n = len(mv)
    while pos < n:
        if readinto is not None:
            got = readinto(mv[pos:])
        else:
            data = f.read(n - pos)
            got = len(data)
            mv[pos : pos + got] = data
        if not got:
            raise FormatError(f"{where}: file is truncated ({n - pos} of {n} bytes missing)")
        pos += got


def read_entry(f: BinaryIO, entry: Entry, *, name: str = "<file>") -> np.ndarray | str:
    """Read one entry's bytes into a fresh array of its dtype and shape (or a ``str``).

    All segments are read with ``readinto`` into one preallocated buffer.  Works
    for entries from any scanner in :mod:`distckpt.codecs`.
    """
    where = f"{name}: tensor {entry.name!r}"
    buf = np.empty(entry.nbytes, dtype=np.uint8)
    mv = memoryview(buf)  # type: ignore[arg-type]  # numpy<2 stubs
    pos = 0
    for off, n in entry.segments:
        f.seek(off)
        _readinto_exact(f, mv[pos : pos + n], where)
        pos += n
    if entry.dtype == STR_DTYPE:
        return _decode_str(buf.tobytes(), where)
    dt = to_numpy(entry.dtype)
    if entry.nbytes != entry.numel * dt.itemsize:
        raise FormatError(f"{where}: {entry.nbytes} bytes do not fill shape {entry.shape} of {entry.dtype}")
    return buf.view(dt).reshape(entry.shape)


def _decode_str(data: bytes, where: str) -> str:
    """Decode as numpy (and so MindSpore) does: UTF-32LE, trailing NULs dropped."""
    try:
        return data.decode("utf-32-le").rstrip("\x00")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: string is not valid UTF-32LE ({exc})") from None


# ---------------------------------------------------------------------------- writing


def _byteview(data: Any, where: str = "") -> memoryview:
    """A flat ``uint8`` memoryview of an array or bytes-like object, without copying if possible."""
    if isinstance(data, np.ndarray):
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return memoryview(data.reshape(-1).view(np.uint8))
    try:
        mv = memoryview(data)
    except TypeError:
        raise UsageError(f"{where}expected a numpy array or bytes-like object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise UsageError(f"{where}buffer is not C-contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


class CkptWriter:
    """Stream tensors into a MindSpore ``.ckpt`` that ``mindspore.load_checkpoint`` loads.

    ``f`` is a binary file opened for writing (needs only ``write``); ``offset`` is
    the file position ``f`` starts at (for the segments in :attr:`entries`).
    Tensors with more than ``split_bytes`` bytes are written as consecutive Values
    with the same tag at exact byte boundaries, as MindSpore does.  With ``crc=True``,
    :meth:`close` appends MindSpore's ``crc_num`` trailer.  ``close`` does not close ``f``.

    Order of calls: any number of ``add_*`` then ``close`` once.  If an ``add_*``
    raises midway the file is unusable.
    """

    def __init__(
        self,
        f: Any,  # anything with write(bytes-like): a file, a positioned writer, a byte counter
        *,
        crc: bool = False,
        split_bytes: int = SPLIT_BYTES,
        name: str = "<ckpt>",
        offset: int = 0,
    ):
        if split_bytes < 1:
            raise UsageError(f"split_bytes must be positive, got {split_bytes}")
        self.f = f
        self.crc = crc
        self.split_bytes = split_bytes
        self.name = name
        self.position = offset
        self.entries: list[Entry] = []
        self._crc = 0
        self._names: set[str] = set()
        self._closed = False

    # -- low level

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        if self.crc:
            self._crc = zlib.crc32(data, self._crc)
        self.position += len(data)

    def _start(self, name: str) -> None:
        if self._closed:
            raise UsageError(f"{self.name}: writer is closed; cannot add {name!r}")
        if not isinstance(name, str):
            raise UsageError(f"{self.name}: tensor name must be str, got {type(name).__name__}")
        if name in self._names:
            raise FormatError(f"{self.name}: tensor {name!r} added twice")
        self._names.add(name)

    @staticmethod
    def _header(tag: bytes, dims: tuple[int, ...], ttype: bytes, content_len: int) -> bytes:
        tensor_prefix = b"".join(b"\x08" + encode_varint(d) for d in dims)
        tensor_prefix += b"\x12" + encode_varint(len(ttype)) + ttype + b"\x1a" + encode_varint(content_len)
        value_prefix = b"\x0a" + encode_varint(len(tag)) + tag
        value_prefix += b"\x12" + encode_varint(len(tensor_prefix) + content_len) + tensor_prefix
        return b"\x0a" + encode_varint(len(value_prefix) + content_len) + value_prefix

    def _chunks(self, nbytes: int, split: bool = True) -> list[int]:
        if nbytes == 0 or not split:
            return [nbytes]
        full, rest = divmod(nbytes, self.split_bytes)
        return [self.split_bytes] * full + ([rest] if rest else [])

    def _write_stream(
        self, name: str, ttype: str, dims: tuple[int, ...], nbytes: int, pieces: Iterable[Any], split: bool = True
    ) -> list[tuple[int, int]]:
        tag, tt = name.encode("utf-8"), ttype.encode("utf-8")
        chunks = self._chunks(nbytes, split)
        segs: list[tuple[int, int]] = []
        ci = -1
        left = 0  # bytes still to write in chunk ci

        def next_chunk() -> None:
            nonlocal ci, left
            ci += 1
            left = chunks[ci]
            self._write(self._header(tag, dims, tt, left))
            if left:
                segs.append((self.position, left))

        next_chunk()
        written = 0
        for piece in pieces:
            mv = _byteview(piece, f"{self.name}: tensor {name!r}: ")
            while len(mv):
                if left == 0:
                    if ci + 1 >= len(chunks):
                        raise FormatError(f"{self.name}: tensor {name!r}: pieces hold more than {nbytes} bytes")
                    next_chunk()
                take = min(left, len(mv))
                self._write(mv[:take])
                mv = mv[take:]
                left -= take
                written += take
        if written != nbytes:
            raise FormatError(f"{self.name}: tensor {name!r}: pieces hold {written} bytes, shape needs {nbytes}")
        return segs

    # -- public

    def add_tensor(self, name: str, dtype: str, shape: Iterable[int], data: Any) -> Entry:
        """Write one tensor from a numpy array (any dtype; raw bytes, no conversion) or bytes-like."""
        shape_t = _check_shape(self.name, name, shape)
        mv = _byteview(data, f"{self.name}: tensor {name!r}: ")
        nbytes = math.prod(shape_t) * itemsize(dtype)
        if len(mv) != nbytes:
            raise FormatError(
                f"{self.name}: tensor {name!r}: data has {len(mv)} bytes, {dtype}{list(shape_t)} needs {nbytes}"
            )
        return self.add_tensor_stream(name, dtype, shape_t, [mv])

    def add_tensor_stream(self, name: str, dtype: str, shape: Iterable[int], pieces: Iterable[Any]) -> Entry:
        """Write one tensor whose bytes arrive as ``pieces`` (buffers of any sizes, in C order).

        The total must equal ``prod(shape) * itemsize(dtype)``; only one piece is held at a time.
        """
        shape_t = _check_shape(self.name, name, shape)
        ttype = ckpt_name(dtype, tensor=name)  # raises FormatError for fp8
        if shape_t == (0,):
            raise FormatError(
                f"{self.name}: tensor {name!r} of shape (0,) cannot be stored in a .ckpt: MindSpore's loader "
                "reads dims [0] as a scalar (its own save_checkpoint drops empty tensors)"
            )
        self._start(name)
        nbytes = math.prod(shape_t) * itemsize(dtype)
        segs = self._write_stream(name, ttype, shape_t, nbytes, pieces)
        entry = Entry(name, dtype, shape_t, tuple(segs))
        self.entries.append(entry)
        return entry

    def add_str(self, name: str, value: str) -> Entry:
        """Write a string value as MindSpore does (``dims=[0]``, type ``str``, ``np.array(s).tobytes()``)."""
        if not isinstance(value, str):
            raise UsageError(f"{self.name}: value of {name!r} must be str, got {type(value).__name__}")
        self._start(name)
        data = np.array(value).tobytes()  # UTF-32LE, at least one code unit ("" -> 4 NUL bytes)
        # never split: MindSpore decodes a string with the length of its *last* value only
        segs = self._write_stream(name, STR_DTYPE, (0,), len(data), [data], split=False)
        entry = Entry(name, STR_DTYPE, (), tuple(segs))
        self.entries.append(entry)
        return entry

    def close(self) -> None:
        """Finish the file: append the CRC trailer if ``crc=True``.  Idempotent; does not close ``f``."""
        if self._closed:
            return
        self._closed = True
        if self.crc:
            trailer = CRC_MAGIC + self._crc.to_bytes(10, "big")
            self.f.write(trailer)
            self.position += len(trailer)

    def __enter__(self) -> CkptWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()


def _check_shape(fname: str, name: str, shape: Iterable[int]) -> tuple[int, ...]:
    try:
        shape_t = tuple(shape)
    except TypeError:
        raise FormatError(f"{fname}: tensor {name!r}: shape {shape!r} is not a sequence") from None
    for d in shape_t:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise FormatError(f"{fname}: tensor {name!r}: shape {shape_t!r} must be non-negative integers")
    return tuple(int(d) for d in shape_t)
