"""distckpt.codecs: MindSpore .ckpt and safetensors scanners, readers and writers.

Round trips for every dtype, split values, CRC trailers, strings, scalars,
hostile input (hypothesis), and differential tests with MindSpore and the
``safetensors`` package as oracles.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distckpt import dtypes
from distckpt.codecs import (
    CkptWriter,
    Entry,
    SafetensorsWriter,
    read_entry,
    read_safetensors_header,
    scan_ckpt,
)
from distckpt.codecs.ckpt import CRC_MAGIC, read_crc_trailer, verify_ckpt_crc
from distckpt.errors import ChecksumError, FormatError

CKPT_DTYPES = [d for d in dtypes.DTYPES if not d.startswith("float8")]
FP8_DTYPES = [d for d in dtypes.DTYPES if d.startswith("float8")]


# ---------------------------------------------------------------------------- helpers


def rand_array(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bit patterns of ``dtype`` (bool: 0/1)."""
    dt = dtypes.to_numpy(dtype)
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    )


def scan_bytes(data: bytes, name: str = "t.ckpt") -> list[Entry]:
    return scan_ckpt(io.BytesIO(data), size=len(data), name=name)


def read_all_ckpt(data: bytes) -> dict:
    f = io.BytesIO(data)
    return {e.name: read_entry(f, e) for e in scan_ckpt(f, size=len(data), name="t.ckpt")}


def st_header(data: bytes, name: str = "t.safetensors"):
    return read_safetensors_header(io.BytesIO(data), size=len(data), name=name)


def raw_value(tag: str, dims, ttype: str, content: bytes) -> bytes:
    """One hand-made Value message, as MindSpore frames it."""
    return CkptWriter._header(tag.encode(), tuple(dims), ttype.encode(), len(content)) + content


def write_ckpt(tensors: dict, **kw) -> bytes:
    buf = io.BytesIO()
    w = CkptWriter(buf, **kw)
    for name, value in tensors.items():
        if isinstance(value, str):
            w.add_str(name, value)
        else:
            w.add_tensor(name, dtypes.name_of(value.dtype), value.shape, value)
    w.close()
    return buf.getvalue()


def write_st(tensors: dict, metadata=None) -> bytes:
    buf = io.BytesIO()
    specs = [(k, dtypes.name_of(v.dtype), v.shape) for k, v in tensors.items()]
    w = SafetensorsWriter(buf, specs, metadata=metadata)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return buf.getvalue()


