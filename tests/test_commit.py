"""The commit protocol at scale: rank reports as bytes, the streaming merge, finalize, gc.

Oracles: the arrays the ranks saved (every save is loaded back and compared bit for bit); the
chunk records the writers returned (a report's table lists exactly them); the communicator's own
byte counters (what each rank sends does not grow with the world).
"""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

import distckpt
from distckpt import commit, naming
from distckpt.chunktable import ChunkTable
from distckpt.comm import Communicator
from distckpt.errors import DistCkptError, FormatError, NotCommittedError, StrategyError
from distckpt.index import INDEX_NAME, Chunk, Index
from distckpt.layout import Box
from distckpt.storage import open_storage
from distckpt.testing import run_ranks


def _strategy(world: int) -> dict:
    return {"parallel_layout_item": {
        "w": {"dev_matrix": [world], "tensor_map": [0, -1]},
        "v": {"dev_matrix": [world], "tensor_map": [-1, 0]},
    }}


def _full(seed: int = 0, world: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((world * 3, 5)).astype(np.float32),
            "v": rng.integers(0, 100, (7, world * 2)).astype(np.int16),
            "r": np.arange(6, dtype=np.float64)}


def _local(full: dict, world: int, rank: int) -> dict:
    from distckpt.strategy import load_strategy

    s = load_strategy(_strategy(world))
    out = {}
    for k, a in full.items():
        b = s.box(k, rank, a.shape) if k in s else Box((0,) * a.ndim, a.shape)
        assert b is not None
        out[k] = np.ascontiguousarray(a[tuple(slice(o, o + z) for o, z in zip(b.offsets, b.sizes))])
    return out


def _save_rank_mode(path, world: int, seed: int = 0) -> dict:
    full = _full(seed, world)
    for r in range(world):
        distckpt.save({**_local(full, world, r), "step": seed}, path, strategy=_strategy(world), rank=r)
    return full


def _same(got: dict, want: dict) -> None:
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k


# ------------------------------------------------------------------ reports
def test_rank_table_lists_exactly_the_writer_records(tmp_path):
    store = open_storage(tmp_path)
    from distckpt.execute import PendingChunk, write_chunk_file

    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    s = np.float16(3)
    pend = [PendingChunk.of("a", Box((4, 0), (2, 6)), a[:2]), PendingChunk.of("a", Box((6, 0), (2, 6)), a[2:]),
            PendingChunk.of("s", Box((), ()), np.asarray(s))]
    recs, size = write_chunk_file(store, "data-20260101T000000-00000000-00003.safetensors", pend, rank=3, block_size=4096)
    files, tensors, table = commit.rank_table(3, {"data-20260101T000000-00000000-00003.safetensors": size},
                                              {"a": ("float32", (8, 6)), "s": ("float16", ())}, recs)
    assert files == [["data-20260101T000000-00000000-00003.safetensors", size]]
    assert tensors == [["a", "float32", [8, 6]], ["s", "float16", []]]
    assert table.partial and table.n_chunks == 3 and table.file_rank.tolist() == [3]
    back = {(r.tensor, r.offsets): r for r in table.to_records()}
    for t, name in enumerate(["a", "s"]):
        for c in recs[name]:
            r = back[(t, c.box.offsets)]
            assert r.sizes == c.box.sizes and r.segments == c.segments and r.crcs == tuple(c.crcs) and r.block_size == c.block_size
    packed = commit.pack_report({"rank": 3, "files": files, "tensors": tensors}, table)
    head, tb, cb = commit.unpack_report(packed, where="r3")
    assert head["rank"] == 3 and bytes(tb) + bytes(cb) == b"".join(table.to_bytes())


@pytest.mark.parametrize("mutate, needle", [
    (lambda b: b"XXXXXXXX" + b[8:], "bad magic"),
    (lambda b: b[:-1], "disagree"),
    (lambda b: b + b"\0", "disagree"),
    (lambda b: b[:20], "too short"),
    (lambda b: b[:8] + (1 << 40).to_bytes(8, "little") + b[16:], "exceeds"),
])
def test_hostile_reports_are_refused(mutate, needle):
    packed = commit.pack_report({"rank": 0, "files": [], "tensors": []}, None)
    with pytest.raises(FormatError, match=needle):
        commit.unpack_report(mutate(packed), where="rank 0's report")


