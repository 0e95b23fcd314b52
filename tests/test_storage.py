"""Storage on any fsspec URL: the contract suite (local, memory, s3), the commit protocol,
inline checksums, retries and injected faults (``tests/faulty.py``)."""

from __future__ import annotations

import json
import os
import sys

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
from distckpt.storage import Storage, env_storage_options, merge_options, open_storage  # noqa: E402
from distckpt.strategy import dump_strategy_proto  # noqa: E402
from distckpt.testing import check_roundtrip, check_storage_contract, sample_state  # noqa: E402


def split_strategy(names, n: int, dim: int = 0, ndim: int = 2) -> Strategy:
    tm = [-1] * ndim
    tm[dim] = 0
    return Strategy({nm: ParamSpec(nm, TensorLayout((n,), tuple(tm))) for nm in names})


def data_files(st: Storage) -> list[str]:
    return sorted(n for n in st.listdir() if n.startswith("data-"))


def committed(st: Storage) -> Index:
    return Index.loads(st.read_bytes(INDEX_NAME))


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