class CountingFile(io.BytesIO):
    """BytesIO that counts bytes handed out by read/readinto."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0
        self.reads = 0

    def read(self, n=-1):
        out = super().read(n)
        self.bytes_read += len(out)
        self.reads += 1
        return out

    def readinto(self, b):
        n = super().readinto(b)
        self.bytes_read += n
        self.reads += 1
        return n


# ---------------------------------------------------------------------------- Entry


def test_entry_validates_and_counts():
    e = Entry("w", "float32", [2, 3], [(10, 8), (30, 16)])
    assert e.shape == (2, 3) and e.segments == ((10, 8), (30, 16))
    assert e.nbytes == 24 and e.numel == 6
    with pytest.raises(ValueError, match="'w'"):
        Entry("w", "float32", (-1,), ())
    with pytest.raises(ValueError, match="negative"):
        Entry("w", "float32", (1,), ((-1, 4),))
    with pytest.raises(AttributeError):
        e.name = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------- .ckpt round trips


@pytest.mark.parametrize("dtype", CKPT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (), (7,), (2, 0, 3), (1, 1, 2, 1)])
def test_ckpt_roundtrip_every_dtype(dtype, shape):
    a = rand_array(dtype, shape, seed=len(shape))
    data = write_ckpt({"layer.weight": a, "after": np.arange(3, dtype=np.int32)})
    entries = scan_bytes(data)
    assert [e.name for e in entries] == ["layer.weight", "after"]
    assert entries[0].dtype == dtype and entries[0].shape == shape
    got = read_all_ckpt(data)
    assert same_bytes(got["layer.weight"], a)
    assert same_bytes(got["after"], np.arange(3, dtype=np.int32))


@pytest.mark.parametrize("dtype", FP8_DTYPES)
def test_ckpt_rejects_fp8(dtype):
    w = CkptWriter(io.BytesIO())
    with pytest.raises(FormatError, match="'x'.*safetensors"):
        w.add_tensor("x", dtype, (2,), rand_array(dtype, (2,)))


def test_ckpt_rejects_empty_1d_tensor_mindspore_reads_as_scalar():
    # MindSpore's loader maps dims == [0] to [] for non-strings, so (0,) cannot be written
    w = CkptWriter(io.BytesIO(), name="out.ckpt")
    with pytest.raises(FormatError, match=r"out\.ckpt.*'e'.*\(0,\)"):
        w.add_tensor("e", "float32", (0,), np.zeros(0, np.float32))


def test_ckpt_writer_entries_match_scan():
    tensors = {"a": rand_array("float32", (4, 4)), "s": "hello", "b": rand_array("bfloat16", (9,))}
    buf = io.BytesIO()
    w = CkptWriter(buf, split_bytes=10, crc=True)
    for k, v in tensors.items():
        w.add_str(k, v) if isinstance(v, str) else w.add_tensor(k, dtypes.name_of(v.dtype), v.shape, v)
    w.close()
    assert w.position == len(buf.getvalue())
    assert w.entries == scan_bytes(buf.getvalue())


def test_ckpt_writer_errors():
    w = CkptWriter(io.BytesIO(), name="out.ckpt")
    with pytest.raises(FormatError, match="'a'.*8 bytes.*12"):
        w.add_tensor("a", "float32", (3,), np.zeros(2, np.float32))
    w = CkptWriter(io.BytesIO(), name="out.ckpt")
    w.add_tensor("a", "float32", (2,), np.zeros(2, np.float32))
    with pytest.raises(FormatError, match="'a' added twice"):
        w.add_tensor("a", "float32", (2,), np.zeros(2, np.float32))
    with pytest.raises(FormatError, match="shape"):
        w.add_tensor("b", "float32", (-2,), np.zeros(2, np.float32))
    with pytest.raises(FormatError, match="unknown dtype"):
        w.add_tensor("c", "complex64", (2,), np.zeros(2, np.complex64))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add_str("d", "x")


def test_ckpt_non_contiguous_and_big_endian_inputs():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = write_ckpt({"t": a.T, "be": np.arange(3, dtype=">i4")})
    got = read_all_ckpt(data)
    assert np.array_equal(got["t"], a.T)
    assert np.array_equal(got["be"], np.arange(3, dtype=np.int32))


# ---------------------------------------------------------------------------- split values


@pytest.mark.parametrize("split", [1, 7, 13, 16, 140, 141, 1000])
def test_ckpt_split_values_exact_byte_boundaries(split):
    a = rand_array("float32", (5, 7))  # 140 bytes
    data = write_ckpt({"pre": np.int8(3).reshape(()), "a": a, "post": np.ones(2, np.float16)}, split_bytes=split)
    entries = scan_bytes(data)
    assert [e.name for e in entries] == ["pre", "a", "post"]
    ea = entries[1]
    assert len(ea.segments) == math.ceil(140 / split) and ea.nbytes == 140
    assert same_bytes(read_all_ckpt(data)["a"], a)


def test_ckpt_split_stream_pieces_straddle_boundaries():
    a = rand_array("bfloat16", (11, 3))  # 66 bytes
    flat = a.reshape(-1).view(np.uint8)
    cuts = [0, 1, 1, 9, 30, 31, 66]
    pieces = [flat[i:j] for i, j in zip(cuts, cuts[1:])] + [b""]
    buf = io.BytesIO()
    w = CkptWriter(buf, split_bytes=8)
    e = w.add_tensor_stream("a", "bfloat16", (11, 3), iter(pieces))
    w.add_tensor_stream("b", "int16", (2,), [bytearray(b"\x01\x00"), memoryview(b"\x02\x00")])
    w.close()
    assert len(e.segments) == 9
    got = read_all_ckpt(buf.getvalue())
    assert same_bytes(got["a"], a) and got["b"].tolist() == [1, 2]


def test_ckpt_stream_wrong_total():
    w = CkptWriter(io.BytesIO(), split_bytes=4, name="m.ckpt")
    with pytest.raises(FormatError, match=r"m\.ckpt.*'a'.*more than 8"):
        w.add_tensor_stream("a", "float32", (2,), [b"\0" * 5, b"\0" * 5])
    w = CkptWriter(io.BytesIO(), split_bytes=4, name="m.ckpt")
    with pytest.raises(FormatError, match=r"'a'.*6 bytes.*8"):
        w.add_tensor_stream("a", "float32", (2,), [b"\0" * 6])


def test_ckpt_reads_array_split_style_values():
    # numpy-backed saves use np.array_split along axis 0: unequal, row aligned, possibly empty
    a = rand_array("int32", (5, 3))
    parts = np.array_split(a, 7)
    assert any(p.size == 0 for p in parts)
    data = b"".join(raw_value("a", a.shape, "Int32", p.tobytes()) for p in parts)
    data += raw_value("z", [], "Float64", np.float64(2.5).tobytes())
    (ea, ez) = scan_bytes(data)
    assert ea.shape == (5, 3) and len(ea.segments) == 5  # the two empty pieces add no segment
    got = read_all_ckpt(data)
    assert same_bytes(got["a"], a) and got["z"] == 2.5


# ---------------------------------------------------------------------------- strings, scalars, CRC


@pytest.mark.parametrize("s", ["", "step_100", "héllo wörld", "模型 🚀 \U0010ffff", "a" * 1000])
def test_ckpt_strings(s):
    data = write_ckpt({"s": s, "x": np.float32(1.0).reshape(())})
    es = scan_bytes(data)
    assert es[0].dtype == "str" and es[0].shape == ()
    assert es[0].nbytes == 4 * max(1, len(s))
    assert read_all_ckpt(data)["s"] == s


def test_ckpt_bad_utf32_string():
    data = raw_value("s", [0], "str", b"\xff\xff\xff\xff")
    (e,) = scan_bytes(data)
    with pytest.raises(FormatError, match="'s'.*UTF-32"):
        read_entry(io.BytesIO(data), e, name="t.ckpt")
    with pytest.raises(FormatError, match="'s'.*multiple of 4"):
        scan_bytes(raw_value("s", [0], "str", b"abc"))


def test_ckpt_scalars_and_legacy_dims0_scalar():
    data = raw_value("new", [], "Float32", np.float32(1.5).tobytes())
    data += raw_value("legacy", [0], "Int64", np.int64(-7).tobytes())  # MindSpore 1.x scalar
    data += raw_value("empty", [0], "Int64", b"")
    es = {e.name: e for e in scan_bytes(data)}
    assert es["new"].shape == () and es["legacy"].shape == () and es["empty"].shape == (0,)
    got = read_all_ckpt(data)
    assert got["new"] == 1.5 and got["legacy"] == -7 and got["empty"].shape == (0,)


def test_ckpt_crc_trailer():
    tensors = {"a": rand_array("float16", (33,)), "s": "x"}
    plain = write_ckpt(tensors)
    data = write_ckpt(tensors, crc=True)
    assert data[: len(plain)] == plain
    assert data[len(plain) :] == CRC_MAGIC + zlib.crc32(plain).to_bytes(10, "big")
    assert scan_bytes(data) == scan_bytes(plain)
    assert read_crc_trailer(io.BytesIO(data), size=len(data)) == zlib.crc32(plain)
    assert read_crc_trailer(io.BytesIO(plain), size=len(plain)) is None
    assert verify_ckpt_crc(io.BytesIO(data), size=len(data), name="t.ckpt", chunk=7) is True
    assert verify_ckpt_crc(io.BytesIO(plain), size=len(plain), name="t.ckpt") is False
    bad = bytearray(data)
    bad[len(plain) // 2] ^= 1
    with pytest.raises(ChecksumError, match=r"t\.ckpt"):
        verify_ckpt_crc(io.BytesIO(bytes(bad)), size=len(bad), name="t.ckpt")


# ---------------------------------------------------------------------------- hostile .ckpt


def test_ckpt_map_tensor_is_rejected():
    inner = b"\x0a\x01m" + b"\x1a\x02\x0a\x00"  # tag "m", maptensor {tensor {}}
    data = raw_value("ok", [1], "Int8", b"\x01") + b"\x0a" + bytes([len(inner)]) + inner
    with pytest.raises(FormatError, match=r"t\.ckpt.*'m'.*map tensor.*unsupported"):
        scan_bytes(data)


@pytest.mark.parametrize("ttype", ["Int4", "Float8", "float32", "", "Complex64"])
def test_ckpt_unknown_tensor_type(ttype):
    with pytest.raises(FormatError, match=r"t\.ckpt.*'w'"):
        scan_bytes(raw_value("w", [1], ttype, b"\0"))


def test_ckpt_duplicate_not_consecutive():
    data = raw_value("a", [1], "Int8", b"\1") + raw_value("b", [1], "Int8", b"\1") + raw_value("a", [1], "Int8", b"\1")
    with pytest.raises(FormatError, match="'a' appears twice"):
        scan_bytes(data)


def test_ckpt_split_values_must_agree():
    data = raw_value("a", [2], "Int8", b"\1") + raw_value("a", [3], "Int8", b"\1")
    with pytest.raises(FormatError, match="'a'.*disagree"):
        scan_bytes(data)
    data = raw_value("a", [2], "Int8", b"\1") + raw_value("a", [2], "UInt8", b"\1")
    with pytest.raises(FormatError, match="'a'.*disagree"):
        scan_bytes(data)


def test_ckpt_size_mismatch():
    with pytest.raises(FormatError, match=r"'w'.*3 bytes.*\[2, 2\].*need 8"):
        scan_bytes(raw_value("w", [2, 2], "Int16", b"abc"))
    data = raw_value("w", [4], "Int8", b"ab") + raw_value("w", [4], "Int8", b"abc")
    with pytest.raises(FormatError, match="'w'.*5 bytes"):
        scan_bytes(data)


def test_ckpt_missing_fields_and_negative_dims():
    no_tag = b"\x12\x08\x12\x04Int8\x1a\x00"
    with pytest.raises(FormatError, match="no tag"):
        scan_bytes(b"\x0a" + bytes([len(no_tag)]) + no_tag)
    no_content = b"\x0a\x01w\x12\x06\x12\x04Int8"
    with pytest.raises(FormatError, match="'w'.*tensor_content"):
        scan_bytes(b"\x0a" + bytes([len(no_content)]) + no_content)
    with pytest.raises(FormatError, match="'w'.*negative"):
        scan_bytes(raw_value("w", [-1], "Int8", b""))


def test_ckpt_packed_dims_and_unknown_fields_accepted():
    # legal protobuf MindSpore does not write: packed dims, an unknown field in the tensor
    tensor = b"\x0a\x02\x02\x03" + b"\x12\x04Int8" + b"\x20\x05" + b"\x1a\x06abcdef"
    value = b"\x0a\x01w" + b"\x12" + bytes([len(tensor)]) + tensor
    (e,) = scan_bytes(b"\x0a" + bytes([len(value)]) + value)
    assert e.shape == (2, 3) and e.dtype == "int8" and e.nbytes == 6


def test_ckpt_truncated_everywhere():
    data = write_ckpt({"a": rand_array("float32", (3, 3)), "s": "str", "b": np.arange(4, dtype=np.int64)})
    boundaries = {0}
    for e in scan_bytes(data):
        boundaries.add(e.segments[-1][0] + e.segments[-1][1])
    for cut in range(len(data)):
        if cut in boundaries:
            scan_bytes(data[:cut])  # a prefix made of whole values is a valid file
            continue
        with pytest.raises(FormatError, match=r"t\.ckpt"):
            scan_bytes(data[:cut])


def test_ckpt_lengths_past_eof_and_garbage():
    with pytest.raises(FormatError, match=r"t\.ckpt.*runs past"):
        scan_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 10)  # Value claims 4 GiB
    with pytest.raises(FormatError, match=r"t\.ckpt.*'w'.*runs past"):
        v = b"\x0a\x01w\x12\x0e\x12\x04Int8\x1a\xff\xff\xff\xff\xff\xff\x0f"
        scan_bytes(b"\x0a" + bytes([len(v)]) + v)
    with pytest.raises(FormatError, match="varint"):
        scan_bytes(b"\x0a" + b"\xff" * 20)
    with pytest.raises(FormatError, match=r"t\.ckpt.*field"):
        scan_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(FormatError):
        scan_bytes(json.dumps({"a": 1}).encode())


def test_ckpt_scan_reads_headers_only():
    big = rand_array("uint8", (8 << 20,))
    tensors = {"small": np.ones(3, np.float32), "big": big, "tail": np.zeros(2, np.int64), "s": "x"}
    data = write_ckpt(tensors, split_bytes=1 << 20, crc=True)
    f = CountingFile(data)
    entries = scan_ckpt(f, size=len(data), name="t.ckpt")
    assert [e.name for e in entries] == list(tensors)
    # at most one 64 KiB read-ahead per value; never the 8 MiB of content
    assert f.bytes_read < 12 * 64 * 1024, f.bytes_read
    f.bytes_read = 0
    got = read_entry(f, entries[1])
    assert f.bytes_read == big.nbytes and same_bytes(got, big)


def test_ckpt_many_values_cross_read_chunks():
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    w = CkptWriter(buf, split_bytes=5000)
    for i in range(3000):
        n = int(rng.integers(0, 3000))
        w.add_tensor(
            f"layer.{i}." + "x" * int(rng.integers(0, 40)), "int8", (1, n), rng.integers(-9, 9, n, dtype=np.int8)
        )
    w.add_tensor("long_tag_" + "t" * 5000, "int8", (2,), np.ones(2, np.int8))  # beyond the fast-path window
    w.close()
    assert scan_bytes(buf.getvalue()) == w.entries


def test_ckpt_non_canonical_field_order():
    # content before type, type repeated (last wins), tag after the tensor: legal protobuf
    tensor = b"\x1a\x02\x01\x02" + b"\x08\x02" + b"\x12\x05Int16" + b"\x12\x04Int8"
    value = b"\x12" + bytes([len(tensor)]) + tensor + b"\x0a\x01w"
    data = b"\x0a" + bytes([len(value)]) + value
    (e,) = scan_bytes(data)
    assert (e.name, e.dtype, e.shape) == ("w", "int8", (2,))
    assert read_all_ckpt(data)["w"].tolist() == [1, 2]


def test_ckpt_scan_huge_sparse_file(tmp_path):
    # a 3 GiB tensor in three 1 GiB values, written sparsely: the scan must not read content
    path = tmp_path / "huge.ckpt"
    gib = 1 << 30
    with open(path, "wb") as f:
        hdr = CkptWriter._header(b"big", (3, gib), b"Int8", gib)
        for _ in range(3):
            f.write(hdr)
            f.seek(gib, 1)
        w = CkptWriter(f, offset=f.tell(), crc=True)
        w.add_tensor("tail", "int8", (2,), np.array([1, 2], np.int8))
        w.close()
    size = os.path.getsize(path)
    with open(path, "rb") as raw:
        big, tail = scan_ckpt(raw, size=size, name=str(path))
        assert big.shape == (3, gib) and big.nbytes == 3 * gib and len(big.segments) == 3
        assert read_entry(raw, tail).tolist() == [1, 2]


def test_ckpt_on_fsspec_memory_file():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    tensors = {"a": rand_array("bfloat16", (64, 33)), "s": "text", "b": rand_array("int64", (5,))}
    with fs.open("/distckpt-test/x.ckpt", "wb") as f:
        w = CkptWriter(f, split_bytes=1000, crc=True)
        for k, v in tensors.items():
            w.add_str(k, v) if isinstance(v, str) else w.add_tensor(k, dtypes.name_of(v.dtype), v.shape, v)
        w.close()
    size = fs.size("/distckpt-test/x.ckpt")
    with fs.open("/distckpt-test/x.ckpt", "rb") as f:
        got = {e.name: read_entry(f, e) for e in scan_ckpt(f, size=size, name="memory://x.ckpt")}
    fs.rm("/distckpt-test", recursive=True)
    assert got["s"] == "text" and same_bytes(got["a"], tensors["a"]) and same_bytes(got["b"], tensors["b"])


# ---------------------------------------------------------------------------- fuzzing


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_entries(entries: list[Entry], size: int, data: bytes) -> None:
    for e in entries:
        for off, n in e.segments:
            assert 0 <= off and off + n <= size
        try:
            read_entry(io.BytesIO(data), e)
        except FormatError:
            assert e.dtype == "str"  # only strings can still be undecodable


def _seed_ckpt() -> bytes:
    return write_ckpt(
        {"a": rand_array("float32", (2, 3)), "s": "ok", "b": rand_array("bfloat16", (5,)), "c": np.int8(1).reshape(())},
        split_bytes=8,
        crc=True,
    )


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_ckpt_random_bytes(data):
    try:
        entries = scan_bytes(data)
    except FormatError:
        return
    _check_entries(entries, len(data), data)


@FUZZ
@given(st.data())
def test_fuzz_ckpt_mutations(data):
    buf = bytearray(_seed_ckpt())
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del buf[i : i + data.draw(st.integers(1, 12))]
        elif kind == "truncate":
            del buf[i:]
    try:
        entries = scan_bytes(bytes(buf))
    except FormatError:
        return
    _check_entries(entries, len(buf), bytes(buf))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_safetensors_random_bytes(data):
    for blob in (data, len(data).to_bytes(8, "little") + data, (len(data) // 2).to_bytes(8, "little") + data):
        try:
            entries, _ = st_header(blob)
        except FormatError:
            continue
        _check_entries(entries, len(blob), blob)


@FUZZ
@given(st.data())
def test_fuzz_safetensors_mutations(data):
    seed = write_st(
        {"a": rand_array("float32", (2, 3)), "b": rand_array("bfloat16", (4,)), "c": rand_array("bool", (3,))},
        metadata={"format": "pt"},
    )
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        if len(buf) < 2:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        kind = data.draw(st.sampled_from(["set", "digit", "delete", "truncate"]))
        if kind == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif kind == "digit":  # keep JSON valid-looking: tweak numbers
            buf[i] = data.draw(st.sampled_from(b'0123456789-,[]{}"'))
        elif kind == "delete":
            del buf[i : i + data.draw(st.integers(1, 8))]
        elif len(buf) > 1:
            del buf[i:]
    try:
        entries, _ = st_header(bytes(buf))
    except FormatError:
        return
    _check_entries(entries, len(buf), bytes(buf))


# ---------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("dtype", dtypes.DTYPES)
def test_safetensors_roundtrip_every_dtype(dtype):
    tensors = {"x": rand_array(dtype, (3, 4)), "scalar": rand_array(dtype, ()), "empty": rand_array(dtype, (0, 2))}
    data = write_st(tensors, metadata={"format": "pt"})
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0 and data[8 + n - 1 : 8 + n] in (b" ", b"}")
    entries, meta = st_header(data)
    assert meta == {"format": "pt"}
    f = io.BytesIO(data)
    for e in entries:
        assert e.dtype == dtype and e.shape == tensors[e.name].shape
        assert same_bytes(read_entry(f, e), tensors[e.name])


def test_safetensors_writer_layout_and_errors():
    specs = [("a", "float32", (2,)), ("z", "int8", (0,)), ("b", "bfloat16", (3,))]
    lay = SafetensorsWriter(None, specs, metadata={"k": "v"})
    assert lay.data_offset("a") == len(lay.header_bytes) and lay.data_offset("b") == len(lay.header_bytes) + 8
    assert lay.total_size == len(lay.header_bytes) + 14
    with pytest.raises(ValueError):
        lay.write("a", b"")
    with pytest.raises(KeyError, match="'nope'"):
        lay.data_offset("nope")

    buf = io.BytesIO()
    w = SafetensorsWriter(buf, specs, name="o.safetensors")
    assert buf.getvalue() == w.header_bytes
    with pytest.raises(FormatError, match="'b' written out of order; expected 'a'"):
        w.write("b", np.zeros(3, ml_dtypes.bfloat16))
    w.write("a", b"\0" * 4)
    with pytest.raises(FormatError, match=r"o\.safetensors.*'a'.*12 bytes.*8"):
        w.write("a", b"\0" * 8)
    w.write("a", np.zeros(1, np.float32))
    w.write("b", np.ones(2, ml_dtypes.bfloat16))  # zero-byte 'z' skipped implicitly
    with pytest.raises(FormatError, match="'b': 4 of 6 bytes"):
        w.close()
    w.write("b", np.ones(1, ml_dtypes.bfloat16))
    w.close()
    assert w.entries == st_header(buf.getvalue())[0]
    with pytest.raises(FormatError, match="'q'"):
        SafetensorsWriter(io.BytesIO(), [("q", "float32", (2,)), ("q", "int8", (1,))])
    with pytest.raises(FormatError, match="__metadata__"):
        SafetensorsWriter(io.BytesIO(), [("__metadata__", "float32", (2,))])
    with pytest.raises(FormatError, match="metadata"):
        SafetensorsWriter(io.BytesIO(), [], metadata={"a": 1})  # type: ignore[dict-item]


def _st_blob(header: dict, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    js = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(js).to_bytes(8, "little") + js + data


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01\x02", "shorter than"),
        ((10**6).to_bytes(8, "little") + b"{}", "exceeds the file size"),
        (_st_blob({}, raw_header=b"{not json"), "not valid JSON"),
        (_st_blob({}, raw_header=b'{"a":\xff}'), "not valid JSON"),
        (_st_blob({}, raw_header=b"[1, 2]"), "not an object"),
        (_st_blob({}, raw_header=b"[" * 100000 + b"]" * 100000), "JSON"),
        (
            _st_blob(
                {},
                raw_header=b'{"w":' + json.dumps(GOOD).encode() + b',"w":' + json.dumps(GOOD).encode() + b"}",
                data=b"\0" * 8,
            ),
            "'w' twice",
        ),
        (_st_blob({"w": {**GOOD, "data_offsets": [0, 16]}}, b"\0" * 8), "'w'.*past the end"),
        (_st_blob({"w": {**GOOD, "data_offsets": [-8, 0]}}, b"\0" * 8), "'w'.*data_offsets"),
        (_st_blob({"w": {**GOOD, "data_offsets": [4, 0]}}, b"\0" * 8), "'w'.*data_offsets"),
        (_st_blob({"w": {**GOOD, "data_offsets": [0, 8, 9]}}, b"\0" * 8), "'w'.*data_offsets"),
        (_st_blob({"w": {**GOOD, "data_offsets": [0.0, 8]}}, b"\0" * 8), "'w'.*data_offsets"),
        (_st_blob({"w": {**GOOD, "data_offsets": [0, 4]}}, b"\0" * 8), "'w'.*4 bytes.*needs 8"),
        (_st_blob({"w": {**GOOD, "shape": [-2]}}, b"\0" * 8), "'w'.*shape"),
        (_st_blob({"w": {**GOOD, "shape": [2.0]}}, b"\0" * 8), "'w'.*shape"),
        (_st_blob({"w": {**GOOD, "shape": [True, 2]}}, b"\0" * 8), "'w'.*shape"),
        (_st_blob({"w": {**GOOD, "shape": "2"}}, b"\0" * 8), "'w'.*shape"),
        (_st_blob({"w": {**GOOD, "dtype": "C64"}}, b"\0" * 8), "C64.*'w'"),
        (_st_blob({"w": {**GOOD, "dtype": 3}}, b"\0" * 8), "'w'.*dtype"),
        (_st_blob({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "'w'.*lacks data_offsets"),
        (_st_blob({"w": [1, 2]}, b"\0" * 8), "'w'.*not an object"),
        (_st_blob({"__metadata__": {"a": 1}}), "__metadata__"),
        (_st_blob({"__metadata__": "x"}), "__metadata__"),
        (_st_blob({"a": GOOD, "b": {**GOOD, "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    ],
)
def test_safetensors_hostile_headers(blob, match):
    with pytest.raises(FormatError, match=match) as info:
        st_header(blob, name="bad.safetensors")
    assert "bad.safetensors" in str(info.value)


def test_safetensors_header_length_checked_before_reading():
    class Huge(io.BytesIO):
        def read(self, n=-1):
            assert n <= 8, f"read {n} bytes before validating the header length"
            return super().read(n)

    blob = (200 << 20).to_bytes(8, "little") + b"{}"
    with pytest.raises(FormatError, match="100"):
        read_safetensors_header(Huge(blob), size=10**12, name="huge.safetensors")
    with pytest.raises(FormatError, match="exceeds the file size"):
        read_safetensors_header(Huge((2**64 - 1).to_bytes(8, "little")), size=10**12, name="huge.safetensors")


def test_safetensors_zero_size_tensors_share_offsets_and_holes_allowed():
    header = {
        "e1": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "e2": {"dtype": "I8", "shape": [3, 0], "data_offsets": [4, 4]},
        "b": {"dtype": "I8", "shape": [2], "data_offsets": [6, 8]},
    }
    entries, meta = st_header(_st_blob(header, b"\0" * 8))
    assert meta is None
    assert [e.name for e in entries] == ["a", "e1", "e2", "b"]


# ---------------------------------------------------------------------------- interop: safetensors package


def test_interop_safetensors_package(tmp_path):
    sfnp = pytest.importorskip("safetensors.numpy")
    safetensors = pytest.importorskip("safetensors")
    tensors = {f"t_{d}": rand_array(d, (3, 2), seed=i) for i, d in enumerate(dtypes.DTYPES)}
    tensors["scalar"] = np.array(2.0, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.int64)
    # ours -> theirs (the numpy API handles bf16/fp8 through ml_dtypes in safetensors >= 0.6)
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(write_st(tensors, metadata={"format": "np"}))
    with safetensors.safe_open(str(ours), framework="numpy") as f:
        assert f.metadata() == {"format": "np"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            if k.startswith("t_float8"):  # safetensors' numpy loader looks for np.float8_* (numpy 2 only)
                continue
            got = np.asarray(f.get_tensor(k))
            # once mindspore is imported, numpy may hand back MindSpore's own bfloat16
            # type (same bits, another dtype object): compare the raw bytes then
            if got.dtype != v.dtype and got.dtype.itemsize == v.dtype.itemsize and got.dtype.name == v.dtype.name:
                got = got.view(np.dtype(f"u{v.dtype.itemsize}")).view(v.dtype)
            assert same_bytes(got, v), k
    # theirs -> ours
    theirs = tmp_path / "theirs.safetensors"
    sfnp.save_file(tensors, str(theirs), metadata={"who": "them"})
    size = os.path.getsize(theirs)
    with open(theirs, "rb") as f:
        entries, meta = read_safetensors_header(f, size=size, name=str(theirs))
        assert meta == {"who": "them"}
        assert {e.name for e in entries} == set(tensors)
        for e in entries:
            assert same_bytes(read_entry(f, e), tensors[e.name]), e.name


# ---------------------------------------------------------------------------- differential: MindSpore


@pytest.fixture(scope="module")
def ms():
    return pytest.importorskip("mindspore")


def _bf16_exact_fp32(shape, seed=0):
    """fp32 values that are exactly representable in bf16 (so MindSpore's cast is lossless)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


MS_NP_DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
]