def test_report_head_with_duplicate_keys():
    body = b'{"rank":0,"rank":1}'
    packed = commit._REPORT_HEAD.pack(commit.REPORT_MAGIC, len(body), 0, 0) + body
    with pytest.raises(FormatError, match="duplicate key"):
        commit.unpack_report(packed, where="r")


def test_builder_refuses_ranks_that_disagree():
    with pytest.raises(StrategyError, match="rank 1 saved it as float32\\[4\\], rank 0 as float32\\[8\\]"):
        commit.IndexBuilder([(0, [["a", "float32", [8]]], "r0"), (1, [["a", "float32", [4]]], "r1")], where="idx")
    with pytest.raises(FormatError, match="listed twice"):
        commit.IndexBuilder([(0, [["a", "float32", [8]], ["a", "float32", [8]]], "r0")], where="idx")
    with pytest.raises(FormatError, match="unknown dtype"):
        commit.IndexBuilder([(0, [["a", "object", [8]]], "r0")], where="idx")


def test_builder_refuses_a_report_claiming_another_rank(tmp_path):
    _save_rank_mode(tmp_path / "ck", 2)
    store = open_storage(tmp_path / "ck")
    m1 = commit._read_manifest(store, naming.manifest_file(1))
    f, t, tb, cb, rw = commit._manifest_report(store, m1, naming.manifest_file(1))
    b = commit.IndexBuilder([(0, t, rw)], where="idx")
    with pytest.raises(FormatError, match="not rank 0"):
        b.add(0, f, t, tb, cb, where=rw)
    b = commit.IndexBuilder([(1, t, rw)], where="idx")
    b.add(1, f, t, tb, cb, where=rw)
    with pytest.raises(FormatError, match="reported twice"):
        b.add(1, f, t, tb, cb, where=rw)


# ------------------------------------------------------------------ finalize
def test_finalize_streams_small_manifests_and_cleans_up(tmp_path):
    path = tmp_path / "ck"
    full = _save_rank_mode(path, 4, seed=5)
    names = sorted(os.listdir(path))
    manifests = [n for n in names if naming.is_manifest(n)]
    tables = [n for n in names if naming.is_manifest_table(n)]
    assert len(manifests) == 4 and len(tables) == 4
    m = json.loads((path / manifests[1]).read_text())
    assert m["strategy"] is None and len(m["strategy_sha256"]) == 32 and "chunks" not in m  # rank 0 carries it
    assert json.loads((path / manifests[0]).read_text())["strategy"] is not None
    rep = distckpt.finalize(path)
    assert rep["tensors"] == 3 and rep["files"] == 4
    left = sorted(os.listdir(path))
    assert not any(naming.is_manifest(n) or naming.is_manifest_table(n) or naming.is_save_marker(n) for n in left)
    _same(distckpt.load(path), full)
    # one rank of a 3-rank layout (another world size) reads exactly its slices
    s3 = {"parallel_layout_item": {"r": {"dev_matrix": [3], "tensor_map": [0]}}}
    assert np.array_equal(distckpt.load(path, strategy=s3, rank=1)["r"], full["r"][2:4])


def test_finalize_refuses_missing_or_damaged_reports(tmp_path):
    path = tmp_path / "ck"
    _save_rank_mode(path, 3)
    blob = next(n for n in os.listdir(path) if naming.is_manifest_table(n) and "-00002-" in n)
    data = (path / blob).read_bytes()
    (path / blob).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(NotCommittedError, match="crc32c differs") as ei:
        distckpt.finalize(path)
    assert blob in str(ei.value)
    (path / blob).unlink()
    with pytest.raises(NotCommittedError, match="missing"):
        distckpt.finalize(path)
    os.remove(path / naming.manifest_file(2))
    with pytest.raises(NotCommittedError, match=r"rank\(s\) \[2\] are missing"):
        distckpt.finalize(path)
    assert not (path / INDEX_NAME).exists()


