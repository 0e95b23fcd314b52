"""S3 over real HTTP (moto's server on 127.0.0.1, s3fs): bytes read counted on the server,
concurrent ranged GETs, retries of server errors, the CLI with --storage-options."""

from __future__ import annotations

import json
import uuid

import ml_dtypes
import numpy as np
import pytest

from distckpt import api
from distckpt.errors import StorageError
from distckpt.execute import ReadStats
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.storage import Storage, open_storage

NO_BOTO_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def split_strategy(names, n: int, dim: int = 0, ndim: int = 2) -> Strategy:
    tm = [-1] * ndim
    tm[dim] = 0
    return Strategy({nm: ParamSpec(nm, TensorLayout((n,), tuple(tm))) for nm in names})


def _state() -> dict:
    rng = np.random.default_rng(7)
    return {
        "w1": rng.standard_normal((1024, 1024)).astype(np.float32),  # 4 MiB, rows of 4 KiB
        "w2": rng.standard_normal((4096, 512)).astype(ml_dtypes.bfloat16),  # 4 MiB, rows of 1 KiB
    }


def _save_two_ranks(url: str, state: dict, block_size: int = 1 << 20) -> Strategy:
    """A 2-rank row-split checkpoint written the way a job writes it: each rank its half, then finalize."""
    s2 = split_strategy(list(state), 2)
    for r in range(2):
        local = {k: v[v.shape[0] // 2 * r : v.shape[0] // 2 * (r + 1)] for k, v in state.items()}
        api.save(local, url, strategy=s2, rank=r, block_size=block_size)
    api.finalize(url)
    return s2


@pytest.fixture(scope="module")
def row_ckpt(s3_server):
    """(url, key prefix, state): a 2-rank row-split checkpoint on s3 (1 MiB checksum blocks)."""
    prefix = f"rows-{uuid.uuid4().hex[:8]}"
    state = _state()
    _save_two_ranks(s3_server.url(prefix), state)
    return s3_server.url(prefix), prefix, state


def _load_all_ranks(s3_server, url: str, prefix: str, strat: Strategy, *, verify: bool):
    """Load every rank's slices; return (bytes needed, ReadStats bytes, server GET bytes, GETs)."""
    s3_server.reset()
    stats = ReadStats()
    for r in range(strat.world_size):
        got = api.load(url, strategy=strat, rank=r, verify=verify, stats=stats)
        assert set(got) == {"w1", "w2"}
    server, gets = s3_server.get_bytes(f"{prefix}/data-")
    return stats.bytes_needed, stats.bytes_read, server, gets


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("verify", [True, False])
def test_row_reshard_reads_only_what_it_needs(s3_server, row_ckpt, n, verify):
    url, prefix, state = row_ckpt
    strat = split_strategy(["w1", "w2"], n)
    needed, counted, server, gets = _load_all_ranks(s3_server, url, prefix, strat, verify=verify)
    assert needed == sum(v.nbytes for v in state.values())
    assert server == counted, "the server served exactly what ReadStats counted"
    assert server / needed <= 1.05, (n, verify, server / needed)
    part = api.load(url, strategy=strat, rank=n - 1)
    rows = 1024 // n
    assert np.array_equal(part["w1"], state["w1"][rows * (n - 1) :])


def test_row_reshard_8_ways_with_smaller_blocks(s3_server):
    """8 ways cuts 512 KiB runs: with 1 MiB blocks verification would read 2x; 256 KiB blocks keep it exact."""
    prefix = f"rows8-{uuid.uuid4().hex[:8]}"
    state = _state()
    _save_two_ranks(s3_server.url(prefix), state, block_size=256 << 10)
    strat = split_strategy(["w1", "w2"], 8)
    needed, counted, server, _ = _load_all_ranks(s3_server, s3_server.url(prefix), prefix, strat, verify=True)
    assert server == counted and server / needed <= 1.05


def test_inner_dim_split_ratio_is_reported(s3_server, row_ckpt):
    """A column split leaves a short run per row: the cost model reads one covering range (few requests)."""
    url, prefix, state = row_ckpt
    strat = split_strategy(["w1", "w2"], 4, dim=1)
    needed, counted, server, gets = _load_all_ranks(s3_server, url, prefix, strat, verify=False)
    assert server == counted
    ratio = server / needed
    # each rank needs 1/4 of every row; reading every row alone would be 1024+ GETs per rank
    assert gets <= 4 * 2 * 2 * 2, gets
    assert 1.0 <= ratio <= 4.0, ratio
    print(f"inner-dim (4 column blocks) bytes read / needed = {ratio:.3f} in {gets} GETs")


def test_offline_reshard_on_s3(s3_server, row_ckpt):
    url, prefix, state = row_ckpt
    dst = s3_server.url(f"out-{uuid.uuid4().hex[:8]}")
    rep = api.reshard(url, dst, dst_strategy=split_strategy(["w1", "w2"], 4))
    assert rep["read"]["ratio"] <= 1.05
    assert api.verify(dst)["ok"]
    assert np.array_equal(api.load(dst)["w2"].view(np.uint16), state["w2"].view(np.uint16))


def test_reads_are_concurrent(s3_server, row_ckpt, monkeypatch):
    url, prefix, state = row_ckpt
    monkeypatch.setattr(Storage, "read_piece", 1 << 20)
    s3_server.reset()
    s3_server.get_delay = 0.2  # a slow store: serial GETs would take >= 0.8 s
    got = api.load(url, names=["w1"])
    s3_server.get_delay = 0.0
    assert np.array_equal(got["w1"], state["w1"])
    _, gets = s3_server.get_bytes(f"{prefix}/data-")
    assert gets >= 4  # 4 MiB in 1 MiB pieces
    assert s3_server.max_inflight >= 4, "ranged GETs were issued one at a time"  # counted by the server, not timed


def test_server_errors_are_retried_with_backoff(s3_server, monkeypatch):
    monkeypatch.setattr(Storage, "backoff", 0.01)
    prefix = f"retry-{uuid.uuid4().hex[:8]}"
    url = s3_server.url(prefix)
    a = np.arange(300_000, dtype=np.float32)
    # writes: two failed PUTs of the data object and one of the index
    s3_server.fail_next("PUT", f"{prefix}/data-", 2)
    s3_server.fail_next("PUT", f"{prefix}/distckpt.index.json", 1)
    api.save({"a": a}, url, storage_options=NO_BOTO_RETRIES)
    # reads: three failed GETs of the data, then success
    s3_server.fail_next("GET", f"{prefix}/data-", 3)
    assert np.array_equal(api.load(url, storage_options=NO_BOTO_RETRIES)["a"], a)
    failed = [q for m, p, q, n in s3_server.requests if n < 0 and p.startswith(f"/{s3_server.bucket}/{prefix}")]
    assert len(failed) == 6
    # a persistent failure surfaces as a StorageError naming the object, after Storage.retries attempts
    s3_server.fail_next("GET", f"{prefix}/data-", 1000)
    with pytest.raises(StorageError, match=r"data-.*failed after 5 attempt"):
        api.load(url, storage_options=NO_BOTO_RETRIES)
    s3_server.reset()
    assert np.array_equal(api.load(url)["a"], a)


def test_cli_with_storage_options(s3_server, monkeypatch, capsys, tmp_path):
    """--storage-options JSON carries the endpoint when the environment does not."""
    from distckpt.cli import main

    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    url = s3_server.url(prefix)
    api.save({"a": np.arange(10, dtype=np.int32), "step": 5}, url)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server.endpoint}})
    assert main(["inspect", url, "--json", "--storage-options", opts]) == 0
    assert json.loads(capsys.readouterr().out)["values"] == {"step": 5}
    assert main(["verify", url, "-q", "--storage-options", opts]) == 0
    assert main(["merge", url, str(tmp_path / "m.ckpt"), "-q", "--storage-options", opts]) == 0
    assert api.load(tmp_path / "m.ckpt")["step"] == 5
    assert main(["gc", url, "-q", "--storage-options", opts]) == 0