def _ms_params(ms):
    src = {}
    params = []
    for i, d in enumerate(MS_NP_DTYPES):
        a = rand_array(d, (3, 4), seed=i)
        if d.startswith("float"):  # no NaNs: MindSpore may canonicalize them
            a = np.random.default_rng(i).standard_normal((3, 4)).astype(d)
        src[f"p.{d}"] = a
        params.append({"name": f"p.{d}", "data": ms.Parameter(ms.Tensor(a), name=f"p.{d}")})
    bf = _bf16_exact_fp32((5, 6), seed=99)
    src["p.bfloat16"] = bf.astype(ml_dtypes.bfloat16)
    params.append({"name": "p.bfloat16", "data": ms.Parameter(ms.Tensor(bf, ms.bfloat16), name="p.bfloat16")})
    src["scalar"] = np.array(3.25, np.float32)
    params.append({"name": "scalar", "data": ms.Tensor(src["scalar"])})
    return params, src


def test_mindspore_ckpt_is_read_exactly(ms, tmp_path):
    params, src = _ms_params(ms)
    path = str(tmp_path / "ms.ckpt")
    append = {"epoch_num": 7, "note": "héllo 🚀", "blank": ""}
    ms.save_checkpoint(params, path, crc_check=True, append_dict=dict(append))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        assert verify_ckpt_crc(f, size=size, name=path)
        entries = scan_ckpt(f, size=size, name=path)
        got = {e.name: read_entry(f, e) for e in entries}
    assert set(got) == set(src) | set(append)
    for k, v in src.items():
        assert same_bytes(got[k], v), k
    assert got["epoch_num"] == 7 and got["note"] == "héllo 🚀" and got["blank"] == ""
    # and our writer produces the very same bytes
    ours = io.BytesIO()
    w = CkptWriter(ours, crc=True)
    for e in entries:
        if e.dtype == "str":
            w.add_str(e.name, got[e.name])
        else:
            w.add_tensor(e.name, e.dtype, e.shape, got[e.name])
    w.close()
    assert ours.getvalue() == open(path, "rb").read()


