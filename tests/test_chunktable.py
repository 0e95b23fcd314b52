"""The columnar chunk table: exact tables, lookups against brute force, hostile bytes, zero-copy opens.

Oracles: a brute-force intersection of every chunk with every box (plain Python), an independent
safetensors reader/writer written here (``_parse``/``_blob``) for the hostile mutations, and
the table's own records for round trips and concat.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import random
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distckpt import chunktable as ct
from distckpt.chunktable import (
    CRC_FORMAT,
    TABLE_FORMAT,
    ChunkRecord,
    ChunkTable,
    Segments,
    TableMerger,
    TensorSpecs,
    concat,
)
from distckpt.errors import FormatError, LayoutError

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ helpers
def _cuts(n: int, k: int) -> list[tuple[int, int]]:
    """np.array_split-style (offset, size) pieces of a dim of n into k."""
    sizes = [len(a) for a in np.array_split(np.arange(n), k)]
    offs = np.cumsum([0, *sizes[:-1]]).tolist()
    return list(zip(offs, sizes))


def _grid_boxes(shape, splits) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    per_dim = [_cuts(n, k) for n, k in zip(shape, splits)]
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((), ())]
    for pieces in per_dim:
        boxes = [(o + (po,), s + (ps,)) for o, s in boxes for po, ps in pieces]
    return boxes


def _records(tensors, *, n_files=2, seed=0, block_sizes=(0, 4, 16), segmented=()):
    """Records for ``tensors`` = [(shape, itemsize, boxes)], laid out in files round-robin.

    Returns (records, file_sizes).  ``segmented`` lists (tensor, chunk#) whose bytes are split in
    two segments with a 3-byte hole between them.
    """
    rnd = random.Random(seed)
    pos = [0] * n_files
    recs = []
    k = 0
    for t, (_shape, item, boxes) in enumerate(tensors):
        for c, (o, s) in enumerate(boxes):
            f = k % n_files
            k += 1
            n = math.prod(s) * item
            if (t, c) in segmented and n >= 2:
                a = n // 2
                segs = ((pos[f], a), (pos[f] + a + 3, n - a))
                pos[f] += n + 3
            else:
                segs = ((pos[f], n),)
                pos[f] += n
            bs = rnd.choice(block_sizes)
            crcs = tuple(rnd.getrandbits(32) for _ in range(-(-n // bs))) if bs else None
            recs.append(ChunkRecord(t, o, s, f, segs, crcs, bs))
    return recs, [p + 5 for p in pos]


def _table(tensors, **kw):
    recs, fsz = _records(tensors, **kw)
    shapes = [t[0] for t in tensors]
    items = [t[1] for t in tensors]
    table = ChunkTable.from_records(recs, tensor_shapes=shapes, tensor_itemsizes=items, file_sizes=fsz, where="t")
    return table, recs, shapes, items, fsz


def _open(blobs, shapes, items, fsz, **kw):
    tb, cb = blobs
    return ChunkTable.from_buffer(tb, cb, n_tensors=len(shapes), file_sizes=fsz, tensor_shapes=shapes,
                                  tensor_itemsizes=items, where="blob", **kw)


def _brute(recs, t, off, size):
    """(chunk index in recs order, inter offsets, inter sizes) by plain Python."""
    out = []
    for i, r in enumerate(recs):
        if r.tensor != t:
            continue
        lo = [max(a, b) for a, b in zip(r.offsets, off)]
        hi = [min(a + m, b + n) for a, m, b, n in zip(r.offsets, r.sizes, off, size)]
        if all(h > x for x, h in zip(lo, hi)):
            out.append((i, tuple(lo), tuple(h - x for x, h in zip(lo, hi))))
    return out


def _sorted(recs):
    return sorted(recs, key=lambda r: (r.tensor, r.offsets))


def _parse(blob: bytes):
    """Independent reader: (metadata, {name: array copy}) of a safetensors blob."""
    n = struct.unpack("<Q", blob[:8])[0]
    head = json.loads(blob[8 : 8 + n])
    meta = head.pop("__metadata__")
    dt = {"I64": "<i8", "I32": "<i4", "U8": "u1", "U32": "<u4", "F32": "<f4"}
    cols = {}
    for k, v in head.items():
        a, b = v["data_offsets"]
        cols[k] = np.frombuffer(blob[8 + n + a : 8 + n + b], dtype=dt[v["dtype"]]).reshape(v["shape"]).copy()
    return meta, cols


def _blob(cols: dict, meta: dict, *, raw_header: bytes | None = None) -> bytes:
    """Independent writer: columns in the given order, each 8-aligned."""
    names = {"<i8": "I64", "<i4": "I32", "|u1": "U8", "<u4": "U32", "<f4": "F32", "<i2": "I16"}
    head, data = {"__metadata__": meta}, b""
    for k, a in cols.items():
        a = np.ascontiguousarray(a)
        data += b"\0" * (-len(data) % 8)
        head[k] = {"dtype": names[a.dtype.str], "shape": list(a.shape), "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    js = raw_header if raw_header is not None else json.dumps(head).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js + data


TENSORS = [
    ((), 4, [((), ())]),  # scalar
    ((10,), 2, [((0,), (3,)), ((3,), (3,)), ((6,), (4,))]),  # uneven 1-D
    ((4, 6), 4, _grid_boxes((4, 6), (2, 3))),
    ((5, 7), 1, _grid_boxes((5, 7), (2, 2))),  # uneven 2-D
    ((3, 4, 5), 8, _grid_boxes((3, 4, 5), (2, 1, 2))),
    ((0, 3), 4, [((0, 0), (0, 3))]),  # empty tensor, one empty chunk
    ((0, 2), 4, []),  # empty tensor, no chunk
]


# ------------------------------------------------------------------ exact tables
def test_exact_columns_and_round_trip():
    table, recs, shapes, items, fsz = _table(TENSORS, segmented={(1, 2)})
    assert table.ndim == 3 and table.n_chunks == len(recs) and table.n_tensors == len(TENSORS)
    assert table.tensor_ptr.tolist() == [0, 1, 4, 10, 14, 18, 19, 19]
    assert table.tensor_max0.tolist() == [1, 4, 2, 3, 2, 0, 0]
    assert table.offsets.dtype == np.int32 and table.sizes.dtype == np.int32
    assert table.offsets[0].tolist() == [0, 0, 0] and table.sizes[0].tolist() == [1, 1, 1]  # scalar: all padding
    assert table.offsets[2].tolist() == [3, 0, 0] and table.sizes[2].tolist() == [3, 1, 1]
    assert table.start[3] == -1 and table.seg_chunk.tolist() == [3]  # the segmented 1-D chunk
    assert table.segments(3) == list(recs[3].segments)
    assert table.to_records() == _sorted(recs)
    blobs = table.to_bytes()
    again = _open(blobs, shapes, items, fsz, check=True)
    assert again.to_records() == _sorted(recs)
    assert again.to_bytes() == blobs
    meta, cols = _parse(blobs[0])
    assert meta["format"] == TABLE_FORMAT and meta["version"] == "1" and int(meta["n_crcs"]) == table.n_crcs
    assert set(cols) == {"tensor_ptr", "tensor_max0", "start", "crc_start", "seg_chunk", "seg_ptr", "seg_start",
                         "seg_len", "offsets", "sizes", "file", "file_rank", "block_log2"}
    assert _parse(blobs[1])[0]["format"] == CRC_FORMAT


def test_lookup_exact_table():
    boxes = _grid_boxes((4, 6), (2, 3))  # rows [0,2),[2,4); cols [0,2),[2,4),[4,6)
    table, recs, *_ = _table([((4, 6), 4, boxes)])
    ids, io, isz = table.overlapping(0, (1, 1), (2, 4))
    assert ids.tolist() == [0, 1, 2, 3, 4, 5]
    assert io.tolist() == [[1, 1], [1, 2], [1, 4], [2, 1], [2, 2], [2, 4]]
    assert isz.tolist() == [[1, 1], [1, 2], [1, 1], [1, 1], [1, 2], [1, 1]]
    ids, io, isz = table.overlapping(0, (2, 2), (2, 2))
    assert ids.tolist() == [4] and io.tolist() == [[2, 2]] and isz.tolist() == [[2, 2]]
    ids, _, _ = table.overlapping(0, (0, 0), (0, 6))  # empty box: nothing
    assert ids.tolist() == []
    h = table.overlapping_many([0, 0], [[0, 0], [3, 5]], [[4, 6], [1, 1]])
    assert h.ptr.tolist() == [0, 6, 7] and h.chunk_ids.tolist() == [0, 1, 2, 3, 4, 5, 5]
    assert h.chunk_offsets[-1].tolist() == [2, 4] and h.chunk_sizes[-1].tolist() == [2, 2]
    assert h.length.tolist() == [16] * 7 and h.file.tolist() == [r.file for r in recs] + [recs[5].file]
    assert h.start.tolist() == [r.segments[0][0] for r in recs] + [recs[5].segments[0][0]]


@pytest.mark.parametrize("t", range(len(TENSORS)))
def test_lookup_equals_brute_force_all_boxes(t):
    table, recs, shapes, *_ = _table(TENSORS, segmented={(1, 2)})
    recs = _sorted(recs)
    shape = shapes[t]
    rnd = random.Random(t)
    for _ in range(40):
        off = tuple(rnd.randint(0, n) for n in shape)
        size = tuple(rnd.randint(0, n - o) for n, o in zip(shape, off))
        ids, io, isz = table.overlapping(t, off, size, cover=False)
        want = _brute(recs, t, off, size)
        assert ids.tolist() == [i for i, _, _ in want]
        assert [tuple(x) for x in io.tolist()] == [o for _, o, _ in want]
        assert [tuple(x) for x in isz.tolist()] == [s for _, _, s in want]


def test_int64_coordinates_when_a_dim_exceeds_int32():
    n = (1 << 31) + 6
    tensors = [((n,), 1, [((0,), (n - 4,)), ((n - 4,), (4,))])]
    recs = [ChunkRecord(0, (0,), (n - 4,), 0, ((0, n - 4),)), ChunkRecord(0, (n - 4,), (4,), 1, ((0, 4),))]
    table = ChunkTable.from_records(recs, tensor_shapes=[(n,)], tensor_itemsizes=[1], file_sizes=[n, 4])
    assert table.offsets.dtype == np.int64
    again = _open(table.to_bytes(), [(n,)], [1], [n, 4], check=True)
    assert again.to_records() == recs
    ids, io, isz = again.overlapping(0, (n - 5,), (3,))
    assert ids.tolist() == [0, 1] and io.tolist() == [[n - 5], [n - 4]] and isz.tolist() == [[1], [2]]
    del tensors


def test_table_bytes_per_chunk():
    for shape, splits, want in (((4096, 4096), (100, 100), 37), ((64, 512, 512), (20, 20, 25), 45)):
        boxes = _grid_boxes(shape, splits)
        C = len(boxes)
        t = ChunkTable.from_arrays(
            tensor_ids=np.zeros(C, np.int64), offsets=np.array([b[0] for b in boxes]), sizes=np.array([b[1] for b in boxes]),
            file=np.zeros(C, np.int64), start=np.zeros(C, np.int64), tensor_shapes=[shape], tensor_itemsizes=[2],
            file_sizes=[1 << 40], check=False,
        )
        assert len(t.to_bytes()[0]) / C == pytest.approx(want, abs=0.15)  # + the header


def test_blocks_for_ranges_and_read_path():
    recs = [
        ChunkRecord(0, (0,), (10,), 0, ((0, 40),), (11, 12, 13), 16),  # 40 bytes: blocks [0,16) [16,32) [32,40)
        ChunkRecord(0, (10,), (2,), 0, ((40, 8),)),  # no checksums
    ]
    table = ChunkTable.from_records(recs, tensor_shapes=[(12,)], tensor_itemsizes=[4], file_sizes=[48])
    b = table.blocks_for([0, 0, 0, 1, 0], [0, 15, 33, 2, 5], [1, 17, 40, 6, 5])
    assert b.lo.tolist() == [0, 0, 32, 2, 0] and b.hi.tolist() == [16, 32, 40, 6, 0]
    assert b.block_size.tolist() == [16, 16, 16, 0, 16]
    assert b.ptr.tolist() == [0, 1, 3, 4, 4, 4] and b.crcs.tolist() == [11, 11, 12, 13]
    tb, cb = table.to_bytes()
    lazy = _open((tb, None), [(12,)], [4], [48])
    calls = []

    def read(off, n):
        calls.append((off, n))
        return cb[off : off + n]

    b2 = lazy.blocks_for([0, 0, 0, 1, 0], [0, 15, 33, 2, 5], [1, 17, 40, 6, 5], read=read)
    assert b2.crcs.tolist() == b.crcs.tolist()
    assert len(calls) == 3  # header length, header, one merged run of checksums
    with pytest.raises(ValueError, match="without its crc blob"):
        lazy.blocks_for([0], [0], [1])
    h = table.overlapping_many([0], [[8]], [[4]])
    assert h.block_spans([33, 0], [40, 8]).crc_lo.tolist() == [2, 0]
    with pytest.raises(LayoutError, match="not inside"):
        table.blocks_for([0], [0], [41])


@pytest.mark.parametrize("gap,batch", [(0, 1), (3, 5), (1024, 1 << 20)])
def test_crcs_read_through_callable_equal_the_column(monkeypatch, gap, batch):
    import distckpt.chunktable as ct

    monkeypatch.setattr(ct, "CRC_GAP", gap)
    monkeypatch.setattr(ct, "CRC_BATCH", batch)
    table, recs, shapes, items, fsz = _table(TENSORS, block_sizes=(2, 4, 8), seed=5)
    tb, cb = table.to_bytes()
    lazy = _open((tb, None), shapes, items, fsz)
    rnd = random.Random(gap)
    ids = np.array([rnd.randrange(table.n_chunks) for _ in range(50)])
    length = table.lengths(ids)
    lo = np.array([rnd.randint(0, int(n)) for n in length])
    hi = np.array([rnd.randint(int(a), int(n)) for a, n in zip(lo, length)])
    want = table.blocks_for(ids, lo, hi)
    got = lazy.blocks_for(ids, lo, hi, read=lambda off, n: cb[off : off + n])
    assert got.crcs.tolist() == want.crcs.tolist() and got.ptr.tolist() == want.ptr.tolist()
    assert 0 < lazy.crc_bytes_read <= 4 * table.n_crcs  # runs are disjoint


def test_partial_tables_and_concat_equal_the_whole():
    boxes = _grid_boxes((6, 4), (3, 2))
    shapes, items = [(6, 4), (5,)], [4, 2]
    all_recs, per_rank = [], {0: [], 1: [], 2: []}
    pos = [0, 0, 0]
    for t, bx in ((0, boxes), (1, [((0,), (2,)), ((2,), (3,))])):
        for k, (o, s) in enumerate(bx):
            r = k % 3
            n = math.prod(s) * items[t]
            rec = ChunkRecord(t, o, s, r, ((pos[r], n),), tuple(range(-(-n // 8))), 8)
            all_recs.append(rec)
            per_rank[r].append(ChunkRecord(t, o, s, 0, rec.segments, rec.crcs, 8))
            pos[r] += n
    specs = TensorSpecs.of(shapes, items)
    ranks = [
        ChunkTable.from_records(per_rank[r], tensor_shapes=specs, file_sizes=[pos[r]], file_rank=[r], partial=True)
        for r in range(3)
    ]
    with pytest.raises(FormatError, match="gap"):
        ChunkTable.from_records(per_rank[0], tensor_shapes=specs, file_sizes=[pos[0]])
    blobs = [r.to_bytes() for r in ranks]
    reopened = [ChunkTable.from_buffer(tb, cb, n_tensors=2, file_sizes=[pos[r]], tensor_shapes=specs, where=f"r{r}",
                                       partial=True, check=True) for r, (tb, cb) in enumerate(blobs)]
    merged = concat(reopened)
    merged.check(files=True)
    whole = ChunkTable.from_records(all_recs, tensor_shapes=specs, file_sizes=pos, file_rank=[0, 1, 2])
    assert merged.to_records() == whole.to_records()
    assert merged.ranks(np.arange(merged.n_chunks)).tolist() == [r.file for r in whole.to_records()]
    # files placed explicitly: rank r's file goes to global slot 2 - r
    shuffled = concat(reopened, [2, 1, 0])
    assert [r.file for r in shuffled.to_records()] == [2 - r.file for r in whole.to_records()]
    with pytest.raises(LayoutError, match="overlap"):
        concat(reopened, [0, 0, 1])
    with pytest.raises(LayoutError, match="different tensors"):
        other = ChunkTable.from_records([], tensor_shapes=[(6, 4), (6,)], tensor_itemsizes=items, file_sizes=[], partial=True)
        concat([reopened[0], other])


def test_merger_of_ranks_with_their_own_tensors_equals_the_whole():
    """Each rank's table lists only the tensors it wrote (its own ids, its own ndim); the merge maps
    them onto the union and equals the table built from every record at once."""
    shapes, items = [(6, 4), (5,), (2, 3, 4)], [4, 2, 1]
    boxes = {0: _grid_boxes((6, 4), (3, 1)), 1: [((0,), (2,)), ((2,), (3,))], 2: _grid_boxes((2, 3, 4), (1, 3, 1))}
    owner = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 2, (1, 1): 2, (2, 0): 1, (2, 1): 0, (2, 2): 0}
    pos = [0, 0, 0]
    all_recs, per_rank = [], {0: [], 1: [], 2: []}
    segs = {(1, 1)}  # one segmented chunk travels with its rank
    for t, bx in boxes.items():
        for k, (o, sz) in enumerate(bx):
            r = owner[(t, k)]
            n = math.prod(sz) * items[t]
            seg = ((pos[r], 2), (pos[r] + 5, n - 2)) if (t, k) in segs else ((pos[r], n),)
            pos[r] += n + (3 if (t, k) in segs else 0)
            crcs = tuple(range(100 * r + k, 100 * r + k + (-(-n // 4)))) if (t + k) % 2 else None
            all_recs.append(ChunkRecord(t, o, sz, r, seg, crcs, 4 if crcs else 0))
            per_rank[r].append((t, ChunkRecord(0, o, sz, 0, seg, crcs, 4 if crcs else 0)))
    specs = TensorSpecs.of(shapes, items, ["a", "b", "c"])
    merger = TableMerger(specs, where="m")
    for r in (2, 0, 1):  # any order; files numbered in the order added
        mine = sorted({t for t, _ in per_rank[r]})
        local = TensorSpecs.of([shapes[t] for t in mine], [items[t] for t in mine])
        recs = [ChunkRecord(mine.index(t), rec.offsets, rec.sizes, 0, rec.segments, rec.crcs, rec.block_size)
                for t, rec in per_rank[r]]
        tb = ChunkTable.from_records(recs, tensor_shapes=local, file_sizes=[pos[r]], file_rank=[r], partial=True)
        tb2 = ChunkTable.from_buffer(*tb.to_bytes(), n_tensors=len(mine), file_sizes=[pos[r]], tensor_shapes=local,
                                     where=f"r{r}", partial=True)
        assert merger.add(tb2, mine) == [2, 0, 1].index(r)
        del tb, tb2
    merged = merger.finish(file_sizes=[pos[2], pos[0], pos[1]], file_rank=[2, 0, 1])
    merged.check(files=True)
    slot = {2: 0, 0: 1, 1: 2}
    whole = ChunkTable.from_records([ChunkRecord(r.tensor, r.offsets, r.sizes, slot[r.file], r.segments, r.crcs,
                                                 r.block_size) for r in all_recs],
                                    tensor_shapes=specs, file_sizes=[pos[2], pos[0], pos[1]], file_rank=[2, 0, 1])
    assert merged.to_records() == whole.to_records()
    # a table whose tensor is not the merged one's shape is refused, naming it
    bad = ChunkTable.from_records([], tensor_shapes=[(6, 5)], tensor_itemsizes=[4], file_sizes=[], partial=True,
                                  where="bad")
    with pytest.raises(LayoutError, match="bad"):
        TableMerger(specs, where="m").add(bad, [0])


def test_specs_take_and_crc_range():
    specs = TensorSpecs.of([(4,), (2, 3, 5), ()], [2, 4, 8], ["x", "y", "z"])
    sub = specs.take([2, 0])
    assert sub.names == ("z", "x") and sub.shapes.shape == (2, 1) and sub.shape(1) == (4,) and sub.shape(0) == ()
    assert sub.same(TensorSpecs.of([(), (4,)], [8, 2]))
    table, recs, shapes, items, fsz = _table(TENSORS)
    assert table.crc_range(0, table.n_crcs).tolist() == table.crcs.tolist()
    tb, cb = table.to_bytes()
    bare = _open((tb, None), shapes, items, fsz)
    reads = []

    def read(off, n):
        reads.append((off, n))
        return cb[off : off + n]

    assert bare.crc_range(3, 7, read=read).tolist() == table.crcs[3:7].tolist()
    assert reads[-1][1] == 16
    with pytest.raises(LayoutError, match="outside"):
        table.crc_range(0, table.n_crcs + 1)


@pytest.mark.parametrize("seed", range(3))
def test_few_requests_search_like_many(seed, monkeypatch):
    """Lookups of a few boxes search each tensor's rows with a scalar bisection; the vectorized
    bisection of big batches must find the same hits."""
    table, recs, shapes, *_ = _table(TENSORS, seed=seed)
    rnd = random.Random(seed)
    reqs = []
    for _ in range(30):
        t = rnd.randrange(len(TENSORS))
        off = tuple(rnd.randint(0, n) for n in shapes[t])
        size = tuple(rnd.randint(0, n - o) for n, o in zip(shapes[t], off))
        reqs.append((t, off, size))
    D = table.ndim

    def pad(v, fill):
        return list(v) + [fill] * (D - len(v))

    args = ([t for t, _, _ in reqs], [pad(o, 0) for _, o, _ in reqs], [pad(s, 1) for _, _, s in reqs])
    few = [table.overlapping_many([a], [b], [c]) for a, b, c in zip(*args)]
    monkeypatch.setattr(ct, "_FEW", 0)
    many = table.overlapping_many(*args)
    for r, h in enumerate(few):
        lo, hi = many.ptr[r], many.ptr[r + 1]
        assert h.chunk_ids.tolist() == many.chunk_ids[lo:hi].tolist()
        assert h.inter_offsets.tolist() == many.inter_offsets[lo:hi].tolist()


def test_pinwheel_tiling_takes_the_exact_path():
    # 3x3 pinwheel: four 1x2 / 2x1 arms around a 1x1 centre; not band-wise in any order
    boxes = [((0, 0), (2, 1)), ((0, 1), (1, 2)), ((1, 1), (1, 1)), ((1, 2), (2, 1)), ((2, 0), (1, 2))]
    table, recs, *_ = _table([((3, 3), 1, boxes)])
    recs = _sorted(recs)
    for off, size in (((0, 0), (3, 3)), ((1, 0), (1, 3)), ((0, 1), (3, 1)), ((2, 2), (1, 1))):
        ids, io, isz = table.overlapping(0, off, size)
        assert ids.tolist() == [i for i, _, _ in _brute(recs, 0, off, size)]
    bad = [((0, 0), (2, 1)), ((0, 1), (1, 2)), ((1, 0), (1, 2)), ((1, 2), (2, 1)), ((2, 0), (1, 2))]  # overlap at (1,0)
    with pytest.raises(FormatError, match="overlap"):
        _table([((3, 3), 1, bad)])
    # an overlap and a gap of the same size: the volumes add up, only the exact sweep sees it
    t = ChunkTable.from_arrays(tensor_ids=[0, 0, 0], offsets=[[0, 0], [1, 0], [2, 2]], sizes=[[2, 4], [2, 2], [2, 2]],
                               file=[0, 0, 0], start=[0, 8, 12], tensor_shapes=[(4, 4)], tensor_itemsizes=[1],
                               file_sizes=[16], check=False)
    with pytest.raises(FormatError, match=r"chunk 0 .* and chunk 1 .* overlap"):
        t.check()


def test_scalar_only_table():
    recs = [ChunkRecord(1, (), (), 0, ((8, 2),)), ChunkRecord(0, (), (), 0, ((0, 8),), (5, 6), 4)]
    table = ChunkTable.from_records(recs, tensor_shapes=[(), ()], tensor_itemsizes=[8, 2], file_sizes=[10])
    assert table.ndim == 0 and table.offsets.shape == (2, 0)
    assert table.overlapping(1, (), ())[0].tolist() == [1]
    again = _open(table.to_bytes(), [(), ()], [8, 2], [10], check=True)
    assert again.to_records() == _sorted(recs)
    assert again.blocks_for([0], [5], [8]).crcs.tolist() == [6]
    with pytest.raises(FormatError, match="overlap|cover 2 of its 1"):
        ChunkTable.from_records([*recs, ChunkRecord(1, (), (), 0, ((0, 2),))], tensor_shapes=[(), ()],
                                tensor_itemsizes=[8, 2], file_sizes=[10])


def test_from_arrays_moves_segments_and_checksums_with_their_chunks():
    # three chunks given out of order; chunk given second (offset 0) has two segments and 2 checksums
    t = ChunkTable.from_arrays(
        tensor_ids=[0, 0, 0], offsets=[[4], [0], [2]], sizes=[[2], [2], [2]], file=[0, 0, 0], start=[20, 99, 10],
        block_log2=[2, 2, 0], crc_start=[2, 0, 0], crcs=[7, 8, 9, 10],
        segments=Segments(np.array([1]), np.array([0, 2]), np.array([0, 6]), np.array([4, 4])),
        tensor_shapes=[(6,)], tensor_itemsizes=[4], file_sizes=[32],
    )
    assert t.offsets[:, 0].tolist() == [0, 2, 4]
    assert t.start.tolist() == [-1, 10, 20] and t.segments(0) == [(0, 4), (6, 4)] and t.segments(2) == [(20, 8)]
    assert t.blocks_for([0, 2], [0, 0], [8, 8]).crcs.tolist() == [7, 8, 9, 10]
    recs = t.to_records()
    assert recs[0] == ChunkRecord(0, (0,), (2,), 0, ((0, 4), (6, 4)), (7, 8), 4)
    assert recs[2] == ChunkRecord(0, (4,), (2,), 0, ((20, 8),), (9, 10), 4)


def test_sort_paths_agree():
    """Shuffled rows sort like Python does, with the one-key argsort and with lexsort (huge dims)."""
    rnd = random.Random(3)
    for n in (7, (1 << 20) + 1):
        shape = (n, n, n)
        boxes = [((a, b, c), (x, y, z)) for a, x in ((0, 3), (3, n - 3)) for b, y in ((0, 1), (1, n - 1))
                 for c, z in ((0, 2), (2, n - 2))]
        rows = [(t, o, s) for t in range(8) for o, s in boxes]
        rnd.shuffle(rows)
        t = ChunkTable.from_arrays(
            tensor_ids=[r[0] for r in rows], offsets=[r[1] for r in rows], sizes=[r[2] for r in rows],
            file=[0] * len(rows), start=[0] * len(rows), tensor_shapes=[shape] * 8, tensor_itemsizes=[1] * 8,
            file_sizes=[1 << 61], check=False,
        )
        t.check()
        got = list(zip(t.tensor_of(np.arange(t.n_chunks)).tolist(), map(tuple, t.offsets.tolist())))
        assert got == sorted((r[0], r[1]) for r in rows)


def test_partial_table_lookups_do_not_require_cover():
    recs = [ChunkRecord(0, (0, 0), (2, 2), 0, ((0, 16),))]
    t = ChunkTable.from_records(recs, tensor_shapes=[(4, 2)], tensor_itemsizes=[4], file_sizes=[16], partial=True)
    assert t.overlapping(0, (0, 0), (4, 2))[0].tolist() == [0]
    with pytest.raises(FormatError, match="a gap"):
        t.overlapping(0, (0, 0), (4, 2), cover=True)


def test_bad_requests_are_layout_errors():
    table, *_ = _table(SIMPLE)
    with pytest.raises(LayoutError, match="not inside tensor"):
        table.overlapping(0, (3, 0), (2, 1))
    with pytest.raises(LayoutError, match="dims"):
        table.overlapping(0, (0,), (1,))
    with pytest.raises(LayoutError, match="outside"):
        table.overlapping_many([2], [[0, 0]], [[1, 1]])
    with pytest.raises(LayoutError, match="padded|not inside"):
        table.overlapping_many([1], [[0, 1]], [[1, 1]])  # tensor 1 is 1-D: dim 1 must be 0 / 1
    with pytest.raises(LayoutError, match="chunk id"):
        table.lengths([99])
    tb, cb = table.to_bytes()
    lazy = _open((tb, None), [s for s, _, _ in SIMPLE], [i for _, i, _ in SIMPLE], table.file_sizes.tolist())
    with pytest.raises(LayoutError, match="crc blob"):
        concat([lazy])
    lazy.attach_crcs(cb)
    assert concat([lazy]).to_records() == table.to_records()


# ------------------------------------------------------------------ properties
def _guillotine(rnd, o, s, depth, out):
    """Cut box o+s in two along a random dim, recursively: a tiling that is often not band-wise."""
    dims = [d for d in range(len(s)) if s[d] >= 2]
    if not dims or depth > 5 or rnd.random() < 0.3:
        out.append((o, s))
        return
    d = rnd.choice(dims)
    c = rnd.randint(1, s[d] - 1)
    _guillotine(rnd, o, s[:d] + (c,) + s[d + 1 :], depth + 1, out)
    _guillotine(rnd, o[:d] + (o[d] + c,) + o[d + 1 :], s[:d] + (s[d] - c,) + s[d + 1 :], depth + 1, out)


@st.composite
def tilings(draw):
    """(tensors, seed): 1-3 tensors of 0-3 dims, each a random grid or a random guillotine tiling."""
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        nd = rnd.randint(0, 3)
        shape = tuple(rnd.randint(0 if rnd.random() < 0.05 else 1, 7) for _ in range(nd))
        if rnd.random() < 0.5:
            per_dim = []
            for n in shape:
                cuts = sorted(rnd.sample(range(1, n), rnd.randint(0, max(n - 1, 0)))) if n > 1 else []
                b = [0, *cuts, n]
                per_dim.append([(b[i], b[i + 1] - b[i]) for i in range(len(b) - 1)])
            boxes = [((), ())]
            for pieces in per_dim:
                boxes = [(o + (po,), s + (ps,)) for o, s in boxes for po, ps in pieces]
        else:
            boxes = []
            _guillotine(rnd, (0,) * nd, shape, 0, boxes)
        rnd.shuffle(boxes)
        out.append((shape, rnd.choice([1, 2, 4, 8]), boxes))
    return out, rnd.randint(0, 1 << 30)


@PROPS
@given(tilings())
def test_property_lookup_round_trip(case):
    tensors, seed = case
    table, recs, shapes, items, fsz = _table(tensors, n_files=3, seed=seed)
    recs = _sorted(recs)
    blobs = table.to_bytes()
    again = _open(blobs, shapes, items, fsz)
    assert again.to_bytes() == blobs
    assert again.to_records() == recs
    rnd = random.Random(seed)
    for _ in range(6):
        t = rnd.randrange(len(shapes))
        off = tuple(rnd.randint(0, n) for n in shapes[t])
        size = tuple(rnd.randint(0, n - o) for n, o in zip(shapes[t], off))
        ids, io, isz = again.overlapping(t, off, size)
        want = _brute(recs, t, off, size)
        assert ids.tolist() == [i for i, _, _ in want]
        assert [tuple(x) for x in io.tolist()] == [o for _, o, _ in want]
        assert [tuple(x) for x in isz.tolist()] == [s for _, _, s in want]
    # many requests at once equal one at a time
    reqs = [(rnd.randrange(len(shapes)),) for _ in range(5)]
    offs = [tuple(rnd.randint(0, n) for n in shapes[t]) for (t,) in reqs]
    sizes = [tuple(rnd.randint(0, n - o) for n, o in zip(shapes[t], off)) for (t,), off in zip(reqs, offs)]
    D = table.ndim
    h = again.overlapping_many([t for (t,) in reqs], [list(o) + [0] * (D - len(o)) for o in offs],
                               [list(s) + [1] * (D - len(s)) for s in sizes])
    for r, ((t,), off, size) in enumerate(zip(reqs, offs, sizes)):
        assert h.chunk_ids[h.ptr[r] : h.ptr[r + 1]].tolist() == [i for i, _, _ in _brute(recs, t, off, size)]


@PROPS
@given(tilings(), st.integers(1, 4))
def test_property_concat_of_ranks_equals_table_of_all(case, world):
    tensors, seed = case
    rnd = random.Random(seed)
    shapes, items = [t[0] for t in tensors], [t[1] for t in tensors]
    specs = TensorSpecs.of(shapes, items)
    pos = [0] * world
    whole, mine = [], [[] for _ in range(world)]
    for t, (_shape, item, boxes) in enumerate(tensors):
        for o, s in boxes:
            r = rnd.randrange(world)
            n = math.prod(s) * item
            bs = rnd.choice([0, 2, 8])
            crcs = tuple(rnd.getrandbits(32) for _ in range(-(-n // bs))) if bs else None
            whole.append(ChunkRecord(t, o, s, r, ((pos[r], n),), crcs, bs))
            mine[r].append(ChunkRecord(t, o, s, 0, ((pos[r], n),), crcs, bs))
            pos[r] += n
    parts = [ChunkTable.from_records(m, tensor_shapes=specs, file_sizes=[pos[r]], file_rank=[r], partial=True)
             for r, m in enumerate(mine)]
    merged = concat([ChunkTable.from_buffer(*p.to_bytes(), n_tensors=len(shapes), file_sizes=[pos[r]],
                                            tensor_shapes=specs, where=f"r{r}", partial=True) for r, p in enumerate(parts)])
    merged.check(files=True)
    assert merged.to_records() == _sorted(whole)


# ------------------------------------------------------------------ hostile inputs
SIMPLE = [((4, 6), 4, _grid_boxes((4, 6), (2, 3))), ((5,), 2, [((0,), (2,)), ((2,), (3,))])]


@functools.lru_cache(maxsize=1)
def _simple():
    table, recs, shapes, items, fsz = _table(SIMPLE, block_sizes=(8,), segmented={(1, 1)})
    return table.to_bytes(), shapes, items, fsz


@pytest.fixture
def simple():
    return _simple()


def _mutated(simple, name, fn=None, *, crc=False, meta=None, drop=False, add=None):
    (tb, cb), shapes, items, fsz = simple
    m, cols = _parse(cb if crc else tb)
    if drop:
        del cols[name]
    elif fn is not None:
        cols[name] = fn(cols[name])
    if add:
        cols.update(add)
    m.update(meta or {})
    blob = _blob(cols, m)
    return (tb, blob) if crc else (blob, cb)


def _expect(simple, blobs, pattern, **kw):
    _, shapes, items, fsz = simple
    with pytest.raises(FormatError, match=pattern):
        _open(blobs, shapes, items, fsz, **kw).check(files=True)


def _set(i, v):
    def f(a):
        a = a.copy()
        a[i] = v
        return a
    return f


HOSTILE = [
    ("wrong dtype", "offsets", lambda a: a.astype("<f4"), "column 'offsets': dtype 'F32' is not one of"),
    ("wrong dtype int64 file", "file", lambda a: a.astype("<i8"), "column 'file' has dtype I64"),
    ("short column", "start", lambda a: a[:-1], "column 'start' has 7 rows"),
    ("wrong width", "sizes", lambda a: a[:, :1].copy(), r"column 'sizes' has shape \[8, 1\]"),
    ("file id out of range", "file", _set(2, 7), "names file 7; there are 2 files"),
    ("negative file id", "file", _set(0, -1), "names file -1"),
    ("offset outside shape", "offsets", _set((5, 1), 5), "not inside the shape"),
    ("negative size", "sizes", _set((1, 1), -2), "not inside the shape"),
    ("start past file end", "start", _set(4, 10**6), r"outside file #\d"),
    ("negative start", "start", _set(0, -5), "outside file"),
    ("start -1 not segmented", "start", _set(0, -1), "start -1 .segmented. but is not listed"),
    ("segmented with a start", "start", _set(7, 0), "lists chunk 7 .*not -1"),
    ("segment sum", "seg_len", _set(0, 1), r"segments of chunk 7 .* hold 4 bytes; its sizes x itemsize need 6"),
    ("segment past file end", "seg_start", _set(1, 10**6), "lies past the end of file"),
    ("seg ptr", "seg_ptr", _set(1, 5), "column 'seg_ptr' must strictly increase|seg_ptr"),
    ("crc start past column", "crc_start", _set(3, 10**6), "needs checksums"),
    ("crc shared", "crc_start", _set(1, 0), "share checksums|checksum blocks"),
    ("huge block", "block_log2", _set(0, 63), "block_log2 63"),
    ("ptr not monotone", "tensor_ptr", _set(1, 9), "decreases"),
    ("ptr not ending at C", "tensor_ptr", _set(-1, 7), "runs from 0 to 7; expected 0 to 8"),
    ("unsorted", "offsets", lambda a: a[[1, 0, 2, 3, 4, 5, 6, 7]], "not sorted"),
    ("overlap", "sizes", _set((0, 1), 4), "overlap"),
    ("gap", "sizes", _set((0, 1), 1), "a gap"),
    ("max0 too small", "tensor_max0", _set(0, 1), "tensor_max0"),
    ("max0 past dim", "tensor_max0", _set(0, 9), "tensor_max0"),
    ("padding", "offsets", _set((6, 1), 1), "not inside the shape"),
    ("file_rank", "file_rank", _set(0, -7), "file_rank"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_column(simple, case):
    _, name, fn, pattern = case
    _expect(simple, _mutated(simple, name, fn), pattern)


def test_hostile_structure(simple):
    _expect(simple, _mutated(simple, "file", drop=True), r"lacks column\(s\) \['file'\]")
    _expect(simple, _mutated(simple, "x", add={"x": np.zeros(1, np.int64)}), "unknown column")
    _expect(simple, _mutated(simple, "file", meta={"version": "2"}), "version '2' is not supported")
    _expect(simple, _mutated(simple, "file", meta={"format": "nope"}), "not a distckpt chunk table")
    _expect(simple, _mutated(simple, "file", meta={"n_crcs": "x1"}), "n_crcs")
    _expect(simple, _mutated(simple, "file", meta={"n_crcs": str(1 << 50)}), "at most 2..40")
    _expect(simple, _mutated(simple, "crc32c", lambda a: a[:-1], crc=True), "crc blob holds")
    # one checksum more than the chunks have blocks: it would belong to no chunk
    (tb, cb), *_ = simple
    extra = (_mutated(simple, "file", meta={"n_crcs": str(int(_parse(tb)[0]["n_crcs"]) + 1)})[0],
             _mutated(simple, "crc32c", lambda a: np.append(a, np.uint32(1)), crc=True)[1])
    _expect(simple, extra, "checksum blocks; the crc column has")
    _expect(simple, _mutated(simple, "crc32c", lambda a: a.astype("<i4"), crc=True), "U32")
    _expect(simple, _mutated(simple, "crc32c", crc=True, meta={"format": "x"}), "not a distckpt crc blob")
    (tb, cb), shapes, items, fsz = simple
    with pytest.raises(FormatError, match="8 file sizes|file_rank"):
        _open((tb, cb), shapes, items, fsz * 4, check=True)
    with pytest.raises(FormatError, match="n_tensors 3"):
        ChunkTable.from_buffer(tb, cb, n_tensors=3, file_sizes=fsz, tensor_shapes=shapes, tensor_itemsizes=items, where="x")


def test_hostile_header(simple):
    (tb, cb), shapes, items, fsz = simple
    n = struct.unpack("<Q", tb[:8])[0]
    head = tb[8 : 8 + n]
    dup = head.replace(b'{"__metadata__"', b'{"file":{"dtype":"I32","shape":[0],"data_offsets":[0,0]},"__metadata__"', 1)
    _expect(simple, (_blob({}, {}, raw_header=dup) + tb[8 + n :], cb), "duplicate key 'file'")
    _expect(simple, (struct.pack("<Q", 1 << 40) + tb[8:], cb), "exceeds the blob")
    _expect(simple, (tb[:5], cb), "shorter than the 8-byte header")
    _expect(simple, (struct.pack("<Q", 4) + b"[1] ", cb), "not an object")
    _expect(simple, (struct.pack("<Q", 4) + b"\xff\xfe  ", cb), "not valid JSON")
    # misaligned: an I64 column placed at data offset 4
    m, cols = _parse(tb)
    raw = {"__metadata__": m}
    data = b""
    for k, a in cols.items():
        if k == "start":
            data += b"\0" * 4
        raw[k] = {"dtype": {"<i8": "I64", "<i4": "I32", "|u1": "U8"}[a.dtype.str], "shape": list(a.shape),
                  "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    js = json.dumps(raw).encode()
    js += b" " * (-len(js) % 8)
    mis = struct.pack("<Q", len(js)) + js + data
    _expect(simple, (mis, cb), "column 'start': data at byte .* is not aligned to its 8-byte items")


def test_absurd_sizes_refused_before_allocating(simple):
    (tb, cb), shapes, items, fsz = simple
    m, cols = _parse(tb)
    head = {"__metadata__": m}
    for k, a in cols.items():
        head[k] = {"dtype": {"<i8": "I64", "<i4": "I32", "|u1": "U8"}[a.dtype.str], "shape": [0] * a.ndim, "data_offsets": [0, 0]}
    head["offsets"] = {"dtype": "I64", "shape": [1 << 40, 2], "data_offsets": [0, 1 << 44]}  # 16 TiB
    js = json.dumps(head).encode()
    js += b" " * (-len(js) % 8)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="run past the end"):
            _open((struct.pack("<Q", len(js)) + js, cb), shapes, items, fsz)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()
    with pytest.raises(FormatError, match="exceeds the"):
        _open((struct.pack("<Q", 1 << 30) + b"\0" * 100, cb), shapes, items, fsz)


def test_lookups_validate_what_they_return_without_check(simple):
    """A lazily opened table: lookups and accessors raise FormatError on the chunks they touch."""
    _, shapes, items, fsz = simple
    for name, fn, box, pattern in (
        ("file", _set(2, 7), ((0, 0), (4, 6)), "names file 7"),
        ("tensor_max0", _set(0, 1), ((1, 0), (2, 6)), "a gap"),  # the search starts too late
        ("tensor_ptr", _set(1, 5), ((0, 0), (4, 6)), "a gap"),  # a chunk moved to the next tensor
        ("sizes", _set((0, 1), 4), ((0, 0), (4, 6)), "overlap"),
        ("start", _set(2, 10**6), ((0, 0), (4, 6)), "outside file"),
    ):
        t = _open(_mutated(simple, name, fn), shapes, items, fsz)
        with pytest.raises(FormatError, match=pattern):
            t.overlapping(0, *box)
    # rows out of order that still tile the box: the lookup is complete, only check() objects
    t = _open(_mutated(simple, "offsets", lambda a: a[[1, 0, 2, 3, 4, 5, 6, 7]]), shapes, items, fsz)
    assert sorted(t.overlapping(0, (0, 0), (4, 6))[0].tolist()) == list(range(6))
    with pytest.raises(FormatError, match="not sorted"):
        t.check()
    t = _open(_mutated(simple, "crc_start", _set(3, 10**6)), shapes, items, fsz)
    with pytest.raises(FormatError, match="needs checksums"):
        t.blocks_for([3], [0], [4])


def test_file_level_overlaps_need_files_check():
    recs = [ChunkRecord(0, (0,), (2,), 0, ((0, 8),)), ChunkRecord(0, (2,), (2,), 0, ((4, 8),))]
    with pytest.raises(FormatError, match="share bytes of file"):
        ChunkTable.from_records(recs, tensor_shapes=[(4,)], tensor_itemsizes=[4], file_sizes=[16])
    t = ChunkTable.from_arrays(tensor_ids=[0, 0], offsets=[[0], [2]], sizes=[[2], [2]], file=[0, 0], start=[0, 4],
                               tensor_shapes=[(4,)], tensor_itemsizes=[4], file_sizes=[16], check=False)
    t.check()  # every per-chunk rule holds; only the byte overlap is wrong
    with pytest.raises(FormatError, match="share bytes"):
        t.check(files=True)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    try:
        t = ChunkTable.from_buffer(data, None, n_tensors=1, file_sizes=[100], tensor_shapes=[(4, 6)], tensor_itemsizes=[4],
                                   where="fuzz", check=True)
    except FormatError:
        return
    t.overlapping(0, (0, 0), (4, 6))


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_table(data):
    (tb, cb), shapes, items, fsz = _simple()
    buf = bytearray(tb)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    try:
        t = _open((bytes(buf), cb), shapes, items, fsz)
        t.overlapping(0, (0, 0), (4, 6))
        t.overlapping(1, (0,), (5,))
        t.check(files=True)
    except FormatError:
        pass


EXTREMES = [0, 1, -1, 2, 7, 8, 63, 64, 255, (1 << 31) - 1, -(1 << 31), 1 << 40, (1 << 62) + 1, (1 << 63) - 1, -(1 << 63)]


@FUZZ
@given(st.data())
def test_fuzz_column_values(data):
    """Any value (extremes included) in any cell of any column: only FormatError, from open,
    lookups, accessors or check."""
    (tb, cb), shapes, items, fsz = _simple()
    meta, cols = _parse(tb)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(cols)))
        a = cols[name]
        if not a.size:
            continue
        i = data.draw(st.integers(0, a.size - 1))
        info = np.iinfo(a.dtype)
        v = data.draw(st.sampled_from(EXTREMES) | st.integers(-3, 70))
        a.reshape(-1)[i] = min(max(v, info.min), info.max)
    try:
        t = _open((_blob(cols, meta), cb), shapes, items, fsz)
        t.overlapping(0, (0, 0), (4, 6))
        t.overlapping(1, (1,), (3,))
        t.blocks_for(np.arange(t.n_chunks), np.zeros(t.n_chunks, np.int64), t.lengths(np.arange(t.n_chunks)))
        t.check(files=True)
    except FormatError:
        pass


# ------------------------------------------------------------------ zero copy
def _big_grid(n_tensors=1000, grid=(40, 25), shape=(4000, 2500)):
    boxes = _grid_boxes(shape, grid)
    G = len(boxes)
    offs = np.tile(np.array([b[0] for b in boxes]), (n_tensors, 1))
    sizes = np.tile(np.array([b[1] for b in boxes]), (n_tensors, 1))
    lengths = np.prod(sizes, axis=1) * 2
    start = np.cumsum(lengths) - lengths
    table = ChunkTable.from_arrays(
        tensor_ids=np.repeat(np.arange(n_tensors), G), offsets=offs, sizes=sizes, file=np.zeros(len(offs), np.int64),
        start=start, tensor_shapes=[shape] * n_tensors, tensor_itemsizes=[2] * n_tensors,
        file_sizes=[int(lengths.sum())], check=False,
    )
    return table, int(lengths.sum())


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_open_of_a_million_chunks_from_mmap_copies_nothing(tmp_path):
    table, file_size = _big_grid()
    assert table.n_chunks == 10**6
    path = tmp_path / "chunks.safetensors"
    with open(path, "wb") as f:
        for part in table.to_parts()[0]:
            f.write(part)
    shapes = [(4000, 2500)] * 1000
    del table
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # closed when the last view goes
    before = _rss_mib()
    t = ChunkTable.from_buffer(mm, None, n_tensors=1000, file_sizes=[file_size], tensor_shapes=shapes,
                               tensor_itemsizes=[2] * 1000, where=str(path))
    grown = _rss_mib() - before
    whole = np.frombuffer(mm, dtype=np.uint8)
    for name in ("tensor_ptr", "offsets", "sizes", "start", "file", "crc_start", "block_log2"):
        assert np.shares_memory(getattr(t, name), whole), name
    assert grown < 16, f"opening grew RSS by {grown:.1f} MiB (the table is {os.path.getsize(path) >> 20} MiB)"
    h = t.overlapping_many(np.arange(1000), np.zeros((1000, 2), np.int64) + [1000, 500], np.zeros((1000, 2), np.int64) + [100, 100])
    assert (h.ptr[1:] - h.ptr[:-1]).tolist() == [1] * 1000  # the box is one chunk of every tensor
    assert (h.inter_sizes == 100).all()