def test_finalize_refuses_a_strategy_mismatch(tmp_path):
    path = tmp_path / "ck"
    _save_rank_mode(path, 2)
    m = json.loads((path / naming.manifest_file(1)).read_text())
    m["strategy_sha256"] = "0" * 32
    (path / naming.manifest_file(1)).write_text(json.dumps(m))
    with pytest.raises(StrategyError, match="rank 1"):
        distckpt.finalize(path)


def test_finalize_after_a_crash_past_the_commit_only_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    full = _save_rank_mode(path, 2)
    real = open_storage(path).remove
    calls = []

    def remove(self, names):
        calls.append(list(names))
        if any(naming.is_manifest(n) for n in names):
            raise OSError("killed")
        return real(names)

    monkeypatch.setattr(type(open_storage(path)), "remove", remove)
    with pytest.raises(OSError, match="killed"):
        distckpt.finalize(path)
    monkeypatch.undo()
    index_before = (path / INDEX_NAME).read_bytes()
    distckpt.finalize(path)  # sees its own commit: removes the manifests, rewrites nothing
    assert (path / INDEX_NAME).read_bytes() == index_before
    _same(distckpt.load(path), full)


def test_finalize_reads_manifests_written_before_index_v2(tmp_path):
    """A rank-mode save in flight across the upgrade: manifests with chunk records inline."""
    path = tmp_path / "ck"
    full = _save_rank_mode(path, 2)
    store = open_storage(path)
    for r in range(2):
        m = commit._read_manifest(store, naming.manifest_file(r))
        f, t, tb, cb, _ = commit._manifest_report(store, m, naming.manifest_file(r))
        specs = [(n, dt, tuple(s)) for n, dt, s in t]
        table = ChunkTable.from_buffer(tb, cb, n_tensors=len(t), file_sizes=[s for _, s in f], partial=True, where="x",
                                       tensor_shapes=[s for _, _, s in specs],
                                       tensor_itemsizes=[np.dtype(np.float32 if dt == "float32" else dt).itemsize
                                                         for _, dt, _ in specs])
        chunks: dict = {}
        for rec in table.to_records():
            crcs = rec.crcs
            chunks.setdefault(t[rec.tensor][0], []).append(
                Chunk(Box(rec.offsets, rec.sizes), f[rec.file][0], rec.segments, crcs, rec.block_size, r).to_json())
        legacy = {k: m[k] for k in ("rank", "save_id", "world_size", "block_size", "checksum", "metadata", "values")}
        legacy.update(strategy=json.loads((path / naming.manifest_file(0)).read_text())["strategy"],
                      files=dict(map(tuple, f)), tensors={n: [dt, s] for n, dt, s in t}, chunks=chunks)
        (path / naming.manifest_file(r)).write_text(json.dumps(legacy))
        os.remove(path / m["report"]["name"])
    distckpt.finalize(path)
    _same(distckpt.load(path), full)