def test_mindspore_safetensors_is_read_exactly(ms, tmp_path):
    params, src = _ms_params(ms)
    path = str(tmp_path / "ms.safetensors")
    ms.save_checkpoint(params, path, format="safetensors")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        entries, meta = read_safetensors_header(f, size=size, name=path)
        got = {e.name: read_entry(f, e) for e in entries}
    assert meta == {"format": "ms"}
    assert set(got) == set(src)
    for k, v in src.items():
        assert same_bytes(got[k], v), k


def _check_ms_loaded(ms, loaded, src):
    for k, v in src.items():
        p = loaded[k]
        if isinstance(v, str):
            assert p == v, k
            continue
        assert tuple(p.shape) == v.shape, k
        if v.dtype == np.dtype(ml_dtypes.bfloat16):
            assert p.dtype == ms.bfloat16
            bits = v.view(np.uint16)
            assert np.array_equal(p.asnumpy().view(np.uint16), bits), k  # numpy 1.x path
            hi = (p.float().asnumpy().view(np.uint32) >> 16).astype(np.uint16)  # numpy-2-safe path
            assert np.array_equal(hi, bits), k
        else:
            assert same_bytes(p.asnumpy(), v), k


@pytest.mark.parametrize("split", [None, 7])
def test_our_ckpt_loads_in_mindspore(ms, tmp_path, split):
    _, src = _ms_params(ms)
    src = dict(src)
    src["bf_big"] = _bf16_exact_fp32((17, 3), seed=5).astype(ml_dtypes.bfloat16)
    src["note"] = "distckpt ✓"
    src["empty2d"] = np.zeros((2, 0), np.float32)
    path = tmp_path / "ours.ckpt"
    kw = {"split_bytes": split} if split else {}
    path.write_bytes(write_ckpt(src, crc=True, **kw))
    if split:
        with open(path, "rb") as f:
            e = next(e for e in scan_ckpt(f, size=os.path.getsize(path), name=str(path)) if e.name == "bf_big")
        assert len(e.segments) == math.ceil(17 * 3 * 2 / split)
    loaded = ms.load_checkpoint(str(path), crc_check=True)
    assert set(loaded) == set(src)
    _check_ms_loaded(ms, loaded, src)


def test_array_split_values_load_in_mindspore(ms, tmp_path):
    a = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    data = b"".join(raw_value("a", a.shape, "Float32", p.tobytes()) for p in np.array_split(a, 4))
    path = tmp_path / "split.ckpt"
    path.write_bytes(data)
    loaded = ms.load_checkpoint(str(path))
    assert np.array_equal(loaded["a"].asnumpy(), a)
    assert same_bytes(read_all_ckpt(data)["a"], a)


def test_our_safetensors_loads_in_mindspore(ms, tmp_path):
    _, src = _ms_params(ms)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(write_st(src, metadata={"format": "ms"}))
    loaded = ms.load_checkpoint(str(path), format="safetensors")
    assert set(loaded) == set(src)
    _check_ms_loaded(ms, loaded, src)


def test_mindspore_rejects_our_corrupted_crc(ms, tmp_path):
    data = bytearray(write_ckpt({"a": np.arange(8, dtype=np.float32)}, crc=True))
    data[-20] ^= 0x40  # inside tensor content
    path = tmp_path / "bad.ckpt"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Failed to read"):  # MindSpore masks its CRC message
        ms.load_checkpoint(str(path), crc_check=True)
