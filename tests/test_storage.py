"""distckpt.storage: the contract suite on every backend (local, file://, memory, s3, faulty, http),
the commit protocol, inline checksums, the retry policy and injected faults (``tests/faulty.py``),
and the safety rules: every byte checked and a full disk (a real tmpfs) reported by name with
nothing left behind; only regular files read (FIFOs); symlinked destinations replaced, never
followed; Staging that leaves nothing on failure or SIGTERM and proves its debris."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import faulty  # noqa: E402

from distckpt import api  # noqa: E402
from distckpt.cli import main as cli_main  # noqa: E402
from distckpt.errors import ChecksumError, DistCkptError, NotCommittedError, StorageError  # noqa: E402
from distckpt.execute import ReadStats  # noqa: E402
from distckpt.index import INDEX_NAME, Index  # noqa: E402
from distckpt.layout import ParamSpec, Strategy, TensorLayout  # noqa: E402
from distckpt.saving import SaveJob  # noqa: E402
from distckpt.storage import (  # noqa: E402
    MARKER_NAME,
    RetryExhausted,
    RetryPolicy,
    Staging,
    Storage,
    Store,
    TransientError,
    env_storage_options,
    find_staging_debris,
    handle_termination,
    is_transient,
    merge_options,
    open_storage,
    read_small,
)
from distckpt.storage import local as local_backend  # noqa: E402
from distckpt.strategy import dump_strategy_proto  # noqa: E402
from distckpt.testing import check_roundtrip, check_storage_contract, sample_state  # noqa: E402


def split_strategy(names, n: int, dim: int = 0, ndim: int = 2) -> Strategy:
    tm = [-1] * ndim
    tm[dim] = 0
    return Strategy({nm: ParamSpec(nm, TensorLayout((n,), tuple(tm))) for nm in names})


def data_files(st: Storage) -> list[str]:
    return sorted(n for n in st.listdir() if n.startswith("data-"))


def committed(st: Storage) -> Index:
    return Index.loads(st.read_bytes(INDEX_NAME), store=st)


# ------------------------------------------------------------------ contract suite
def test_storage_contract(storage_url):
    check_storage_contract(storage_url)


def test_roundtrip(storage_url):
    check_roundtrip(storage_url)
    assert api.verify(storage_url)["ok"]


def test_every_verb(storage_url, tmp_path):
    """save, load, verify, inspect, merge (3 outputs), split, reshard, finalize and gc on each backend."""
    base = storage_url.rstrip("/")
    state = sample_state(1)
    api.save(state, f"{base}/ck")
    info = api.inspect(f"{base}/ck")
    assert {t["name"] for t in info["tensors"]} == {k for k, v in state.items() if isinstance(v, np.ndarray)}
    assert api.verify(f"{base}/ck")["bytes_checked"] == info["total_bytes"]

    for dst in (f"{base}/m.ckpt", f"{base}/m.safetensors", f"{base}/mdir"):
        api.merge(f"{base}/ck", dst)
        got = api.load(dst)
        assert np.array_equal(got["w"], state["w"]), dst
    # overwrite a directory output: the new contents replace the old ones entirely
    with pytest.raises(FileExistsError):
        api.merge(f"{base}/ck", f"{base}/mdir")
    api.merge(f"{base}/ck", f"{base}/mdir", overwrite=True, max_shard_size=4000)
    listing = open_storage(f"{base}/mdir").listdir()
    assert "mindspore_model.ckpt" not in listing and "mindspore_model.ckpt.index.json" in listing

    s2 = split_strategy(["w", "b16"], 2)
    api.split(f"{base}/m.ckpt", f"{base}/sp", dst_strategy=s2, format="ckpt")
    assert sorted(open_storage(f"{base}/sp").listdir()) == ["rank_0", "rank_1", "strategy.ckpt"]
    back = api.load(f"{base}/sp")  # the strategy inside is found
    assert back["b16"].tobytes() == state["b16"].tobytes()

    s4 = split_strategy(["w", "b16"], 4)
    open_storage(base).put("s4.ckpt", dump_strategy_proto(s4))  # strategy files are URLs too
    rep = api.reshard(f"{base}/sp", f"{base}/rs", dst_strategy=f"{base}/s4.ckpt")
    assert rep["read"]["ratio"] <= 1.05
    part = api.load(f"{base}/rs", strategy=f"{base}/s4.ckpt", rank=3)
    assert np.array_equal(part["w"], state["w"][48:64])
    assert api.verify(f"{base}/rs")["ok"]

    # rank-mode save + finalize, then gc has nothing to do
    for r in range(2):
        local = {"w": state["w"][32 * r : 32 * (r + 1)], "b16": state["b16"][20 * r : 20 * (r + 1)]}
        api.save(local, f"{base}/rk", strategy=s2, rank=r)
    with pytest.raises(NotCommittedError, match="not a committed checkpoint"):
        api.load(f"{base}/rk")
    api.finalize(f"{base}/rk")
    assert np.array_equal(api.load(f"{base}/rk")["w"], state["w"])
    assert api.gc(f"{base}/rk") == []


def test_cli_on_urls(storage_url, capsys):
    base = storage_url.rstrip("/")
    api.save(sample_state(2), f"{base}/ck")
    assert cli_main(["verify", f"{base}/ck", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli_main(["inspect", f"{base}/ck", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tensors"]) == 5
    assert cli_main(["merge", f"{base}/ck", f"{base}/out.safetensors", "-q"]) == 0
    assert api.load(f"{base}/out.safetensors")["step"] == 102
    assert cli_main(["gc", f"{base}/ck", "--dry-run"]) == 0


def test_file_urls(tmp_path):
    url = "file://" + str(tmp_path / "ck")
    st = check_storage_contract("file://" + str(tmp_path / "contract"))
    assert st.is_local
    check_roundtrip(url)
    api.merge(url, "file://" + str(tmp_path / "m.ckpt"))
    assert api.load(tmp_path / "m.ckpt")["step"] == 100


# ------------------------------------------------------------------ commit protocol
def test_not_committed_is_refused(storage_url):
    st = open_storage(storage_url)
    api.save({"a": np.ones(4, np.float32)}, storage_url)
    st.remove([INDEX_NAME])
    for fn in (api.load, api.verify, api.inspect):
        with pytest.raises(NotCommittedError, match="not a committed checkpoint"):
            fn(storage_url)
    with pytest.raises(NotCommittedError):
        api.merge(storage_url, storage_url.rstrip("/") + "-m.ckpt")


def test_resave_is_never_unloadable(storage_url, monkeypatch):
    """Between the new data and the new index the old checkpoint loads; the old data goes only after the commit."""
    old = {"a": np.arange(12, dtype=np.float32), "step": 1}
    new = {"a": -np.arange(12, dtype=np.float32), "step": 2}
    api.save(old, storage_url)
    st = open_storage(storage_url)
    old_files = data_files(st)
    seen = []
    real = Storage.put_atomic

    def paused(self, name, data):
        if name == INDEX_NAME:  # the new data are written, the index is not yet
            got = api.load(storage_url)
            assert np.array_equal(got["a"], old["a"]) and got["step"] == 1
            now = data_files(st)
            assert set(old_files) < set(now), now
            seen.append(now)
        real(self, name, data)
        if name == INDEX_NAME:  # committed: new weights, old data still present until the cleanup
            assert api.load(storage_url)["step"] == 2

    monkeypatch.setattr(Storage, "put_atomic", paused)
    api.save(new, storage_url)
    monkeypatch.undo()
    assert seen
    got = api.load(storage_url)
    assert np.array_equal(got["a"], new["a"]) and got["step"] == 2
    assert not set(old_files) & set(data_files(st)), "old data files must be removed after the commit"
    assert api.gc(storage_url) == []


def test_failed_commit_keeps_old_and_gc_removes_only_debris(storage_url, monkeypatch):
    base = storage_url.rstrip("/")
    api.save({"a": np.ones(5, np.float32)}, base)
    st = open_storage(base)
    st.put("config.json", b"{}")
    before = set(st.listdir())
    index_bytes = st.read_bytes(INDEX_NAME)

    def broken(self, name, data):
        raise StorageError("simulated: the index PUT failed")

    monkeypatch.setattr(Storage, "put_atomic", broken)
    with pytest.raises(DistCkptError, match="index PUT failed"):
        api.save({"a": np.zeros(5, np.float32)}, base)
    # a failed save takes its data file and its marker with it: nothing is left to clean
    assert set(st.listdir()) == before
    # a save killed before it could clean up leaves its marker and data file: gc proves and removes exactly those
    monkeypatch.setattr(SaveJob, "_discard", lambda *a: None)
    with pytest.raises(DistCkptError, match="index PUT failed"):
        api.save({"a": np.zeros(5, np.float32)}, base)
    monkeypatch.undo()
    assert st.read_bytes(INDEX_NAME) == index_bytes
    assert np.array_equal(api.load(base)["a"], np.ones(5, np.float32))
    debris = set(st.listdir()) - before
    assert len(debris) == 2 and {n.split("-")[0] for n in debris} == {"data", ".distckpt"}, debris
    assert api.gc(base, dry_run=True) == api.gc(base) == sorted(debris)
    assert set(st.listdir()) == before  # config.json and the committed save untouched
    assert np.array_equal(api.load(base)["a"], np.ones(5, np.float32))


# ------------------------------------------------------------------ checksums
def _flip_byte(st: Storage, name: str, pos: int) -> None:
    data = bytearray(st.read_bytes(name))
    data[pos] ^= 0x01
    st.remove([name])
    st.put(name, bytes(data))


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_flipped_byte(backend, tmp_path):
    url = str(tmp_path / "c") if backend == "local" else "memory://flip/c"
    a = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)  # 256 KiB
    b = np.ones((8, 8), np.float32)
    api.save({"a": a, "b": b}, url, block_size=64 << 10)
    st = open_storage(url)
    idx = committed(st)
    (chunk,) = idx.tensors["a"].chunks
    start = chunk.segments[0][0]
    bs = chunk.block_size
    assert bs == 4 << 10  # 256 KiB chunk: ~1/256 of it, at least 4 KiB
    bad = start + (3 << 16) + 17  # a byte in rows 192..255 of tensor a
    _flip_byte(st, chunk.file, bad)

    with pytest.raises(ChecksumError) as ei:
        api.load(url)
    msg = str(ei.value)
    lo = start + ((3 << 16) + 17) // bs * bs  # the block holding the flipped byte
    assert chunk.file in msg and "'a'" in msg and "chunk 0" in msg and f"[{lo}, {lo + bs})" in msg
    # only touched blocks are checked: other tensors, and rows outside the bad block, load fine
    assert np.array_equal(api.load(url, names=["b"])["b"], b)
    s4 = split_strategy(["a"], 4)
    for r in range(3):
        assert np.array_equal(api.load(url, strategy=s4, rank=r)["a"], a[64 * r : 64 * (r + 1)])
    with pytest.raises(ChecksumError):
        api.load(url, strategy=s4, rank=3)
    # verification off: the corrupt value comes back, without an error
    got = api.load(url, verify=False)["a"]
    assert (got != a).sum() == 1
    # verify checks everything, and the CLI exits 1 naming the file
    with pytest.raises(ChecksumError, match=chunk.file):
        api.verify(url)
    assert cli_main(["verify", url, "-q"]) == 1


def test_checksums_are_inline_and_optional(tmp_path):
    a = np.random.default_rng(0).standard_normal((300, 1000)).astype(np.float32)  # 1.2 MB
    api.save({"a": a}, tmp_path / "on")
    api.save({"a": a}, tmp_path / "off", checksums=False)
    on, off = committed(open_storage(tmp_path / "on")), committed(open_storage(tmp_path / "off"))
    import crc32c

    c = on.tensors["a"].chunks[0]
    raw = a.tobytes()
    bs = c.block_size
    assert bs == 8 << 10  # 1.2 MB chunk: ~1/256 of it, a power of two
    assert list(c.crcs) == [crc32c.crc32c(raw[i : i + bs]) for i in range(0, len(raw), bs)]
    assert off.checksum == "none" and off.tensors["a"].chunks[0].crcs is None
    assert np.array_equal(api.load(tmp_path / "off")["a"], a)


# ------------------------------------------------------------------ storage options
def test_env_and_explicit_storage_options(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    env = env_storage_options("s3")
    assert env == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-1"},
        "key": "k",
        "secret": "s",
        "token": "t",
    }
    assert env_storage_options("memory") == {}
    merged = merge_options(env, {"client_kwargs": {"endpoint_url": "http://other:9"}, "anon": False})
    assert merged["client_kwargs"] == {"endpoint_url": "http://other:9", "region_name": "eu-west-1"}
    assert merged["anon"] is False and merged["key"] == "k"


# ------------------------------------------------------------------ injected faults
@pytest.fixture
def plan():
    p = faulty.install()
    yield p
    p.reset()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(Storage, "backoff", 0.001)


def test_faulty_backend_passes_the_contract(plan):
    check_storage_contract("faulty://contract/x")
    check_roundtrip("faulty://contract/rt")
    assert plan.injected == []


def test_transient_read_faults_are_retried(plan, fast_retries):
    a = np.arange(100_000, dtype=np.float32).reshape(100, 1000)
    api.save({"a": a}, "faulty://t/c")
    plan.fail("read", k=1, times=2)  # the index read fails twice
    plan.fail("read", k=4, times=3)  # and a data read three times
    st = ReadStats()
    assert np.array_equal(api.load("faulty://t/c", stats=st)["a"], a)
    assert len(plan.injected) == 5


def test_transient_write_faults_are_retried(plan, fast_retries):
    a = np.arange(3 << 18, dtype=np.float32)  # 3 MiB: several writes
    plan.fail("write", k=2, times=2)  # a data write
    plan.fail("write", k=1, times=1, match=INDEX_NAME)  # and the commit
    api.save({"a": a}, "faulty://t/w")
    assert len(plan.injected) == 3
    assert np.array_equal(api.load("faulty://t/w")["a"], a)
    assert api.verify("faulty://t/w")["ok"]


def test_persistent_fault_at_any_write_never_commits_a_wrong_checkpoint(plan, fast_retries):
    """For every k: a persistent failure from the k-th write on leaves the earlier checkpoint, whole."""
    url = "faulty://p/c"
    old = {"a": np.arange(2 << 18, dtype=np.float32), "b": np.ones(3, np.int32), "step": 1}
    new = {"a": -old["a"], "b": np.zeros(3, np.int32), "step": 2}
    api.save(old, url)
    st = open_storage(url)
    old_index = st.read_bytes(INDEX_NAME)
    plan.reset()
    api.save(old, url)  # count the writes of one save
    writes = plan.counts["write"]
    assert writes >= 3
    old_index = st.read_bytes(INDEX_NAME)
    for k in range(1, writes + 1):
        plan.reset()
        plan.fail("write", k=k, persistent=True)
        with pytest.raises(DistCkptError):
            api.save(new, url)
        plan.reset()
        assert st.read_bytes(INDEX_NAME) == old_index, k
        got = api.load(url)
        assert np.array_equal(got["a"], old["a"]) and got["step"] == 1, k
        api.gc(url)
        assert data_files(st) == sorted(committed(st).files), k
    plan.reset()
    api.save(new, url)
    assert api.load(url)["step"] == 2


def test_persistent_fault_on_a_fresh_path_leaves_nothing_loadable(plan, fast_retries):
    plan.fail("write", k=1, persistent=True, match=INDEX_NAME)
    with pytest.raises(DistCkptError):
        api.save({"a": np.ones(4, np.float32)}, "faulty://f/c")
    plan.reset()
    with pytest.raises(NotCommittedError, match="not a checkpoint"):
        api.load("faulty://f/c")
    assert open_storage("faulty://f/c").listdir() == []  # the failed save removed what it wrote


def test_persistent_read_fault_fails_loudly(plan, fast_retries):
    api.save({"a": np.ones(1000, np.float32)}, "faulty://r/c")
    plan.fail("read", k=1, persistent=True, match="data-")
    with pytest.raises(StorageError, match="after 5 attempt"):
        api.load("faulty://r/c")
    assert plan.counts["read"] >= 5


def test_silent_corruption_is_caught_by_checksums(plan):
    a = np.arange(1 << 18, dtype=np.float32)
    api.save({"a": a}, "faulty://c/c")
    plan.fail("read", k=1, corrupt=True, match="data-")  # a flipped bit in transit
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        api.load("faulty://c/c")
    plan.reset()
    # a flipped bit on the way: write 1 is the save marker, write 2 the data file's header, write 3 its data
    plan.fail("write", k=3, corrupt=True, match="data-")
    api.save({"a": a}, "faulty://c/d")
    plan.reset()
    with pytest.raises(ChecksumError):
        api.verify("faulty://c/d")


def test_merge_to_faulty_output_is_all_or_nothing(plan, fast_retries):
    api.save({"a": np.arange(5000, dtype=np.float32)}, "faulty://m/src")
    api.merge("faulty://m/src", "faulty://m/out.ckpt")
    before = open_storage("faulty://m/out.ckpt".rsplit("/", 1)[0]).read_bytes("out.ckpt")
    plan.fail("write", k=1, persistent=True)
    with pytest.raises(DistCkptError):
        api.merge("faulty://m/src", "faulty://m/out.ckpt", overwrite=True)
    plan.reset()
    st = open_storage("faulty://m")
    assert st.read_bytes("out.ckpt") == before
    assert [n for n in st.listdir() if ".tmp" in n] == []


# ================================================================== the safety rules
MiB = 1 << 20


def _within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds}s (waiting on a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def tmpfs(tmp_path):
    """A real 20 MiB tmpfs (we are root): writes past it fail with ENOSPC."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    """A 32 MiB single-rank distckpt checkpoint (does not fit the 20 MiB tmpfs)."""
    src = tmp_path_factory.mktemp("big") / "src"
    api.save({"w": np.arange(8 * MiB, dtype=np.float32).reshape(2048, 4096), "step": 3}, src)
    return src


# ------------------------------------------------------------------ 1. every byte checked; a full disk
def test_full_disk_writer_names_the_file_and_leaves_nothing(tmpfs):
    st = open_storage(tmpfs)
    blob = np.zeros(32 * MiB, np.uint8)
    w = st.open_write("big.bin")
    with pytest.raises(StorageError, match="not enough space") as err:
        w.write(memoryview(blob))  # one write larger than the disk: a short write, then ENOSPC
    assert str(tmpfs / "big.bin") in str(err.value) and err.value.errno == errno.ENOSPC
    w.abort()
    assert _leftovers(tmpfs) == []
    for write in (lambda: st.put("p.bin", blob), lambda: st.put_atomic("i.json", blob)):
        with pytest.raises(StorageError, match="not enough space"):
            write()
        assert _leftovers(tmpfs) == []
    # many small writes gathered in the writer's buffer hit the same check
    w = st.open_write("small.bin")
    with pytest.raises(StorageError, match="not enough space"):
        for _ in range(32 * 16):
            w.write(b"x" * (MiB // 16))
        w.commit()
    w.close()
    assert _leftovers(tmpfs) == []


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_full_disk_in_staging_names_dst(tmpfs, kind):
    dst = tmpfs / "deep" / ("m.ckpt" if kind == "file" else "mdir")
    with pytest.raises(StorageError, match="not enough space") as err:
        with Staging(dst, kind=kind) as stg:
            if kind == "file":
                stg.store.put(stg.name, np.zeros(32 * MiB, np.uint8))
            else:
                stg.store.put("mindspore_model.ckpt", np.zeros(32 * MiB, np.uint8))
    assert f"not enough space to write {dst} " in str(err.value)
    assert _leftovers(tmpfs) == []  # no DST, no temp place, not even the parent it created


@pytest.mark.parametrize("dst_name", ["m.ckpt", "mdir"])
def test_cli_merge_onto_full_disk_exits_1_and_leaves_nothing(tmpfs, ckpt32, capsys, dst_name):
    dst = tmpfs / dst_name
    assert cli_main(["merge", str(ckpt32), str(dst), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"not enough space to write {dst} " in err[0], err
    assert _leftovers(tmpfs) == []


def test_space_errors_name_the_destination_not_its_temporary_name():
    from distckpt.storage.base import staged_destination

    assert staged_destination("/o/.m.ckpt.tmp-0123abcd") == "/o/m.ckpt"
    assert staged_destination("/o/.mdir.tmp-0123abcd/.x.ckpt.tmp-89abcdef") == "/o/mdir"  # outermost wins
    assert staged_destination("/o/..m.ckpt.tmp-0123abcd.tmp-89abcdef") == "/o/m.ckpt"  # nested names unwrap
    assert staged_destination("s3://b/.o.tmp-0123abcd/i.json") == "s3://b/o"
    assert staged_destination("/o/m.ckpt") is None and staged_destination("/o/.m.tmp-xyz") is None


def test_short_writes_are_completed_or_reported(tmp_path, monkeypatch):
    """The kernel may take part of a write: the rest is written; taking nothing is a full disk."""
    st = open_storage(tmp_path)
    real = os.write
    monkeypatch.setattr(local_backend.os, "write", lambda fd, b: real(fd, bytes(b)[: max(1, len(b) // 3)]))
    data = np.random.default_rng(1).integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes()
    st.put("a.bin", data)
    assert (tmp_path / "a.bin").read_bytes() == data
    monkeypatch.setattr(local_backend.os, "write", lambda fd, b: 0)
    with pytest.raises(StorageError, match="not enough space"):
        st.put("b.bin", data)
    assert not (tmp_path / "b.bin").exists()

    def over_quota(fd, b):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(local_backend.os, "write", over_quota)
    with pytest.raises(StorageError, match=r"not enough space to write .*c\.bin: Disk quota exceeded") as err:
        st.put("c.bin", data)
    assert err.value.errno == errno.EDQUOT and not (tmp_path / "c.bin").exists()


def test_commit_checks_the_size_and_random_writes(tmp_path):
    st = open_storage(tmp_path)
    assert st.caps.random_write
    w = st.open_write("r.bin")
    w.write_at(6, b"world")
    w.write_at(0, b"hello ")
    w.commit()
    assert (tmp_path / "r.bin").read_bytes() == b"hello world"
    w = st.open_write("t.bin")
    w.write(b"abc")
    os.truncate(tmp_path / "t.bin", 0)
    w._buf.clear()  # the bytes "were written" but the file lost them
    w._pos = 3
    with pytest.raises(StorageError, match="0 bytes after 3"):
        w.commit()
    assert not (tmp_path / "t.bin").exists()
    with pytest.raises(StorageError, match="sequentially"):
        open_storage("memory://seq/x").open_write("a").write_at(0, b"x")


def test_resumable_writer_keeps_its_bytes(tmp_path):
    st = open_storage(tmp_path)
    w = st.open_write("d.part", resume_at=0)
    w.write(b"0123456789")
    w.abort()  # a download that failed: the bytes stay for the next attempt
    assert (tmp_path / "d.part").read_bytes() == b"0123456789"
    w = st.open_write("d.part", resume_at=4)
    w.write(b"ABCD")
    w.commit()
    assert (tmp_path / "d.part").read_bytes() == b"0123ABCD"
    with pytest.raises(StorageError, match="cannot resume at byte 99"):
        st.open_write("d.part", resume_at=99)
    with pytest.raises(StorageError, match="cannot resume"):
        open_storage("memory://resume/x").open_write("a", resume_at=0)


# ------------------------------------------------------------------ 2. only regular files are read
def test_fifo_is_refused_not_waited_on(tmp_path):
    st = open_storage(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    for fn in (
        lambda: st.read_bytes("pipe"),
        lambda: st.read_range("pipe", 0, 4),
        lambda: st.size("pipe"),
        lambda: st.open_read("pipe"),
        lambda: st.read_many([("pipe", 0, memoryview(bytearray(4)))]),
        lambda: read_small(tmp_path / "pipe"),
        lambda: st.put("pipe", b"data"),
    ):
        with pytest.raises(StorageError, match=r"pipe: is a FIFO \(named pipe\), not a regular file"):
            _within(20, fn)
    with pytest.raises(IsADirectoryError):
        read_small(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_small(tmp_path / "missing.yaml")
    (tmp_path / "big.yaml").write_bytes(b"x" * 1000)
    with pytest.raises(StorageError, match="larger than the 100-byte limit"):
        read_small(tmp_path / "big.yaml", limit=100)
    assert read_small(f"file://{tmp_path}/big.yaml") == b"x" * 1000


def _run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "distckpt", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def test_cli_fifo_index_data_file_or_source_is_refused(tmp_path):
    ck = tmp_path / "ck"
    api.save({"w": np.arange(64, dtype=np.float32)}, ck)
    data = next(p for p in ck.iterdir() if p.name.startswith("data-"))
    data.unlink()
    os.mkfifo(data)
    res = _run_cli("merge", ck, tmp_path / "m.ckpt")
    assert res.returncode == 1 and f"{data}: " in res.stderr and "not a regular file" in res.stderr, res
    (ck / INDEX_NAME).unlink()
    os.mkfifo(ck / INDEX_NAME)
    res = _run_cli("inspect", ck)
    assert res.returncode == 1 and f"{ck / INDEX_NAME}: is a FIFO (named pipe), not a regular file" in res.stderr, res
    os.mkfifo(tmp_path / "x.ckpt")
    res = _run_cli("merge", tmp_path / "x.ckpt", tmp_path / "y.safetensors")
    assert res.returncode == 1 and "x.ckpt: is a FIFO (named pipe), not a regular file" in res.stderr, res
    assert not (tmp_path / "m.ckpt").exists() and not (tmp_path / "y.safetensors").exists()


# ------------------------------------------------------------------ 3. symlinks: confined reads, links replaced
def test_writers_never_follow_a_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(outside, d / "link")
    st = open_storage(d)
    with pytest.raises(StorageError, match="symlink"):
        st.put("link", b"overwritten?")
    assert outside.read_bytes() == b"precious"
    st.put_atomic("link", b"new")  # a rename replaces the link itself
    assert outside.read_bytes() == b"precious" and (d / "link").read_bytes() == b"new"
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_bytes(b"k")
    os.symlink(tmp_path / "target", d / "dirlink")
    st.remove(["dirlink"])  # the link goes, never what it points to
    assert not os.path.lexists(d / "dirlink") and (tmp_path / "target" / "keep").read_bytes() == b"k"


def test_cli_overwrite_of_a_symlinked_dst_replaces_the_link(tmp_path, capsys):
    ck = tmp_path / "ck"
    api.save({"w": np.arange(12, dtype=np.float32), "step": 1}, ck)
    real = tmp_path / "real_out"
    api.merge(ck, real)
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    out = tmp_path / "out"
    os.symlink(real, out)
    assert cli_main(["merge", str(ck), str(out), "--overwrite", "-q"]) == 0, capsys.readouterr().err
    assert out.is_dir() and not out.is_symlink()
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before  # the link's target is untouched
    assert api.load(out)["step"] == 1
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no .out.old-* / .out.tmp-*


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("exchange", [True, False])
def test_staging_replaces_a_symlinked_dst_itself(tmp_path, monkeypatch, kind, exchange):
    if not exchange:  # a kernel or file system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(local_backend, "_exchange", lambda a, b: False)
    target = tmp_path / "target"
    if kind == "dir":
        target.mkdir()
        (target / "old").write_bytes(b"old")
    else:
        target.write_bytes(b"old")
    dst = tmp_path / "dst"
    os.symlink(target, dst)
    with Staging(dst, kind=kind, overwrite=True) as stg:
        if kind == "dir":
            stg.store.put("new", b"new")
        else:
            stg.store.put(stg.name, b"new")
    assert not dst.is_symlink()
    assert (dst / "new" if kind == "dir" else dst).read_bytes() == b"new"
    assert (target / "old" if kind == "dir" else target).read_bytes() == b"old"
    assert _leftovers(tmp_path) == ["dst", "target"]


def test_failed_swap_restores_dst_and_leaves_no_old(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; when the second fails the first is undone."""
    monkeypatch.setattr(local_backend, "_exchange", lambda a, b: False)
    target = tmp_path / "target"
    target.mkdir()
    dst = tmp_path / "dst"
    os.symlink(target, dst)
    real_rename = os.rename

    def rename(a, b):
        if ".tmp-" in str(a):
            raise OSError(errno.EIO, "injected rename failure")
        return real_rename(a, b)

    monkeypatch.setattr(local_backend.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        with Staging(dst, overwrite=True) as stg:
            stg.store.put("x", b"1")
    assert dst.is_symlink() and os.readlink(dst) == str(target)
    assert _leftovers(tmp_path) == ["dst", "target"]


# ------------------------------------------------------------------ staging: parents, SIGTERM, debris
def test_failed_staging_removes_the_parents_it_created(tmp_path):
    (tmp_path / "a").mkdir()
    for kind in ("file", "dir"):
        with pytest.raises(RuntimeError):
            with Staging(tmp_path / "a" / "b" / "c" / "m.ckpt", kind=kind):
                raise RuntimeError("failed merge")
        assert _leftovers(tmp_path) == ["a"] and _leftovers(tmp_path / "a") == []
    with Staging(tmp_path / "x" / "y" / "m.ckpt", kind="file") as stg:
        stg.store.put(stg.name, b"ok")
    assert (tmp_path / "x" / "y" / "m.ckpt").read_bytes() == b"ok"
    assert _leftovers(tmp_path / "x" / "y") == ["m.ckpt"]


def test_staging_marker_proves_ownership(tmp_path):
    with Staging(tmp_path / "out", marker={"verb": "merge", "save_id": "abc"}) as stg:
        marker = json.loads((tmp_path / stg.tmp_name / MARKER_NAME).read_bytes())
        assert marker["marker"] == {"verb": "merge", "save_id": "abc"}
        assert marker["pid"] == os.getpid() and marker["tmp"] == stg.tmp_name and marker["kind"] == "dir"
        assert find_staging_debris(open_storage(tmp_path)) == []  # alive: not debris
    assert not (tmp_path / "out" / MARKER_NAME).exists()
    with pytest.raises(TypeError):
        Staging(tmp_path / "o2", marker={"x": object()})
    with pytest.raises(ValueError, match="kind"):
        Staging(tmp_path / "o3", kind="tree")


_SLOW_STAGING = """
import sys, time
from distckpt.storage import Staging, handle_termination, Terminated
dst, mode = sys.argv[1], sys.argv[2]
def work():
    with Staging(dst, kind="dir", marker={"verb": "test"}) as stg:
        stg.store.put("part.bin", b"x" * 100000)
        print("ready", flush=True)
        time.sleep(120)
if mode == "handled":
    try:
        with handle_termination():
            work()
    except Terminated:
        sys.exit(143)
else:
    work()
"""


def _start_and_signal(tmp_path, dst, mode, sig):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_STAGING)
    p = subprocess.Popen([sys.executable, str(script), str(dst), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    return p.wait(timeout=60)


def test_sigterm_cleans_up_under_handle_termination(tmp_path):
    dst = tmp_path / "a" / "b" / "out"
    assert _start_and_signal(tmp_path, dst, "handled", signal.SIGTERM) == 143
    assert _leftovers(tmp_path) == ["slow.py"]  # no .out.tmp-*, and a/b/ removed too


def test_killed_staging_is_debris_that_gc_can_prove(tmp_path):
    dst = tmp_path / "out"
    assert _start_and_signal(tmp_path, dst, "plain", signal.SIGKILL) == -signal.SIGKILL
    st = open_storage(tmp_path)
    (leftover,) = [n for n in st.listdir() if n.startswith(".out.tmp-")]
    st.put(".editor.tmp-0123abcd", b"not ours")  # no marker: never returned
    os.makedirs(tmp_path / ".x.tmp-0123abcd0123")
    assert find_staging_debris(st) == [leftover]
    st.remove(find_staging_debris(st))
    assert _leftovers(tmp_path) == [".editor.tmp-0123abcd", ".x.tmp-0123abcd0123", "slow.py"]


def test_handle_termination_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with handle_termination():
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ 4. one retry policy
def test_retry_policy_backoff_and_classification():
    p = RetryPolicy(attempts=4, first_delay=0.1, max_delay=0.3, jitter=0.25)
    assert [p.delay(i, rng=lambda a, b: 1.0) for i in range(4)] == [0.1, 0.2, 0.3, 0.3]
    assert p.delay(0, rng=lambda a, b: a) == pytest.approx(0.075) and p.delay(0, rng=lambda a, b: b) == pytest.approx(0.125)
    calls, slept, retried = [], [], []

    def flaky():
        calls.append(1)
        raise OSError(errno.EIO, "flaky")

    with pytest.raises(RetryExhausted, match=r"read x failed after 4 attempt\(s\): OSError") as err:
        p.call("read x", flaky, on_retry=retried.append, sleep=slept.append)
    assert len(calls) == 4 and len(retried) == 3 and len(slept) == 3 and slept == sorted(slept)
    assert err.value.attempts == 4 and isinstance(err.value.last, OSError) and is_transient(err.value)
    for permanent in (
        OSError(errno.ENOSPC, "full"),
        OSError(errno.EDQUOT, "quota"),
        FileNotFoundError("x"),
        PermissionError("x"),
        ValueError("x"),
        StorageError("truncated"),
        KeyboardInterrupt(),
    ):
        assert not is_transient(permanent), permanent
        calls.clear()

        def fail(exc=permanent):
            calls.append(1)
            raise exc

        with pytest.raises(type(permanent)):
            p.call("x", fail, sleep=slept.append)
        assert len(calls) == 1, permanent
    for transient in (OSError(errno.EIO, "io"), TransientError("503"), ConnectionResetError(), TimeoutError()):
        assert is_transient(transient), transient
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_every_backend_retries_with_the_store_policy(plan, monkeypatch):
    monkeypatch.setattr(Store, "retry_policy", RetryPolicy(attempts=3, first_delay=0.0))
    st = open_storage("faulty://pol/x")
    st.put("a.bin", b"abc")
    plan.fail("read", k=1, times=2)
    assert st.read_bytes("a.bin") == b"abc" and st.retried == 2
    plan.fail("read", k=1, persistent=True)
    with pytest.raises(RetryExhausted, match="after 3 attempt"):
        st.read_bytes("a.bin")


# ------------------------------------------------------------------ http(s): a read-only backend
@pytest.fixture
def http_dir(tmp_path):
    from httpserver import FileServer

    root = tmp_path / "www"
    root.mkdir()
    with FileServer(root) as srv:
        yield root, srv


def test_http_store_reads_ranges_and_refuses_writes(http_dir):
    root, srv = http_dir
    data = np.random.default_rng(2).integers(0, 256, (2 * MiB) + 77, dtype=np.uint8).tobytes()
    (root / "d").mkdir()
    (root / "d" / "a b.bin").write_bytes(data)
    st = open_storage(srv.url + "/d")
    assert type(st).__name__ == "HttpStore" and not st.caps.listing and not st.caps.writable
    assert st.size("a b.bin") == len(data) and st.exists("a b.bin") and not st.exists("nope")
    assert bytes(st.read_range("a b.bin", 1000, 5000)) == data[1000:6000]
    st.read_piece = MiB
    buf = bytearray(len(data) - 10)
    st.read_many([("a b.bin", 10, memoryview(buf))])
    assert bytes(buf) == data[10:]
    assert st.read_bytes("a b.bin") == data
    with pytest.raises(StorageError, match="limit"):
        st.read_bytes("a b.bin", limit=10)
    with pytest.raises(FileNotFoundError):
        st.read_bytes("nope")
    with pytest.raises(StorageError, match="past|truncated"):
        st.read_range("a b.bin", len(data) - 1, 10)
    with pytest.raises(StorageError, match="no directory listing"):
        st.listdir()
    for write in (lambda: st.put("x", b"1"), lambda: st.put_atomic("x", b"1"), lambda: st.remove(["a b.bin"])):
        with pytest.raises(StorageError, match="read-only"):
            write()
    s = st.open_stream("a b.bin", 100)
    assert (s.start, s.total, b"".join(s.chunks)) == (100, len(data), data[100:])
    s.close()
    # transient server errors are retried by the store's policy; a 403 is not
    st.retry_policy = RetryPolicy(attempts=3, first_delay=0.0)
    srv.fail_next("/d/a b.bin", 503, 2)
    assert bytes(st.read_range("a b.bin", 0, 10)) == data[:10] and st.retried == 2
    srv.fail_next("/d/a b.bin", 403, 1)
    with pytest.raises(StorageError, match="HTTP 403") as err:
        st.read_range("a b.bin", 0, 10)
    assert err.value.status == 403


def test_merge_reads_a_checkpoint_over_http(http_dir, tmp_path):
    root, srv = http_dir
    state = sample_state(3)
    api.save(state, tmp_path / "ck")
    api.merge(tmp_path / "ck", root / "m.ckpt")
    rep = api.merge(f"{srv.url}/m.ckpt", tmp_path / "out.safetensors")
    got = api.load(tmp_path / "out.safetensors")
    assert got["b16"].tobytes() == state["b16"].tobytes() and got["step"] == state["step"]
    assert rep["read"]["ratio"] <= 1.05
