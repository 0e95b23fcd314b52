"""Issue 11, D (items 17-21): every error is one clear line; a legal state is never refused.

17 no class names (``NotADirectoryError:``, ``FileNotFoundError:``, ``OSError:``, ``MemoryError:``,
   ``StopIteration:``, ``KeyError:``) -- the file and what is wrong with it, in words; sizes are
   checked against the files before anything is allocated;
18 a closed pipe ends ``inspect`` quietly;
19 usage errors exit 2 with the subcommand's usage; missing paths exit 1 with ``error:``;
20 ``inspect --json`` is strict JSON (non-finite floats as strings);
21 chunk keys never collide with user tensor names.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from issue11_util import REPO, assert_error, assert_nothing_at, cli, native_tp

import distckpt
from distckpt.errors import FormatError
from distckpt.index import INDEX_NAME
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.strategy import save_strategy


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"w": np.arange(16, dtype=np.float32).reshape(4, 4), "step": 2}, path)
    return path


# ------------------------------------------------------------------ item 17
def test_not_a_directory_in_words(tmp_path, capsys, ck):
    """error: NotADirectoryError: [Errno 20] Not a directory"""
    f = tmp_path / "afile"
    f.write_text("x")
    for args, path in ((("inspect", f / "sub"), f / "sub"), (("verify", f / "sub.ckpt"), f / "sub.ckpt"),
                       (("merge", ck, f / "sub" / "out"), f / "sub"), (("merge", ck, f / "x.ckpt"), f)):
        line = assert_error(cli(capsys, *args))
        assert str(path) in line, line
    assert f.read_text() == "x"


def test_missing_strategy_file_in_words(tmp_path, capsys, ck):
    """error: FileNotFoundError: strategy file not found: ..."""
    src, _, _ = native_tp(tmp_path / "native", 2)
    missing = tmp_path / "nope" / "strategy.ckpt"
    for args in (("merge", src, tmp_path / "m.ckpt", "--src-strategy", missing),
                 ("reshard", ck, tmp_path / "r", "--dst-strategy", missing),
                 ("inspect", src, "--src-strategy", missing)):
        line = assert_error(cli(capsys, *args), str(missing))
        assert "not found" in line
    assert_nothing_at(tmp_path / "m.ckpt")


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system (a tmpfs mounted ro), as in the issue's reproduction."""
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_read_only_file_system_in_words(capsys, ck, read_only_dir):
    """error: OSError: [Errno 30] Read-only file system"""
    for dst in (read_only_dir / "m.ckpt", read_only_dir / "merged", read_only_dir / "sub" / "m.safetensors"):
        line = assert_error(cli(capsys, "merge", ck, dst), "Read-only file system", str(read_only_dir))
        assert "OSError" not in line
    assert os.listdir(read_only_dir) == []


def _lying_index(path: Path, claim: int = 1 << 40) -> None:
    """Make the index claim a tensor of ``claim`` bytes in its (tiny) data file."""
    idx = path / INDEX_NAME
    doc = distckpt.sources.open_source(path).index.to_json()  # written back as an index version 1
    fname = next(iter(doc["files"]))
    t = doc["tensors"]["w"]
    rows = claim // (4 * (1 << 20))
    t["shape"] = [rows, 1 << 20]
    t["chunks"] = [dict(t["chunks"][0], offsets=[0, 0], sizes=[rows, 1 << 20], length=claim)]
    t["chunks"][0].pop("crc32c", None)
    doc["files"][fname]["size"] = claim + 4096
    idx.write_text(json.dumps(doc))


@pytest.mark.parametrize("args", [("merge", "{ck}", "{tmp}/m.ckpt"), ("merge", "{ck}", "{tmp}/m.safetensors"),
                                  ("merge", "{ck}", "{tmp}/mdir"), ("split", "{ck}", "{tmp}/s", "--dst-strategy",
                                                                    "{tmp}/tp2.ckpt")])
def test_an_index_claiming_a_1tib_tensor_in_a_tiny_file(tmp_path, capsys, args):
    """error: MemoryError: Unable to allocate 1.00 TiB -- sizes are checked against the file first."""
    ck = tmp_path / "ck"
    distckpt.save({"w": np.ones((4, 4), np.float32)}, ck)
    data = next(ck.glob("data-*.safetensors"))
    assert data.stat().st_size < 200
    _lying_index(ck)
    save_strategy(Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))}), tmp_path / "tp2.ckpt")
    argv = [a.format(ck=ck, tmp=tmp_path) for a in args]
    line = assert_error(cli(capsys, *argv), str(data), "needs bytes up to", f"has {data.stat().st_size} bytes")
    assert "memory" not in line.lower()
    assert_nothing_at(argv[2])
    with pytest.raises(FormatError, match="needs bytes up to"):
        distckpt.load(ck)
    assert "says 1099511631872" in assert_error(cli(capsys, "verify", ck))  # verify compares every file's size


