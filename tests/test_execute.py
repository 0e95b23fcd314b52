"""distckpt.execute: the hot path -- writes straight from the arrays, reads from a mapped file, counted honestly."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt import dtypes
from distckpt.errors import ChecksumError, FormatError, StorageError
from distckpt.execute import PendingChunk, ReadStats, read_box, write_chunk_file
from distckpt.index import TensorInfo
from distckpt.layout import Box
from distckpt.storage import open_storage


def _write(tmp_path, arrays: dict, **kw):
    store = open_storage(str(tmp_path))
    pending = [PendingChunk.of(n, Box((0,) * a.ndim, a.shape), a) for n, a in arrays.items()]
    recs, size = write_chunk_file(store, "f.safetensors", pending, rank=0, **kw)
    return store, recs, size


def test_written_file_is_safetensors_with_every_byte(tmp_path):
    import safetensors.numpy

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((300, 17)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "s": np.asarray(2.5, np.float64), "e": np.zeros((0, 4), np.float32)}
    store, recs, size = _write(tmp_path, arrays)
    assert size == os.path.getsize(tmp_path / "f.safetensors")
    back = safetensors.numpy.load_file(str(tmp_path / "f.safetensors"))
    for n, a in arrays.items():
        assert np.array_equal(back[f"{n}@" + ",".join("0" * a.ndim)].reshape(a.shape), a), n
    for n, a in arrays.items():
        (chunk,) = recs[n]
        got = read_box(store, TensorInfo(n, dtypes.name_of(a.dtype), a.shape, (chunk,)), Box((0,) * a.ndim, a.shape))
        assert got.tobytes() == a.tobytes()


def test_whole_chunk_reads_are_views_and_boxes_are_copies(tmp_path):
    a = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    store, recs, _ = _write(tmp_path, {"a": a})
    t = TensorInfo("a", "float32", a.shape, tuple(recs["a"]))
    whole = read_box(store, t, Box((0, 0), (64, 32)))
    assert not whole.flags.owndata and whole.flags.writeable  # a copy-on-write view of the mapping
    whole[0, 0] = -1  # writing to it changes neither the file nor later reads
    assert read_box(store, t, Box((0, 0), (64, 32)))[0, 0] == 0
    cols = read_box(store, t, Box((8, 5), (10, 7)))  # a strided box: one vectorised copy
    assert cols.flags.owndata and np.array_equal(cols, a[8:18, 5:12])


def test_bf16_and_fp8_bits_survive(tmp_path):
    bits = np.arange(1 << 16, dtype=np.uint16)
    a = bits.view(ml_dtypes.bfloat16).reshape(256, 256)
    f8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(16, 16)
    store, recs, _ = _write(tmp_path, {"a": a, "f8": f8})
    got = read_box(store, TensorInfo("a", "bfloat16", a.shape, tuple(recs["a"])), Box((3, 7), (100, 200)))
    assert got.view(np.uint16).tobytes() == a[3:103, 7:207].view(np.uint16).tobytes()
    got = read_box(store, TensorInfo("f8", "float8_e4m3fn", f8.shape, tuple(recs["f8"])), Box((2, 1), (5, 9)))
    assert got.view(np.uint8).tobytes() == f8[2:7, 1:10].view(np.uint8).tobytes()


def test_checksums_catch_a_flipped_byte_only_where_read(tmp_path):
    a = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    store, recs, _ = _write(tmp_path, {"a": a})
    (chunk,) = recs["a"]
    p = tmp_path / "f.safetensors"
    data = bytearray(p.read_bytes())
    data[chunk.segments[0][0] + 255 * 256 * 4 + 9] ^= 1  # in the last row
    p.write_bytes(bytes(data))
    t = TensorInfo("a", "float32", a.shape, (chunk,))
    store = open_storage(str(tmp_path))  # a fresh store: a fresh mapping
    assert np.array_equal(read_box(store, t, Box((0, 0), (16, 256))), a[:16])  # untouched blocks verify fine
    with pytest.raises(ChecksumError, match="tensor 'a'.*chunk 0"):
        read_box(store, t, Box((250, 0), (6, 256)))
    assert read_box(store, t, Box((250, 0), (6, 256)), verify=False)[5, 2] != a[255, 2]


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path):
    a = np.ones((128, 128), np.float32)
    store, recs, _ = _write(tmp_path, {"a": a})
    p = tmp_path / "f.safetensors"
    p.write_bytes(p.read_bytes()[:-4096])
    with pytest.raises(FormatError, match="tensor 'a'.*truncated"):
        read_box(open_storage(str(tmp_path)), TensorInfo("a", "float32", a.shape, tuple(recs["a"])), Box((0, 0), (128, 128)))


def test_a_fifo_is_never_mapped(tmp_path):
    a = np.ones((4, 4), np.float32)
    store, recs, _ = _write(tmp_path, {"a": a})
    os.unlink(tmp_path / "f.safetensors")
    os.mkfifo(tmp_path / "f.safetensors")
    with pytest.raises(StorageError, match="not a regular file"):
        read_box(open_storage(str(tmp_path)), TensorInfo("a", "float32", a.shape, tuple(recs["a"])), Box((0, 0), (4, 4)))


def test_read_stats_count_each_mapped_byte_once():
    st = ReadStats()
    st.touch("f", 0, 100)
    st.touch("f", 50, 150)
    st.touch("g", 0, 10)
    st.touch("f", 0, 150)
    assert st.bytes_read == 160


def test_split_of_one_file_reads_it_once(tmp_path):
    """issue 11 E.28: splitting a single .ckpt into ranks by columns reads each source byte once."""
    rng = np.random.default_rng(1)
    full = {f"w{i}": rng.standard_normal((96, 128)).astype(np.float32) for i in range(4)}
    full["norm"] = rng.standard_normal(128).astype(np.float32)
    distckpt.save(full, tmp_path / "ck")
    distckpt.merge(tmp_path / "ck", tmp_path / "one.ckpt")
    from synth import make_strategy

    strat = make_strategy({**{f"w{i}": ([4], [-1, 0]) for i in range(4)}, "norm": ([4], [-1])})
    rep = distckpt.split(tmp_path / "one.ckpt", tmp_path / "out", dst_strategy=strat, format="ckpt")
    src_bytes = sum(a.nbytes for a in full.values())
    assert rep["read"]["bytes_needed"] >= src_bytes  # norm is needed by all four ranks
    assert rep["read"]["bytes_read"] <= src_bytes * 1.01, rep["read"]
