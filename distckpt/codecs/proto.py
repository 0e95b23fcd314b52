"""A minimal protobuf (proto2) wire-format codec in pure Python.

Enough to read and write MindSpore's strategy files and to stream-scan
``.ckpt`` files without the ``protobuf`` package or MindSpore.

Decoding works on a ``memoryview`` (or ``bytes``) with explicit ``pos`` /
``end`` offsets and never copies payloads: length-delimited values come back
as ``memoryview`` slices of the input.  Every decoder treats its input as
hostile: truncated varints, varints longer than 10 bytes, lengths running
past ``end``, field number 0 and wire types 3/4/6/7 raise
:class:`~distckpt.errors.FormatError` naming ``where`` (the file being read)
and the byte offset.  No length read from the input is used to allocate
anything before it has been checked against the bytes that remain.

Wire types: ``VARINT`` (0), ``I64`` (1, fixed 8 bytes, returned as an unsigned
int), ``LEN`` (2), ``I32`` (5, fixed 4 bytes, unsigned).  Groups (3, 4) are
rejected: no format distckpt reads uses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Union

from ..errors import FormatError

__all__ = [
    "VARINT",
    "I64",
    "LEN",
    "I32",
    "Buffer",
    "decode_varint",
    "read_header",
    "read_field",
    "iter_fields",
    "repeated_ints",
    "as_int32",
    "as_uint32",
    "as_int64",
    "as_str",
    "encode_varint",
    "encode_key",
    "field_varint",
    "field_len",
    "field_repeated",
    "field_packed",
]

VARINT, I64, LEN, I32 = 0, 1, 2, 5

Buffer = Union[bytes, bytearray, memoryview]

_MASK64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1


def _fail(where: str, pos: int, what: str) -> FormatError:
    return FormatError(f"{where}: malformed protobuf at byte {pos}: {what}")


def decode_varint(buf: Buffer, pos: int, end: int | None = None, where: str = "<protobuf>") -> tuple[int, int]:
    """Decode the varint at ``buf[pos:]``; return ``(value, new_pos)``.

    The value is an unsigned 64-bit int (bits past 64 are dropped, as protobuf
    does); use :func:`as_int32` / :func:`as_int64` for signed fields.
    """
    if end is None:
        end = len(buf)
    if pos >= end:
        raise _fail(where, pos, "truncated varint (no bytes left)")
    b = buf[pos]
    if b < 0x80:  # fast path: one byte
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    p = pos + 1
    stop = min(end, pos + 10)
    while p < stop:
        b = buf[p]
        p += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, p
        shift += 7
    if p >= pos + 10:
        raise _fail(where, pos, "varint longer than 10 bytes")
    raise _fail(where, pos, "truncated varint")


def read_header(buf: Buffer, pos: int, end: int | None = None, where: str = "<protobuf>") -> tuple[int, int, int, int]:
    """Read one field's key and its varint / fixed value or length.

    Returns ``(field_number, wire_type, value, new_pos)``.  For ``LEN`` fields
    ``value`` is the payload length and the payload starts at ``new_pos``; the
    length is **not** checked against ``end`` (a streaming reader checks it
    against the file size instead).  For the other wire types ``value`` is the
    integer and ``new_pos`` points past it.
    """
    if end is None:
        end = len(buf)
    key_pos = pos
    key, pos = decode_varint(buf, pos, end, where)
    field_number, wire_type = key >> 3, key & 7
    if field_number == 0 or field_number > _MAX_FIELD:
        raise _fail(where, key_pos, f"invalid field number {field_number}")
    if wire_type == VARINT:
        value, pos = decode_varint(buf, pos, end, where)
    elif wire_type == LEN:
        value, pos = decode_varint(buf, pos, end, where)
    elif wire_type == I64 or wire_type == I32:
        n = 8 if wire_type == I64 else 4
        if end - pos < n:
            raise _fail(where, pos, f"truncated fixed{n * 8} value of field {field_number}")
        value = int.from_bytes(buf[pos : pos + n], "little")
        pos += n
    elif wire_type in (3, 4):
        raise _fail(
            where, key_pos, f"field {field_number} uses groups (wire type {wire_type}), which are not supported"
        )
    else:
        raise _fail(where, key_pos, f"field {field_number} has invalid wire type {wire_type}")
    return field_number, wire_type, value, pos


def read_field(
    buf: Buffer, pos: int, end: int | None = None, where: str = "<protobuf>"
) -> tuple[int, int, int | memoryview, int]:
    """Read one whole field: ``(field_number, wire_type, value, new_pos)``.

    ``value`` is an int for varint / fixed fields and a ``memoryview`` slice of
    ``buf`` (no copy) for length-delimited ones, after checking that the
    payload lies within ``end``.
    """
    if end is None:
        end = len(buf)
    field_number, wire_type, value, pos = read_header(buf, pos, end, where)
    if wire_type == LEN:
        if value > end - pos:
            raise _fail(where, pos, f"field {field_number} claims {value} bytes but only {end - pos} remain")
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        return field_number, wire_type, mv[pos : pos + value], pos + value
    return field_number, wire_type, value, pos


def iter_fields(
    buf: Buffer, start: int = 0, end: int | None = None, *, where: str = "<protobuf>"
) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)`` for every field of one message.

    The message occupies ``buf[start:end]``; see :func:`read_field` for values.
    """
    if end is None:
        end = len(buf)
    if not 0 <= start <= end <= len(buf):
        raise _fail(where, start, f"message bounds {start}..{end} outside a buffer of {len(buf)} bytes")
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    pos = start
    while pos < end:
        field_number, wire_type, value, pos = read_field(mv, pos, end, where)
        yield field_number, wire_type, value