@pytest.fixture
def rank_mode(tmp_path, monkeypatch):
    """A two-rank save waiting for finalize; returns (dir, rank 0's manifest as parsed JSON)."""
    monkeypatch.setenv("DISTCKPT_INDEX_VERSION", "1")  # manifests with chunk records inline (v2's: tests/test_commit.py)
    path = tmp_path / "rm"
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))})
    for r in range(2):
        distckpt.save({"w": np.full((2, 4), r, np.float32), "step": 3}, path, rank=r, strategy=strat)
    return path, json.loads((path / ".manifest-00000.json").read_text())


def _mut(fn):
    def apply(doc):
        doc = copy.deepcopy(doc)
        fn(doc)
        return json.dumps(doc).encode()
    return apply


CORRUPT_MANIFESTS = {
    "empty": lambda d: b"",
    "not json": lambda d: b"{",
    "a list": lambda d: b"[]",
    "no tensors": _mut(lambda d: d.pop("tensors")),                      # was KeyError: 'tensors'
    "tensors a string": _mut(lambda d: d.update(tensors="w")),
    "tensor entry empty": _mut(lambda d: d["tensors"].update(w=[])),      # was IndexError / StopIteration
    "shape a string": _mut(lambda d: d["tensors"].update(w=["float32", "4x4"])),  # was TypeError: 'str' object ...
    "dtype object": _mut(lambda d: d["tensors"].update(w=["object", [4, 4]])),
    "chunks a string": _mut(lambda d: d["chunks"].update(w="abc")),
    "chunk not an object": _mut(lambda d: d["chunks"].update(w=[1])),
    "chunk offsets a string": _mut(lambda d: d["chunks"]["w"][0].update(offsets="0,0")),
    "world 2**40": _mut(lambda d: d.update(world_size=2**40)),            # was MemoryError
    "world 2**24": _mut(lambda d: d.update(world_size=2**24)),
    "file size negative": _mut(lambda d: d["files"].update({k: -1 for k in d["files"]})),
    "value malformed": _mut(lambda d: d.update(values={"step": 5})),
    "strategy malformed": _mut(lambda d: d.update(strategy={"format": "x"})),
    "rank renamed": _mut(lambda d: d.update(rank=1)),
}


@pytest.mark.parametrize("case", list(CORRUPT_MANIFESTS))
def test_finalize_on_corrupt_manifests_in_words(capsys, rank_mode, case):
    """finalize on corrupt manifests: StopIteration:, KeyError: 'tensors', TypeError: ..., MemoryError:"""
    path, doc = rank_mode
    man = path / ".manifest-00000.json"
    man.write_bytes(CORRUPT_MANIFESTS[case](doc))
    line = assert_error(cli(capsys, "finalize", path))
    assert str(path) in line and ".manifest-" in line, line
    assert not (path / INDEX_NAME).exists()


def test_describe_error_never_shows_a_class_name():
    import errno

    from distckpt.cli import describe_error

    cases = {
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/b"): "/a/b: Not a directory",
        OSError(errno.EROFS, "Read-only file system", "/ro/x"): "/ro/x: Read-only file system",
        OSError(errno.ENOSPC, "No space left on device", "/full/x"): "/full/x: no space left",
        PermissionError(errno.EACCES, "Permission denied", "/p"): "/p: Permission denied",
        MemoryError("Unable to allocate 1.00 TiB"): "out of memory",
    }
    for exc, want in cases.items():
        got = describe_error(exc)
        assert got.startswith(want) and "Error" not in got.split(":")[0], got