def test_failed_data_upload_publishes_nothing(s3_server, monkeypatch):
    """A data upload that keeps failing leaves no object and no index (nothing half-written to clean)."""
    monkeypatch.setattr(Storage, "backoff", 0.01)
    prefix = f"mpu-{uuid.uuid4().hex[:8]}"
    url = s3_server.url(prefix)
    s3_server.fail_next("PUT", f"{prefix}/data-", 1000)  # every part upload / PUT of the data fails
    with pytest.raises(Exception, match="failed"):
        api.save({"a": np.zeros(9 << 20, np.uint8)}, url, storage_options=NO_BOTO_RETRIES)
    s3_server.reset()
    st = open_storage(url)
    assert st.listdir() == []


def test_commit_is_one_put_after_the_data(s3_server):
    """Object-store commit: data objects first, then the index in exactly one PUT, then old data deleted."""
    prefix = f"put-{uuid.uuid4().hex[:8]}"
    url = s3_server.url(prefix)
    api.save({"a": np.ones(1000, np.float32)}, url)
    s3_server.reset()
    api.save({"a": np.zeros(1000, np.float32)}, url)
    mine = f"/{s3_server.bucket}/{prefix}/"
    events = []  # mutating requests in order: ("put", object name) or ("delete", "")
    for m, p, q, _n in s3_server.requests:
        if m == "PUT" and p.startswith(mine):
            events.append(("put", p[len(mine):]))
        elif (m == "POST" and "delete" in q) or (m == "DELETE" and p.startswith(mine)):
            events.append(("delete", ""))
    puts = [name for kind, name in events if kind == "put"]
    # the save marker (gc's proof, issue 11 B.11) first, then the data, the chunk table and checksum column
    # (index version 2), then the index in one PUT
    assert len(puts) == 5 and puts[0].startswith(".distckpt-save-") and puts[1].startswith("data-"), events
    assert puts[2].startswith("chunks-") and puts[3].startswith("crc32c-") and puts[4] == "distckpt.index.json", events
    first_delete = next(i for i, e in enumerate(events) if e[0] == "delete")
    assert first_delete > events.index(("put", "distckpt.index.json")), events
    assert open_storage(url).listdir() == sorted(["distckpt.index.json", *puts[1:4]])  # old files and the marker are gone
    assert np.array_equal(api.load(url)["a"], np.zeros(1000, np.float32))
    assert len([n for n in open_storage(url).listdir() if n.startswith("data-")]) == 1


def test_cli_with_yaml_config_storage_options(s3_server, monkeypatch, tmp_path, capsys):
    from distckpt.cli import main

    url = s3_server.url(f"yaml-{uuid.uuid4().hex[:8]}")
    api.save({"a": np.arange(6, dtype=np.int16)}, url)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"checkpoint:\n  storage_options:\n    client_kwargs:\n      endpoint_url: {s3_server.endpoint}\n")
    assert main(["verify", url, "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_no_stale_listings_when_another_process_writes(s3_server):
    """s3fs caches listings; Storage must see objects another process (here boto3) adds or deletes."""
    import boto3

    prefix = f"stale-{uuid.uuid4().hex[:8]}"
    st = open_storage(s3_server.url(prefix))
    st.put("a.bin", b"1")
    assert st.listdir() == ["a.bin"] and not st.exists("b.bin")  # listing now cached by s3fs
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/b.bin", Body=b"22")
    client.delete_object(Bucket=s3_server.bucket, Key=f"{prefix}/a.bin")
    assert st.exists("b.bin") and st.size("b.bin") == 2
    assert not st.exists("a.bin")
    assert st.listdir() == ["b.bin"]
