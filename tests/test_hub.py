"""distckpt.hub: name → URL → cache, against a local HTTP server (no external network)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path

import fsspec
import pytest

from distckpt import hub
from distckpt.errors import DownloadError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from httpserver import FileServer  # noqa: E402

CKPT = "mindspore_model.ckpt"


def _blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) % 251 for i in range(n))


def _write(path: Path, data: bytes | str | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(json.dumps(data))
    return path


def _populate(root: Path) -> None:
    """A small hub: a single-file model, a sharded model, a yaml-only distckpt model."""
    _write(root / "models.json", ["llama_tiny", "org/sharded", "yaml_model"])
    m = root / "llama_tiny"
    _write(m / "config.json", {"model_type": "llama", "hidden_size": 8})
    _write(m / CKPT, _blob(300_000))
    _write(m / "tokenizer_config.json", {"model_max_length": 16})
    _write(m / "tokenizer.model", _blob(1000, 3))

    s = root / "org" / "sharded"
    _write(s / "config.json", {"model_type": "llama"})
    shards = [f"mindspore_model-0000{k}-of-00002.ckpt" for k in (1, 2)]
    for k, shard in enumerate(shards):
        _write(s / shard, _blob(50_000 + k, k))
    _write(s / f"{CKPT}.index.json", {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1], "c": shards[0]}})
    _write(s / CKPT, b"must not be fetched: the index comes first")

    y = root / "yaml_model"
    _write(y / "yaml_model.yaml", "model:\n  arch: llama\n")
    _write(y / "distckpt.index.json", {"format": "distckpt/1", "files": {"data/0.bin": {}, "data/1.bin": {}}})
    _write(y / "data" / "0.bin", _blob(4096, 1))
    _write(y / "data" / "1.bin", _blob(4096, 2))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (hub.HUB_ENV, hub.CACHE_ENV, "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def hub_dir(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    _populate(root)
    return root


@pytest.fixture
def srv(hub_dir: Path):
    with FileServer(hub_dir) as server:
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _same_tree(local: str, remote: Path, rels: list[str]) -> None:
    for rel in rels:
        assert (Path(local) / rel).read_bytes() == (remote / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------------
def test_name_download_then_cache_offline(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    url = srv.url
    path = hub.resolve("llama_tiny", hub_url=url, cache_dir=cache)
    assert path.startswith(str(cache)) and path.endswith("llama_tiny")
    _same_tree(path, hub_dir / "llama_tiny", ["config.json", CKPT, "tokenizer_config.json", "tokenizer.model"])
    manifest = json.loads((Path(path) / hub.MANIFEST_NAME).read_text())
    assert manifest["files"][CKPT] == 300_000
    assert not (Path(path) / "vocab.json").exists()
    assert not list(Path(path).rglob("*.incomplete"))
    first = srv.requests
    assert len(srv.gets(f"/llama_tiny/{CKPT}")) == 1

    srv.stop()
    again = hub.resolve("llama_tiny", hub_url=url, cache_dir=cache)
    assert again == path
    assert srv.requests == first  # nothing new: the cache answered

    # local_files_only over a complete cache works, also without any hub configured
    assert hub.resolve("llama_tiny", hub_url=url, cache_dir=cache, local_files_only=True) == path
    assert hub.resolve("llama_tiny", cache_dir=cache, local_files_only=True) == path


def test_second_call_with_dead_server_uses_cache_even_via_env(srv: FileServer, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv(hub.HUB_ENV, srv.url)
    monkeypatch.setenv(hub.CACHE_ENV, str(cache))
    assert hub.default_cache_dir() == str(cache)
    path = hub.resolve("llama_tiny")
    n = len(srv.requests)
    srv.stop()
    assert hub.resolve("llama_tiny") == path
    assert len(srv.requests) == n


def test_force_download_redownloads(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    (hub_dir / "llama_tiny" / CKPT).write_bytes(_blob(1234, 9))
    assert hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache) == path
    assert len(srv.gets(f"/llama_tiny/{CKPT}")) == 1  # cached: stale but complete
    assert hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, force_download=True) == path
    assert len(srv.gets(f"/llama_tiny/{CKPT}")) == 2
    assert len(srv.gets("/llama_tiny/config.json")) == 2
    assert (Path(path) / CKPT).read_bytes() == _blob(1234, 9)
    assert json.loads((Path(path) / hub.MANIFEST_NAME).read_text())["files"][CKPT] == 1234


def test_local_files_only_with_empty_cache(srv: FileServer, cache: Path) -> None:
    with pytest.raises(DownloadError) as err:
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, local_files_only=True)
    msg = str(err.value)
    assert "local_files_only" in msg and hub.MANIFEST_NAME in msg and str(cache) in msg
    assert srv.requests == []
    with pytest.raises(DownloadError, match=hub.HUB_ENV):
        hub.resolve("llama_tiny", cache_dir=cache, local_files_only=True)


def test_incomplete_cache_is_not_complete(srv: FileServer, cache: Path) -> None:
    path = Path(hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache))
    (path / CKPT).write_bytes(b"truncated")
    with pytest.raises(DownloadError, match="not fully cached"):
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, local_files_only=True)
    (path / hub.MANIFEST_NAME).unlink()
    (path / CKPT).unlink()
    hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert (path / CKPT).stat().st_size == 300_000


def test_missing_name_lists_urls(srv: FileServer, cache: Path) -> None:
    with pytest.raises(DownloadError) as err:
        hub.resolve("org/nope", hub_url=srv.url, cache_dir=cache)
    msg = str(err.value)
    for rel in ("files.json", "config.json", "nope.yaml", "mindspore_model.yaml"):
        assert f"{srv.url}/org/nope/{rel}" in msg
    assert "'org/nope'" in msg


def test_missing_weights_lists_urls(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    _write(hub_dir / "noweights" / "config.json", {})
    with pytest.raises(DownloadError, match="no weights") as err:
        hub.resolve("noweights", hub_url=srv.url, cache_dir=cache)
    for rel in hub._WEIGHT_FILES:
        assert f"{srv.url}/noweights/{rel}" in str(err.value)


@pytest.mark.parametrize("bad", ["../x", "/abs/model", "a/../../b", "a\\b", "a b", "", "x/./y"])
def test_bad_names(bad: str, srv: FileServer, cache: Path) -> None:
    with pytest.raises(DownloadError):
        hub.resolve(bad, hub_url=srv.url, cache_dir=cache)
    assert srv.requests == []


def test_no_hub_configured(cache: Path) -> None:
    with pytest.raises(DownloadError, match="DISTCKPT_HUB_URL"):
        hub.resolve("llama_tiny", cache_dir=cache)


def test_local_dir_and_foreign_url_unchanged(tmp_path: Path, srv: FileServer, cache: Path) -> None:
    assert hub.resolve(str(tmp_path), hub_url=srv.url, cache_dir=cache) == str(tmp_path)
    assert hub.resolve(tmp_path) == str(tmp_path)
    for url in ("memory://ckpt/x", "s3://bucket/model", "file:///data/model", "http://elsewhere:1/model"):
        assert hub.resolve(url, hub_url=srv.url, cache_dir=cache) == url
    assert srv.requests == []
    # a URL under the hub is a model name
    path = hub.resolve(f"{srv.url}/llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert path == hub.resolve("llama_tiny", hub_url=srv.url + "/", cache_dir=cache)


def test_interrupted_download_resumes_with_range(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "BLOCK_SIZE", 4096)
    srv.cut_once(f"/llama_tiny/{CKPT}", 100_000)
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    gets = srv.gets(f"/llama_tiny/{CKPT}")
    assert len(gets) == 2 and gets[0][2] is None
    start = int(gets[1][2].removeprefix("bytes=").removesuffix("-"))
    assert gets[1][2] == f"bytes={start}-" and 0 < start <= 100_000
    assert (Path(path) / CKPT).read_bytes() == (hub_dir / "llama_tiny" / CKPT).read_bytes()


def _crash_midway(srv: FileServer, cache: Path, monkeypatch, cut: int = 120_000) -> Path:
    """First resolution dies mid-file (one attempt only): leaves just .incomplete debris."""
    monkeypatch.setattr(hub, "BLOCK_SIZE", 4096)
    monkeypatch.setattr(hub, "MAX_ATTEMPTS", 1)
    srv.cut_once(f"/llama_tiny/{CKPT}", cut)
    with pytest.raises(DownloadError, match="resume") as err:
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert f"{srv.url}/llama_tiny/{CKPT}" in str(err.value)
    monkeypatch.setattr(hub, "MAX_ATTEMPTS", 4)
    (partial,) = cache.rglob(f"{CKPT}.incomplete")
    assert 0 < partial.stat().st_size <= cut
    model = partial.parent
    assert not (model / CKPT).exists() and not (model / hub.MANIFEST_NAME).exists()
    with pytest.raises(DownloadError):
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, local_files_only=True)
    return partial


def test_crash_then_resume_continues_partial(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    partial = _crash_midway(srv, cache, monkeypatch)
    n = partial.stat().st_size
    srv.clear_log()
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert srv.gets(f"/llama_tiny/{CKPT}") == [("GET", f"/llama_tiny/{CKPT}", f"bytes={n}-")]
    assert (Path(path) / CKPT).read_bytes() == (hub_dir / "llama_tiny" / CKPT).read_bytes()
    assert not partial.exists()


def test_resume_disabled_restarts(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    _crash_midway(srv, cache, monkeypatch)
    srv.clear_log()
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, resume_download=False)
    assert srv.gets(f"/llama_tiny/{CKPT}") == [("GET", f"/llama_tiny/{CKPT}", None)]
    assert (Path(path) / CKPT).read_bytes() == (hub_dir / "llama_tiny" / CKPT).read_bytes()


def test_server_without_range_restarts_cleanly(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    partial = _crash_midway(srv, cache, monkeypatch)
    n = partial.stat().st_size
    srv.range_supported = False
    srv.clear_log()
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert srv.gets(f"/llama_tiny/{CKPT}") == [("GET", f"/llama_tiny/{CKPT}", f"bytes={n}-")]  # asked, got 200
    assert (Path(path) / CKPT).read_bytes() == (hub_dir / "llama_tiny" / CKPT).read_bytes()
    assert not partial.exists()


def test_whole_partial_file_gets_416_and_is_kept(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    partial = _crash_midway(srv, cache, monkeypatch)
    data = (hub_dir / "llama_tiny" / CKPT).read_bytes()
    partial.write_bytes(data)  # crashed after the last byte, before the rename
    srv.clear_log()
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert srv.gets(f"/llama_tiny/{CKPT}") == [("GET", f"/llama_tiny/{CKPT}", f"bytes={len(data)}-")]
    assert (Path(path) / CKPT).read_bytes() == data


def test_sharded_index(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    path = hub.resolve("org/sharded", hub_url=srv.url, cache_dir=cache)
    shards = [f"mindspore_model-0000{k}-of-00002.ckpt" for k in (1, 2)]
    _same_tree(path, hub_dir / "org" / "sharded", ["config.json", f"{CKPT}.index.json", *shards])
    assert not (Path(path) / CKPT).exists()  # first weight set wins
    for shard in shards:
        assert len(srv.gets(f"/org/sharded/{shard}")) == 1


def test_safetensors_index(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    m = hub_dir / "st"
    _write(m / "config.json", {})
    _write(m / "model-00001-of-00001.safetensors", _blob(999))
    _write(m / "model.safetensors.index.json", {"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    path = hub.resolve("st", hub_url=srv.url, cache_dir=cache)
    _same_tree(path, m, ["model.safetensors.index.json", "model-00001-of-00001.safetensors"])


def test_yaml_config_and_distckpt_index(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    path = hub.resolve("yaml_model", hub_url=srv.url, cache_dir=cache)
    _same_tree(path, hub_dir / "yaml_model", ["yaml_model.yaml", "distckpt.index.json", "data/0.bin", "data/1.bin"])
    files = json.loads((Path(path) / hub.MANIFEST_NAME).read_text())["files"]
    assert set(files) == {"yaml_model.yaml", "distckpt.index.json", "data/0.bin", "data/1.bin"}


@pytest.mark.parametrize(
    "hostile", ["../evil.ckpt", "../../evil.ckpt", "/tmp/evil.ckpt", "..\\evil.ckpt", "a/../../evil.ckpt"]
)
def test_hostile_index_names_rejected(hostile: str, srv: FileServer, hub_dir: Path, tmp_path: Path) -> None:
    m = hub_dir / "bad"
    _write(hub_dir / "evil.ckpt", b"evil")
    _write(m / "config.json", {})
    _write(m / "ok.ckpt", b"ok")
    _write(m / f"{CKPT}.index.json", {"weight_map": {"a": "ok.ckpt", "b": hostile}})
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(DownloadError) as err:
        hub.resolve("bad", hub_url=srv.url, cache_dir=cache)
    assert repr(hostile) in str(err.value)
    assert not any("evil" in r[1] for r in srv.requests)
    written = [p for p in tmp_path.rglob("evil*") if hub_dir not in p.parents]
    assert written == []
    assert not Path("/tmp/evil.ckpt").exists() or Path("/tmp/evil.ckpt").read_bytes() != b"evil"


def test_hostile_distckpt_and_listing_names(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    _write(hub_dir / "d" / "config.json", {})
    _write(hub_dir / "d" / "distckpt.index.json", {"files": {"../../evil.bin": {}}})
    with pytest.raises(DownloadError, match=r"'\.\./\.\./evil\.bin'"):
        hub.resolve("d", hub_url=srv.url, cache_dir=cache)
    _write(hub_dir / "l" / "files.json", ["config.json", "/etc/passwd"])
    with pytest.raises(DownloadError, match="'/etc/passwd'"):
        hub.resolve("l", hub_url=srv.url, cache_dir=cache)


def test_files_json_listing_is_exact(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    m = hub_dir / "listed"
    _write(m / "config.json", {})
    _write(m / "model.safetensors", _blob(777))
    _write(m / "README.md", "hello")
    _write(m / "tokenizer.json", {})  # on the hub but not listed: not fetched
    _write(m / "files.json", ["config.json", "model.safetensors", "README.md"])
    path = hub.resolve("listed", hub_url=srv.url, cache_dir=cache)
    assert sorted(p.name for p in Path(path).iterdir()) == sorted(
        ["config.json", "model.safetensors", "README.md", "files.json", hub.MANIFEST_NAME]
    )
    assert {r[1] for r in srv.requests} == {
        f"/listed/{f}" for f in ("files.json", "config.json", "model.safetensors", "README.md")
    }


def _resolve_worker(url: str, cache: str, barrier, out) -> None:
    barrier.wait(timeout=60)
    try:
        out.put(("ok", hub.resolve("llama_tiny", hub_url=url, cache_dir=cache, progress=False)))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def test_concurrent_resolution_from_four_processes(srv: FileServer, hub_dir: Path, cache: Path) -> None:
    srv.throttle = 0.01  # ~0.05 s per file: the other ranks must wait on the lock
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_resolve_worker, args=(srv.url, str(cache), barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(kind == "ok" for kind, _ in results), results
    paths = {path for _, path in results}
    assert len(paths) == 1
    (path,) = paths
    for rel in ("config.json", CKPT, "tokenizer_config.json", "tokenizer.model"):
        assert len(srv.gets(f"/llama_tiny/{rel}")) == 1, rel
        assert (Path(path) / rel).read_bytes() == (hub_dir / "llama_tiny" / rel).read_bytes()
    assert not list(Path(path).rglob("*.incomplete"))
    assert hub._cache_complete(path)


def test_file_url_hub(hub_dir: Path, cache: Path) -> None:
    path = hub.resolve("org/sharded", hub_url=hub_dir.as_uri(), cache_dir=cache)
    assert Path(path).is_relative_to(cache)
    _same_tree(path, hub_dir / "org" / "sharded", ["config.json", "mindspore_model-00002-of-00002.ckpt"])
    # plain local path as hub, and list_models over file://
    path2 = hub.resolve("llama_tiny", hub_url=str(hub_dir), cache_dir=cache)
    _same_tree(path2, hub_dir / "llama_tiny", [CKPT, "tokenizer.model"])
    assert hub.list_models(hub_dir.as_uri()) == ["llama_tiny", "org/sharded", "yaml_model"]


def test_memory_hub_and_resume(cache: Path, monkeypatch) -> None:
    fs = fsspec.filesystem("memory")
    base = "memory://distckpt-hub-test"
    try:
        fs.pipe(f"{base}/m/config.json", b"{}")
        fs.pipe(f"{base}/m/model.safetensors", _blob(20_000))
        path = hub.resolve("m", hub_url=base, cache_dir=cache)
        assert (Path(path) / "model.safetensors").read_bytes() == _blob(20_000)
        # a partial file is continued by seeking
        fs.pipe(f"{base}/m2/config.json", b"{}")
        fs.pipe(f"{base}/m2/model.safetensors", _blob(20_000, 5))
        model = Path(cache) / hub._hub_id(base) / "m2"
        _write(model / "model.safetensors.incomplete", _blob(20_000, 5)[:7000])
        path = hub.resolve("m2", hub_url=base, cache_dir=cache)
        assert (Path(path) / "model.safetensors").read_bytes() == _blob(20_000, 5)
        fs.pipe(f"{base}/models.json", json.dumps({"llama": ["llama_7b", "llama_13b"], "gpt2": {"x": 1}}).encode())
        assert hub.list_models(base) == ["llama_7b", "llama_13b", "gpt2"]
    finally:
        fs.rm(base, recursive=True)


def test_list_models(srv: FileServer, hub_dir: Path) -> None:
    assert hub.list_models(srv.url) == ["llama_tiny", "org/sharded", "yaml_model"]
    (hub_dir / "models.json").unlink()
    with pytest.raises(DownloadError, match="models.json"):
        hub.list_models(srv.url)
    with pytest.raises(DownloadError, match=hub.HUB_ENV):
        hub.list_models()


def test_proxies_are_used(srv: FileServer, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "MAX_ATTEMPTS", 1)
    with pytest.raises(DownloadError):
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, proxies={"http": "http://127.0.0.1:9"})
    assert srv.requests == []  # everything went to the (dead) proxy


def test_progress_bar(srv: FileServer, cache: Path, capsys) -> None:
    hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, progress=True)
    assert "mindspore_model.ckpt" in capsys.readouterr().err


def test_http_server_ranges(hub_dir: Path) -> None:
    import requests

    with FileServer(hub_dir) as server:
        url = f"{server.url}/llama_tiny/{CKPT}"
        data = (hub_dir / "llama_tiny" / CKPT).read_bytes()
        r = requests.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        r = requests.get(url, headers={"Range": "bytes=-5"})
        assert r.status_code == 206 and r.content == data[-5:]
        r = requests.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
        assert requests.get(url, headers={"Range": "bytes=x"}).status_code == 416
        r = requests.head(url)
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(data)
        assert requests.get(f"{server.url}/../etc/passwd").status_code == 404
        server.range_supported = False
        r = requests.get(url, headers={"Range": "bytes=10-"})
        assert r.status_code == 200 and r.content == data
        assert ("HEAD", f"/llama_tiny/{CKPT}", None) in server.requests
    assert not server.running


# ---------------------------------------------------------------------------------------------
# the hub reads, retries and writes through distckpt.storage
def test_server_errors_are_retried_by_the_storage_policy(srv: FileServer, hub_dir: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "FIRST_RETRY_DELAY", 0.0)
    srv.fail_next("/llama_tiny/config.json", 503, 2)
    srv.fail_next(f"/llama_tiny/{CKPT}", 429, 1)
    path = hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert len(srv.gets("/llama_tiny/config.json")) == 3 and len(srv.gets(f"/llama_tiny/{CKPT}")) == 2
    _same_tree(path, hub_dir / "llama_tiny", ["config.json", CKPT])
    # MAX_ATTEMPTS transient failures in a row: one error naming the URL and the last failure
    srv.fail_next("/org/sharded/config.json", 503, 10)
    with pytest.raises(DownloadError, match=r"config.json failed after 4 attempts \(HTTP 503 from "):
        hub.resolve("org/sharded", hub_url=srv.url, cache_dir=cache)
    assert len(srv.gets("/org/sharded/config.json")) == 4


def test_forbidden_is_not_retried(srv: FileServer, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "FIRST_RETRY_DELAY", 0.0)
    srv.fail_next(f"/llama_tiny/{CKPT}", 403, 5)
    with pytest.raises(DownloadError, match=r"HTTP 403 .*check access rights.*files\.json"):
        hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache)
    assert len(srv.gets(f"/llama_tiny/{CKPT}")) == 1
    assert not list(cache.rglob(CKPT))


def test_fifo_in_the_cache_is_refused_not_waited_on(srv: FileServer, cache: Path) -> None:
    """A FIFO planted as the cache manifest or a cached file: the cache is incomplete, nothing blocks."""
    import threading

    path = Path(hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache))
    (path / hub.MANIFEST_NAME).unlink()
    os.mkfifo(path / hub.MANIFEST_NAME)
    box: dict = {}

    def probe() -> None:
        try:
            hub.resolve("llama_tiny", hub_url=srv.url, cache_dir=cache, local_files_only=True)
        except DownloadError as exc:
            box["error"] = str(exc)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "resolve blocked on a FIFO in the cache"
    assert "not fully cached" in box["error"]