# ------------------------------------------------------------------ item 18
def test_a_closed_pipe_ends_quietly(tmp_path):
    """distckpt inspect x | head -1 printed error: BrokenPipeError and exited 1."""
    path = tmp_path / "many"
    distckpt.save({f"layer.{i:05d}.weight": np.zeros(2, np.float32) for i in range(6000)}, path)
    for extra in ([], ["--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "distckpt", "inspect", str(path), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # `head -1` exits
        err = proc.stderr.read().decode()
        rc = proc.wait(timeout=300)
        assert first.strip() and err == "", err
        assert rc == 0


# ------------------------------------------------------------------ item 19
@pytest.mark.parametrize("verb", ["reshard", "split"])
def test_relayout_without_dst_strategy_is_a_usage_error(tmp_path, capsys, ck, verb):
    """reshard without --dst-strategy exited 1, while the README promises 2 for usage errors."""
    assert_error(cli(capsys, verb, ck, tmp_path / "out"), "--dst-strategy", code=2, command=verb)
    assert_nothing_at(tmp_path / "out")
    rc, out, _ = cli(capsys, verb, "--help")
    assert rc == 0 and "required" in out and "--dst-strategy" in out


@pytest.mark.parametrize("argv, command", [
    (["merge", "{ck}", "{tmp}/m.ckpt", "--overwite"], "merge"),
    (["merge", "--overwite", "{ck}", "{tmp}/m.ckpt"], "merge"),
    (["reshard", "{ck}", "{tmp}/r", "--dst-strategy", "{tmp}/s.ckpt", "--formt", "ckpt"], "reshard"),
    (["inspect", "{ck}", "--jsn"], "inspect"),
    (["merge", "{ck}"], "merge"),
    (["verify"], "verify"),
    (["merge", "{ck}", "{tmp}/m.ckpt", "--max-shard-size"], "merge"),
    (["merge", "{ck}", "{tmp}/m.ckpt", "--format", "onnx"], "merge"),
])
def test_usage_errors_show_the_subcommands_usage(tmp_path, capsys, ck, argv, command):
    """A typo'd flag (merge ... --overwite) printed the top-level usage instead of merge's."""
    args = [a.format(ck=ck, tmp=tmp_path) for a in argv]
    assert_error(cli(capsys, *args), code=2, command=command)
    assert_nothing_at(tmp_path / "m.ckpt")


@pytest.mark.parametrize("argv, needle", [
    (["list", "/nonexistent/run"], "/nonexistent/run"),
    (["list", "/nonexistent/run", "--json"], "/nonexistent/run"),
    (["gc", "/nonexistent/ck", "--dry-run"], "/nonexistent/ck"),
    (["gc", "/nonexistent/ck"], "/nonexistent/ck"),
    (["finalize", "/nonexistent/ck"], "/nonexistent/ck"),
    (["inspect", "/nonexistent/ck"], "/nonexistent/ck"),
])
def test_missing_paths_exit_1(capsys, argv, needle):
    """distckpt list /nonexistent and gc /nonexistent --dry-run exited 0 in silence."""
    line = assert_error(cli(capsys, *argv), needle)
    assert "no such" in line or "not" in line


# ------------------------------------------------------------------ item 20
def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_inspect_json_is_strict_json(tmp_path, capsys):
    """inspect --json printed bare NaN / Infinity, which is not JSON."""
    path = tmp_path / "ck"
    distckpt.save({"w": np.array([np.nan, np.inf], np.float32), "loss": math.nan, "best": math.inf,
                   "worst": -math.inf, "lr": 1e-300}, path)
    rc, out, err = cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    doc = _strict(out)
    assert doc["values"] == {"loss": "NaN", "best": "Infinity", "worst": "-Infinity", "lr": 1e-300}
    assert distckpt.inspect(path)["values"]["loss"] == "NaN"  # the library returns the same strict document
    json.dumps(distckpt.inspect(path), allow_nan=False)
    for cmd in (["verify", path, "--json"], ["list", tmp_path, "--json"]):
        rc, out, err = cli(capsys, *cmd)
        assert rc == 0, err
        _strict(out)
    readme = (REPO / "README.md").read_text()
    schema = readme[readme.index("### `inspect --json` schema"):]
    assert '"NaN"' in schema and '"Infinity"' in schema and '"-Infinity"' in schema


# ------------------------------------------------------------------ item 21
def test_internal_chunk_keys_never_collide_with_user_names(tmp_path, capsys):
    """save({'x': ..., 'x@0': ...}) failed with "tensor 'x@0' listed twice" and left an empty directory."""
    rng = np.random.default_rng(0)
    state = {"x": rng.standard_normal(4).astype(np.float32), "x@0": rng.standard_normal(4).astype(np.float32),
             "x@0,0": rng.standard_normal((2, 2)).astype(np.float32), "s@": np.float32(3.0), "s": np.float32(4.0),
             "x@": 7}
    path = tmp_path / "ck"
    distckpt.save(state, path)
    got = distckpt.load(path)
    assert set(got) == set(state)
    for k, v in state.items():
        assert np.array_equal(np.asarray(got[k]), np.asarray(v)), k
    from distckpt.codecs.safetensors import read_safetensors_header

    data = next(path.glob("data-*.safetensors"))
    with open(data, "rb") as f:
        entries, _ = read_safetensors_header(f, size=data.stat().st_size, name=str(data))
    assert sorted(e.name for e in entries) == sorted(["x@0", "x@0@0", "x@0,0@0,0", "s@@", "s@"])
    # split with a strategy that cuts both 'x' and 'x@0', then merge back: still every tensor, exactly
    strat = Strategy({"x": ParamSpec("x", TensorLayout((2,), (0,))), "x@0": ParamSpec("x@0", TensorLayout((2,), (0,)))})
    save_strategy(strat, tmp_path / "tp2.ckpt")
    for r in range(2):
        local = {k: (v[2 * r:2 * r + 2] if k in ("x", "x@0") else v) for k, v in state.items()}
        distckpt.save(local, tmp_path / "tp2", strategy=strat, rank=r)
    distckpt.finalize(tmp_path / "tp2")
    for out in ("m.ckpt", "m.safetensors"):
        assert cli(capsys, "merge", tmp_path / "tp2", tmp_path / out, "-q")[0] == 0
        back = distckpt.load(tmp_path / out)
        for k, v in state.items():
            assert np.array_equal(np.asarray(back[k]), np.asarray(v)), (out, k)
