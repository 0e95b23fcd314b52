"""Index version 2 (small JSON root + columnar chunk table) and version 1 side by side.

Oracles: the arrays a checkpoint was saved from; version 1's own parser and lookup (the same
checkpoint written as version 1); the version-1 fixture written by distckpt before version 2
existed (``tests/data/v1ckpt``).  Hostile cases: every field of the root and of the blobs, each
refused with one error naming the file, from the API and from the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distckpt
from distckpt import chunktable as ct
from distckpt.errors import ChecksumError, DistCkptError, FormatError, StorageError
from distckpt.index import INDEX_NAME, CrcSpan, Index, TableChunks
from distckpt.layout import Box
from distckpt.storage import open_storage

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_v1ckpt  # noqa: E402


def _state(rank: int) -> dict:
    full = make_v1ckpt.full_state()
    strat = make_v1ckpt.STRATEGY
    out: dict = {"step": 3, "lr": 0.5}
    for k, v in full.items():
        if k in strat:
            b = strat.box(k, rank, v.shape)
            out[k] = np.ascontiguousarray(v[tuple(slice(o, o + s) for o, s in zip(b.offsets, b.sizes))])
        else:
            out[k] = v
    return out


def save_two_ranks(path, *, version: str | None = None) -> Path:
    """The fixture's checkpoint again, written now (version 2 unless ``version``)."""
    env = os.environ.get("DISTCKPT_INDEX_VERSION")
    try:
        if version is not None:
            os.environ["DISTCKPT_INDEX_VERSION"] = version
        for r in range(2):
            distckpt.save(_state(r), path, strategy=make_v1ckpt.STRATEGY, rank=r, block_size=4096,
                          metadata={"name": "v1fixture"})
        distckpt.finalize(path)
    finally:
        if env is None:
            os.environ.pop("DISTCKPT_INDEX_VERSION", None)
        else:
            os.environ["DISTCKPT_INDEX_VERSION"] = env
    return Path(path)


def _root(path) -> dict:
    return json.loads((Path(path) / INDEX_NAME).read_text())


def _write_root(path, doc) -> None:
    (Path(path) / INDEX_NAME).write_text(json.dumps(doc))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distckpt", *map(str, args)], capture_output=True, text=True, timeout=120)