def test_finalize_memory_is_the_table_not_the_reports(tmp_path):
    """64 ranks x 300 tensors (19,200 chunks): finalize holds about the merged table, not every report."""
    path = tmp_path / "ck"
    W, T = 64, 300
    strat = {"parallel_layout_item": {f"t{i:03d}": {"dev_matrix": [W], "tensor_map": [0]} for i in range(T)}}
    for r in range(W):
        distckpt.save({f"t{i:03d}": np.full(2, r, np.int8) for i in range(T)}, path, strategy=strat, rank=r)
    report_bytes = sum(os.path.getsize(path / n) for n in os.listdir(path) if naming.is_manifest_table(n))
    tracemalloc.start()
    distckpt.finalize(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    table = os.path.getsize(path / json.loads((path / INDEX_NAME).read_text())["chunks"]["table"]["name"])
    assert peak < report_bytes + 20 * table + (8 << 20), (peak, report_bytes, table)
    assert table / (W * T) < 64  # bytes per chunk
    got = distckpt.load(path, names=["t007"])
    assert np.array_equal(got["t007"], np.repeat(np.arange(W, dtype=np.int8), 2))


# ------------------------------------------------------------------ mpirun-like saves (thread ranks)
def test_threaded_save_sends_reports_to_the_coordinator_only(tmp_path, monkeypatch):
    """Reports travel by gather_bytes to rank 0; no rank all-gathers; non-root traffic is flat in W."""
    def forbidden(self, *a, **k):
        raise AssertionError("allgather used by save")

    monkeypatch.setattr(Communicator, "allgather", forbidden)
    sent = {}
    for W in (4, 16):
        full = _full(1, W)
        path = tmp_path / f"w{W}"

        def job(rank, comm, full=full, path=path, W=W):
            distckpt.save({**_local(full, W, rank), "step": 1}, path, strategy=_strategy(W), comm=comm)
            return comm.stats["bytes_sent"]

        sent[W] = run_ranks(W, job)
        _same(distckpt.load(path), full)
        assert Index.loads((path / INDEX_NAME).read_bytes()).version == 2
    # a worker's bytes: its own report plus constant protocol words, whatever the world
    assert max(sent[16][1:]) < 1.5 * max(sent[4][1:]), sent
    assert sent[16][0] > sent[4][0]  # the coordinator's grows (it broadcasts the verdict to more ranks)


def test_threaded_save_failure_commits_nothing(tmp_path):
    full = _full(2, 4)

    def job(rank, comm):
        st = _local(full, 4, rank)
        if rank == 2:
            st["w"] = st["w"].astype(np.float64)  # a rank that disagrees on the dtype
        distckpt.save(st, tmp_path / "ck", strategy=_strategy(4), comm=comm)

    res = run_ranks(4, job, return_exceptions=True)
    assert all(isinstance(e, DistCkptError) for e in res)
    assert "every rank must describe the same global tensor" in str(res[0])
    assert not (tmp_path / "ck" / INDEX_NAME).exists()
    assert not any(naming.is_data_file(n) for n in os.listdir(tmp_path / "ck"))


# ------------------------------------------------------------------ commit, gc
def test_commit_replaces_the_previous_save_and_its_blobs(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"a": np.ones(3)}, path)
    first = set(os.listdir(path))
    distckpt.save({"a": np.zeros(3)}, path)
    second = set(os.listdir(path))
    assert not (first - {INDEX_NAME}) & second  # old data file, table and checksum column are gone
    assert sum(naming.is_index_blob(n) for n in second) == 2
    assert distckpt.gc(path) == []


def test_gc_removes_orphan_blobs_of_proven_saves_only(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"a": np.ones(3)}, path)
    sid = "20200101T000000-0badc0de"
    other = "20200101T000000-00000001"
    junk = [naming.chunk_table_file(sid), naming.crc_file(sid), naming.manifest_table_file(3, sid),
            f".{naming.chunk_table_file(sid)}.tmp-abcdef123456"]
    for n in junk + [naming.chunk_table_file(other)]:
        (path / n).write_bytes(b"x")
    (path / naming.save_marker(sid)).write_text("{}")
    got = distckpt.gc(path)
    assert sorted(got) == sorted(junk + [naming.save_marker(sid)])
    assert (path / naming.chunk_table_file(other)).exists()  # no marker proves it: left alone
    assert distckpt.load(path)["a"].tolist() == [1, 1, 1]


def test_commit_version_1_on_request(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"a": np.ones(3, np.int8)}, path)
    idx = distckpt.sources.open_source(path).index
    names = commit.commit(open_storage(path), idx, version=1)
    assert names == sorted(idx.files) + [INDEX_NAME]
    assert json.loads((path / INDEX_NAME).read_text())["version"] == 1
    assert not any(naming.is_index_blob(n) for n in os.listdir(path))  # v2 blobs the v1 index no longer names
    assert distckpt.load(path)["a"].tolist() == [1, 1, 1]
    with pytest.raises(DistCkptError, match="index version"):
        commit.index_version(3)


def test_block_size_must_be_a_power_of_two(tmp_path):
    with pytest.raises(DistCkptError, match="power of two"):
        distckpt.save({"a": np.ones(3)}, tmp_path / "ck", block_size=3000)