def repeated_ints(wire_type: int, value: int | memoryview, where: str = "<protobuf>") -> list[int]:
    """The raw (unsigned) ints one occurrence of a repeated integer field holds.

    proto2 parsers must accept both the unpacked form (one varint per element)
    and the packed form (one ``LEN`` field of concatenated varints).
    """
    if wire_type == VARINT:
        return [value]  # type: ignore[list-item]
    if wire_type == LEN:
        out = []
        mv = value  # type: ignore[assignment]
        pos, end = 0, len(mv)  # type: ignore[arg-type]
        while pos < end:
            v, pos = decode_varint(mv, pos, end, where)  # type: ignore[arg-type]
            out.append(v)
        return out
    raise FormatError(f"{where}: malformed protobuf: repeated integer field has wire type {wire_type}")


def as_uint32(v: int) -> int:
    """A decoded varint as uint32 (protobuf truncates to the low 32 bits)."""
    return v & 0xFFFFFFFF


def as_int32(v: int) -> int:
    """A decoded varint as int32 (negative int32 values are sign-extended to 64 bits on the wire)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def as_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v & (1 << 63) else v


def as_str(value: int | memoryview, where: str, what: str) -> str:
    """A ``LEN`` payload decoded as UTF-8 (proto ``string``)."""
    if isinstance(value, int):
        raise FormatError(f"{where}: malformed protobuf: {what} should be a string, got a varint/fixed value")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: malformed protobuf: {what} is not valid UTF-8 ({exc})") from None


# ---------------------------------------------------------------- encoding


def encode_varint(value: int) -> bytes:
    """Varint bytes of ``value``; negative values as 64-bit two's complement (10 bytes)."""
    if value < 0:
        value &= _MASK64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_key(field_number: int, wire_type: int) -> bytes:
    return encode_varint((field_number << 3) | wire_type)


def field_varint(field_number: int, value: int) -> bytes:
    """A varint field (int32/int64/uint32/uint64/bool/enum)."""
    return encode_key(field_number, VARINT) + encode_varint(int(value))


def field_len(field_number: int, payload: bytes | bytearray | memoryview | str) -> bytes:
    """A length-delimited field: bytes, a string (UTF-8) or an encoded sub-message."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return encode_key(field_number, LEN) + encode_varint(len(payload)) + bytes(payload)


def field_repeated(field_number: int, values: Iterable[int]) -> bytes:
    """An unpacked repeated integer field (proto2's default): one key + varint per element."""
    key = encode_key(field_number, VARINT)
    return b"".join(key + encode_varint(int(v)) for v in values)


def field_packed(field_number: int, values: Iterable[int]) -> bytes:
    """A packed repeated integer field (empty input writes nothing)."""
    body = b"".join(encode_varint(int(v)) for v in values)
    return field_len(field_number, body) if body else b""