def _assert_clean_cli_error(path, *needles):
    """``distckpt verify`` exits 1 with one ``error:`` line per problem found, no traceback."""
    res = _cli("verify", path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines and all(ln.startswith("error: ") for ln in lines) and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert any(n in ln for ln in lines), (n, lines)


def _assert_same(got: dict, want: dict) -> None:
    for k, v in want.items():
        g = got[k]
        if isinstance(v, np.ndarray) or isinstance(v, np.generic):
            g, v = np.asarray(g), np.asarray(v)
            assert g.dtype == v.dtype and g.shape == v.shape and g.tobytes() == v.tobytes(), k
        else:
            assert g == v, k


@pytest.fixture(scope="module")
def v2dir(tmp_path_factory):
    return save_two_ranks(tmp_path_factory.mktemp("v2") / "ck")


@pytest.fixture
def v2(v2dir, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(v2dir, dst)
    return dst


# ------------------------------------------------------------------ the format
def test_v2_layout_on_disk(v2):
    doc = _root(v2)
    assert doc["format"] == "distckpt" and doc["version"] == 2
    sid = doc["save_id"]
    names = sorted(os.listdir(v2))
    assert names == sorted([INDEX_NAME, f"chunks-{sid}.safetensors", f"crc32c-{sid}.bin", *doc["files"]["names"]])
    assert doc["tensors"]["names"] == ["b", "e", "s", "w", "x"]
    assert doc["tensors"]["shapes"] == [[5], [4, 6], [], [6, 4], [2, 4, 3]]
    assert sorted(doc["files"]["ranks"]) == [0, 1]
    tb = doc["chunks"]["table"]
    assert (v2 / tb["name"]).stat().st_size == tb["size"]
    assert crc32c.crc32c((v2 / tb["name"]).read_bytes()) == tb["crc32c"]
    assert doc["chunks"]["count"] == 1 + 2 + 1 + 2 + 2
    assert doc["values"] == {"lr": {"type": "float", "value": 0.5}, "step": {"type": "int", "value": 3}}
    assert doc["metadata"] == {"name": "v1fixture"}


def test_v2_reads_exactly_and_builds_objects_for_hits_only(v2):
    got = distckpt.load(v2)
    _assert_same(got, {**make_v1ckpt.full_state(), "step": 3, "lr": 0.5})
    src = distckpt.sources.open_source(v2)
    t = src.tensors["x"]
    assert isinstance(t.chunks, TableChunks) and len(t.chunks) == 2
    hits = t.overlapping(Box((0, 1, 0), (2, 1, 3)))
    assert [(i, c.box, inter) for i, c, inter in hits] == [(0, Box((0, 0, 0), (2, 2, 3)), Box((0, 1, 0), (2, 1, 3)))]
    c = hits[0][1]
    assert isinstance(c.crcs, CrcSpan) and len(c.crcs) == 1 and c.block_size == 4096
    whole = list(t.chunks)
    assert [ch.box for ch in whole] == [Box((0, 0, 0), (2, 2, 3)), Box((0, 2, 0), (2, 2, 3))]
    assert t.chunks[-1] == whole[1] and t.chunks[0:1] == whole[:1]


@pytest.mark.parametrize("seed", range(4))
def test_v2_lookup_agrees_with_v1_lookup(tmp_path, seed):
    """Random boxes: the table's hits are version 1's hits (its ChunkLookup over Chunk objects)."""
    rng = np.random.default_rng(seed)
    shape = (24, 10, 6)
    full = rng.standard_normal(shape).astype(np.float32)
    strat = {"parallel_layout_item": {"w": {"dev_matrix": [2, 3, 2], "tensor_map": [2, 0, 1]}}}
    from distckpt.strategy import load_strategy

    s = load_strategy(strat)
    for r in range(s.world_size):
        b = s.box("w", r, shape)
        distckpt.save({"w": np.ascontiguousarray(full[tuple(slice(o, o + z) for o, z in zip(b.offsets, b.sizes))])},
                      tmp_path / "ck", strategy=strat, rank=r)
    distckpt.finalize(tmp_path / "ck")
    src = distckpt.sources.open_source(tmp_path / "ck")
    v1 = Index.from_json(src.index.to_json())
    t2, t1 = src.tensors["w"], v1.tensors["w"]
    assert isinstance(t2.chunks, TableChunks) and isinstance(t1.chunks, tuple)
    for _ in range(50):
        o = [int(rng.integers(0, n)) for n in shape]
        z = [int(rng.integers(1, n - a + 1)) for a, n in zip(o, shape)]
        box = Box(tuple(o), tuple(z))
        h2 = sorted((c.box.offsets, c.box.sizes, inter.offsets, inter.sizes) for _i, c, inter in t2.overlapping(box))
        h1 = sorted((c.box.offsets, c.box.sizes, inter.offsets, inter.sizes) for _i, c, inter in t1.overlapping(box))
        assert h2 == h1
        got = src.read("w", box)
        assert np.array_equal(got, full[tuple(slice(a, a + n) for a, n in zip(o, z))])


def test_prefetch_answers_the_plan_in_one_pass(v2, monkeypatch):
    src = distckpt.sources.open_source(v2)
    boxes = [("w", Box((0, 0), (3, 4))), ("x", Box((0, 1, 0), (2, 3, 3))), ("e", Box((0, 2), (4, 2)))]
    direct = {n: [(i, c.box, inter) for i, c, inter in src.tensors[n].overlapping(b)] for n, b in boxes}
    src.index.prefetch(boxes)
    calls = []
    real = ct.ChunkTable.overlapping_many
    monkeypatch.setattr(ct.ChunkTable, "overlapping_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    for n, b in boxes:
        assert [(i, c.box, inter) for i, c, inter in src.tensors[n].overlapping(b)] == direct[n]
    assert calls == []  # all three answered from the prefetched plan
    src.tensors["w"].overlapping(boxes[0][1])
    assert calls == [1]  # a hit is used once, then forgotten


def test_checksums_are_fetched_for_touched_blocks_only(tmp_path):
    a = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)  # 256 KiB: 64 blocks of 4 KiB
    distckpt.save({"a": a}, tmp_path / "ck", block_size=4096)
    src = distckpt.sources.open_source(tmp_path / "ck")
    crcs = src.index.table.crcs
    assert crcs is not None and len(crcs) == 64
    seen = []
    real = ct.ChunkTable.crc_range
    src.index.table.crc_range = lambda lo, hi, read=None: seen.append((lo, hi)) or real(src.index.table, lo, hi, read=read)
    got = src.read("a", Box((8, 0), (8, 256)))  # rows 8..15 = bytes 8 KiB..16 KiB: blocks 2 and 3
    assert np.array_equal(got, a[8:16])
    assert seen == [(2, 4)]


@pytest.mark.parametrize("inline", [True, False])
def test_remote_store_reads_the_table_and_checksums_it_needs(v2, monkeypatch, inline):
    """A store that is not a local disk: the table (and a small checksum column) in one round of
    concurrent reads; a large checksum column stays there and is read by range, per chunk read."""
    import distckpt.index as index_mod

    if not inline:
        monkeypatch.setattr(index_mod, "MAX_INLINE_CRC_BYTES", 0)
    store = open_storage(v2)
    store.caps = type(store.caps)(**{**store.caps.__dict__, "local": False})  # pretend: no mmap
    ranges, batches = [], []
    real_range, real_many = store.read_range, store.read_many
    store.read_range = lambda name, start, n: ranges.append((name, start, n)) or real_range(name, start, n)
    store.read_many = lambda jobs, **k: batches.append([j[0] for j in jobs]) or real_many(jobs, **k)
    store.confined = True
    idx = Index.loads(store.read_bytes(INDEX_NAME), store=store)
    root = _root(v2)
    assert batches[0] == [root["chunks"]["table"]["name"]] + ([root["chunks"]["crcs"]["name"]] if inline else [])
    assert (idx.table.crcs is not None) == inline
    from distckpt.execute import read_box

    got = read_box(store, idx.tensors["w"], Box((0, 0), (6, 4)))
    assert np.array_equal(got, make_v1ckpt.full_state()["w"])
    if inline:
        assert ranges == []
    else:  # the header once, then one read per chunk touched (w has two)
        assert ranges and all(n == root["chunks"]["crcs"]["name"] for n, _s, _k in ranges) and len(ranges) == 4


def test_v1_fixture_still_reads_verifies_and_converts(tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(DATA / "v1ckpt", v1)
    assert _root(v1)["version"] == 1
    want = {**make_v1ckpt.full_state(), "step": 3, "lr": 0.5}
    _assert_same(distckpt.load(v1), want)
    assert distckpt.verify(v1)["ok"]
    info = distckpt.inspect(v1)
    assert {t["name"]: t["chunks"] for t in info["tensors"]} == {"w": 2, "e": 2, "b": 1, "x": 2, "s": 1}
    # one rank of a 3-way layout reads its slice from the v1 index
    strat3 = {"parallel_layout_item": {"w": {"dev_matrix": [3], "tensor_map": [0, -1]}}}
    got = distckpt.load(v1, strategy=strat3, rank=2)
    assert np.array_equal(got["w"], want["w"][4:6])
    # resharded into version 2, it reads the same
    distckpt.reshard(v1, tmp_path / "r2", dst_strategy=strat3)
    assert _root(tmp_path / "r2")["version"] == 2
    _assert_same(distckpt.load(tmp_path / "r2"), want)
    assert distckpt.verify(tmp_path / "r2")["ok"]
    # gc next to a v1 index deletes nothing that index names
    assert distckpt.gc(v1) == []


def test_v1_can_still_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_INDEX_VERSION", "1")
    save_two_ranks(tmp_path / "ck")
    doc = _root(tmp_path / "ck")
    assert doc["version"] == 1 and sorted(os.listdir(tmp_path / "ck")) == sorted([INDEX_NAME, *doc["files"]])
    _assert_same(distckpt.load(tmp_path / "ck"), {**make_v1ckpt.full_state(), "step": 3})
    monkeypatch.setenv("DISTCKPT_INDEX_VERSION", "7")
    with pytest.raises(DistCkptError, match="index version"):
        distckpt.save({"a": np.ones(2)}, tmp_path / "bad")


def test_v2_and_v1_of_the_same_save_describe_the_same_chunks(tmp_path):
    v2p = save_two_ranks(tmp_path / "two")
    v1p = save_two_ranks(tmp_path / "one", version="1")
    a = distckpt.sources.open_source(v2p).index
    b = distckpt.sources.open_source(v1p).index
    assert list(a.tensors) == sorted(b.tensors)
    for n, t in a.tensors.items():
        got = sorted((c.box.offsets, c.box.sizes, c.nbytes, tuple(c.crcs or ()), c.block_size) for c in t.chunks)
        want = sorted((c.box.offsets, c.box.sizes, c.nbytes, tuple(c.crcs or ()), c.block_size) for c in b.tensors[n].chunks)
        assert got == want, n
    # and the root alone (no store) still knows tensors, files and values (gc, metrics)
    root = Index.loads((v2p / INDEX_NAME).read_bytes())
    assert root.table is None and root.values == {"step": 3, "lr": 0.5} and set(root.files) == set(a.files)
    with pytest.raises(FormatError, match="not opened"):
        len(root.tensors["w"].chunks)


def test_empty_and_scalar_only_checkpoints(tmp_path):
    distckpt.save({"step": 5}, tmp_path / "v")
    assert distckpt.load(tmp_path / "v") == {"step": 5}
    distckpt.save({"s": np.float32(1.5), "z": np.zeros((0, 3), np.int8)}, tmp_path / "s")
    got = distckpt.load(tmp_path / "s")
    assert got["s"] == np.float32(1.5) and got["z"].shape == (0, 3)
    assert distckpt.verify(tmp_path / "s")["ok"]


# ------------------------------------------------------------------ hostile roots
def _dup_key(path):
    text = (path / INDEX_NAME).read_text()
    (path / INDEX_NAME).write_text(text.replace('"version":2', '"version":2,"version":1', 1))


ROOT_CASES = [
    (lambda d: d["files"]["names"].__setitem__(0, "../../etc/passwd"), "refusing"),
    (lambda d: d["files"]["names"].__setitem__(1, d["files"]["names"][0]), "twice"),
    (lambda d: d["files"]["sizes"].__setitem__(0, -5), "size"),
    (lambda d: d["files"]["sizes"].__setitem__(0, 3), "outside file"),
    (lambda d: d["files"]["sizes"].pop(), "entries"),
    (lambda d: d["files"]["ranks"].__setitem__(0, True), "rank"),
    (lambda d: d["files"]["ranks"].__setitem__(0, 9), "writer ranks"),
    (lambda d: [d["files"][k].pop() for k in ("names", "sizes", "ranks")], "file_rank"),
    (lambda d: d["tensors"]["names"].__setitem__(1, "b"), "twice"),
    (lambda d: d["tensors"]["names"].__setitem__(1, 7), "names are strings"),
    (lambda d: d["tensors"]["dtypes"].__setitem__(0, "object"), "dtype"),
    (lambda d: d["tensors"]["dtypes"].__setitem__(3, "int8"), "file"),
    (lambda d: d["tensors"]["shapes"].__setitem__(3, [6, 5]), "w"),
    (lambda d: d["tensors"]["shapes"].__setitem__(3, [2**40, 2**40]), "2**62"),
    (lambda d: d["tensors"]["shapes"].__setitem__(3, [-1, 4]), "shape"),
    (lambda d: d["tensors"]["shapes"].pop(), "entries"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(version=True), "version"),
    (lambda d: d.pop("chunks"), "chunk table"),
    (lambda d: d["chunks"]["table"].update(name="../chunks-x.safetensors"), "refusing"),
    (lambda d: d["chunks"]["table"].update(name="model.safetensors"), "not a distckpt index blob"),
    (lambda d: d["chunks"]["table"].update(name=d["chunks"]["crcs"]["name"]), "not a distckpt index blob"),
    (lambda d: d["chunks"]["table"].update(size=d["chunks"]["table"]["size"] + 1), "the index says"),
    (lambda d: d["chunks"]["table"].update(size=-1), "size"),
    (lambda d: d["chunks"]["table"].update(crc32c=2**40), "crc32c"),
    (lambda d: d["chunks"].update(count=d["chunks"]["count"] + 1), "chunks, the index says"),
    (lambda d: d["chunks"]["crcs"].update(count=d["chunks"]["crcs"]["count"] + 1), "checksums"),
    (lambda d: d["chunks"]["crcs"].update(size=d["chunks"]["crcs"]["size"] - 4), "the index says"),
    (lambda d: d["chunks"]["crcs"].update(name="crc32c-20200101T000000-00000000.bin"), "missing"),
]


@pytest.mark.parametrize("mutate, needle", ROOT_CASES)
def test_hostile_root_is_refused(v2, mutate, needle):
    doc = _root(v2)
    mutate(doc)
    _write_root(v2, doc)
    with pytest.raises(DistCkptError) as ei:
        distckpt.load(v2)
    msg = str(ei.value)
    assert needle in msg
    assert str(v2) in msg or any(n in msg for n in os.listdir(v2)), msg  # names the file it is about
    _assert_clean_cli_error(v2, needle)


def test_duplicate_keys_in_the_root(v2):
    _dup_key(v2)
    with pytest.raises(FormatError, match="duplicate key"):
        distckpt.load(v2)
    _assert_clean_cli_error(v2, "duplicate key", INDEX_NAME)


# ------------------------------------------------------------------ hostile blobs
def _table_path(path) -> Path:
    return Path(path) / _root(path)["chunks"]["table"]["name"]


def _crc_path(path) -> Path:
    return Path(path) / _root(path)["chunks"]["crcs"]["name"]


def _columns(path) -> tuple[dict, dict]:
    meta, cols, _ = ct._decode(_table_path(path).read_bytes(), "t", "chunk table")
    return meta, {k: np.array(v) for k, v in cols.items()}


def _rewrite(path, data: bytes, which=_table_path, fix_root: bool = True) -> None:
    p = which(path)
    p.write_bytes(data)
    if fix_root:
        doc = _root(path)
        ent = doc["chunks"]["table"] if which is _table_path else doc["chunks"]["crcs"]
        ent["size"], ent["crc32c"] = len(data), crc32c.crc32c(data)
        _write_root(path, doc)


def _encode(meta: dict, cols: dict) -> bytes:
    return b"".join(bytes(p) for p in ct._encode(list(cols.items()), meta))


def _col_case(fn):
    def mutate(meta, cols):
        fn(meta, cols)
        return _encode(meta, cols)

    return mutate


TABLE_CASES = [
    (_col_case(lambda m, c: c["file"].__setitem__(0, 7)), "names file 7"),  # a file the root does not list
    (_col_case(lambda m, c: c["file"].__setitem__(0, -1)), "names file -1"),
    (_col_case(lambda m, c: c["offsets"].__setitem__((0, 0), -3)), "not inside the shape"),
    (_col_case(lambda m, c: c["sizes"].__setitem__((3, 0), 100)), "not inside the shape"),
    (_col_case(lambda m, c: c["start"].__setitem__(0, 1 << 40)), "outside file"),
    (_col_case(lambda m, c: c["start"].__setitem__(0, -7)), "start"),
    (_col_case(lambda m, c: c["crc_start"].__setitem__(0, 1 << 30)), "crc_start"),
    (_col_case(lambda m, c: c["block_log2"].__setitem__(0, 200)), "block_log2"),
    (_col_case(lambda m, c: c.update(start=c["start"][:-1])), "rows"),
    (_col_case(lambda m, c: c.update(offsets=c["offsets"].astype(np.int64)[:, :1])), "offsets"),
    (_col_case(lambda m, c: c.update(file=c["file"].astype(np.int64))), "dtype"),
    (_col_case(lambda m, c: c.update(file_rank=c["file_rank"].astype(np.uint32))), "dtype"),
    (_col_case(lambda m, c: c.pop("tensor_max0")), "lacks column"),
    (_col_case(lambda m, c: c.update(extra=np.zeros(3, np.int64))), "unknown column"),
    (_col_case(lambda m, c: c["tensor_ptr"].__setitem__(-1, 99)), "tensor_ptr"),
    (_col_case(lambda m, c: c["tensor_ptr"].__setitem__(2, 0)), "tensor_ptr"),
    (_col_case(lambda m, c: c["tensor_max0"].__setitem__(3, 99)), "tensor_max0"),
    (_col_case(lambda m, c: c["file_rank"].__setitem__(0, -5)), "file_rank"),
    (_col_case(lambda m, c: m.update(version="9")), "version"),
    (_col_case(lambda m, c: m.update(format="other")), "not a distckpt chunk table"),
    (_col_case(lambda m, c: m.update(n_crcs="x")), "n_crcs"),
    (lambda m, c: (1 << 40).to_bytes(8, "little") + b"{}", "header length"),
    (lambda m, c: _encode(m, c)[:-9], "data_offsets"),
    (lambda m, c: _encode(m, c).replace(b'"file_rank"', b'"file"', 1), "duplicate key"),
    (lambda m, c: b"\x00" * 3, "shorter"),
]


@pytest.mark.parametrize("make, needle", TABLE_CASES)
def test_hostile_table_is_refused_naming_it(v2, make, needle):
    meta, cols = _columns(v2)
    name = _table_path(v2).name
    _rewrite(v2, make(meta, cols))
    with pytest.raises(DistCkptError) as ei:
        distckpt.load(v2)
    assert needle in str(ei.value) and name in str(ei.value), str(ei.value)
    _assert_clean_cli_error(v2, name)


def test_table_swapped_for_another_is_refused(v2):
    meta, cols = _columns(v2)
    cols["block_log2"][0] = 13  # another valid block size (the chunk is one block either way)
    _rewrite(v2, _encode(meta, cols), fix_root=False)  # same size: only the root's crc32c tells
    rep = distckpt.verify(v2, raise_errors=False)
    assert not rep["ok"] and "crc32c" in rep["problems"][0]["what"] and _table_path(v2).name in rep["problems"][0]["what"]


def test_crc_blob_too_short_or_wrong(v2):
    data = _crc_path(v2).read_bytes()
    name = _crc_path(v2).name
    _rewrite(v2, data[:-4], which=_crc_path, fix_root=False)
    with pytest.raises(FormatError, match="the index says"):
        distckpt.load(v2)
    _rewrite(v2, data[:-4], which=_crc_path)  # the root agrees on the size: too short for its checksums
    with pytest.raises(FormatError) as ei:
        distckpt.load(v2)
    assert name in str(ei.value)
    _assert_clean_cli_error(v2, name)
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    _rewrite(v2, bytes(bad), which=_crc_path)
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        distckpt.load(v2)


def test_missing_table_is_refused(v2):
    _table_path(v2).unlink()
    with pytest.raises(FormatError, match="missing"):
        distckpt.load(v2)
    _assert_clean_cli_error(v2, "chunk table")


def test_overlapping_chunks_in_the_table(v2):
    meta, cols = _columns(v2)
    # make w's second chunk claim w's first chunk's rows: a gap where it was, an overlap
    t = list(_root(v2)["tensors"]["names"]).index("w")
    lo = int(cols["tensor_ptr"][t])
    cols["offsets"][lo + 1] = cols["offsets"][lo]
    _rewrite(v2, _encode(meta, cols))
    with pytest.raises(FormatError, match="overlap|gap"):
        distckpt.load(v2)
    rep = distckpt.verify(v2, raise_errors=False)
    assert not rep["ok"]


def test_blob_symlinked_outside_the_checkpoint_is_refused(v2, tmp_path):
    t = _table_path(v2)
    outside = tmp_path / "outside.safetensors"
    os.replace(t, outside)
    os.symlink(outside, t)
    with pytest.raises(StorageError, match="outside the checkpoint"):
        distckpt.load(v2)


def test_a_1tib_tensor_claimed_in_a_tiny_file(tmp_path):
    """The root and the table agree on a 1 TiB tensor; its file has 100-odd bytes: refused before any
    allocation, naming the file (not a MemoryError)."""
    ck = tmp_path / "ck"
    distckpt.save({"w": np.ones((4, 4), np.float32)}, ck)
    rows = (1 << 40) // (4 << 20)
    doc = _root(ck)
    doc["tensors"]["shapes"][0] = [rows, 1 << 20]
    doc["files"]["sizes"][0] = (1 << 40) + 4096
    _write_root(ck, doc)
    meta, cols = _columns(ck)
    cols["sizes"][0] = [rows, 1 << 20]
    cols["tensor_max0"][0] = rows
    cols["block_log2"][0] = 0
    _rewrite(ck, _encode(meta, cols))
    fname = doc["files"]["names"][0]
    for fn in (lambda: distckpt.load(ck), lambda: distckpt.load(ck, verify=False),
               lambda: distckpt.merge(ck, tmp_path / "m.safetensors")):
        with pytest.raises(FormatError, match="needs bytes up to") as ei:
            fn()
        assert fname in str(ei.value)
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------ fuzz
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_fuzz_table_blob(v2dir, data):
    ck = v2dir.parent / "fuzz"
    if not ck.exists():
        shutil.copytree(v2dir, ck)
    _rewrite(ck, data)
    try:
        distckpt.load(ck)
    except DistCkptError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_table_bytes_flipped(v2dir, flips):
    """Bytes of a valid table changed anywhere: a clear error or exact data, never a crash."""
    ck = v2dir.parent / "flip"
    if ck.exists():
        shutil.rmtree(ck)
    shutil.copytree(v2dir, ck)
    data = bytearray(_table_path(ck).read_bytes())
    for pos, val in flips:
        data[pos % len(data)] = val
    _rewrite(ck, bytes(data))
    try:
        got = distckpt.load(ck)
    except DistCkptError:
        return
    _assert_same(got, make_v1ckpt.full_state())  # whatever still loads is exact (checksums guard the bytes)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["files", "tensors", "chunks"]), _json)
def test_fuzz_root_structure(key, doc):
    base = {"format": "distckpt", "version": 2, "save_id": "",
            "files": {"names": ["data-20260101T000000-00000000-00000.safetensors"], "sizes": [10], "ranks": [0]},
            "tensors": {"names": ["w"], "dtypes": ["int8"], "shapes": [[10]]},
            "chunks": {"count": 1, "table": {"name": "chunks-20260101T000000-00000000.safetensors", "size": 10, "crc32c": 0},
                       "crcs": {"name": "crc32c-20260101T000000-00000000.bin", "size": 8, "crc32c": 0, "count": 0}}}
    base[key] = doc
    try:
        Index.from_json(base)
    except DistCkptError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzz_root_bytes(v2dir, data):
    ck = v2dir.parent / "rootfuzz"
    if not ck.exists():
        shutil.copytree(v2dir, ck)
    (ck / INDEX_NAME).write_bytes(data)
    try:
        distckpt.load(ck)
    except DistCkptError:
        pass
