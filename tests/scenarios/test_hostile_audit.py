"""Adversarial audit of hostile and malformed input (issue 7, part 3), beyond ``test_hostile.py``.

The rule under test: bad input always ends in a distckpt error naming the file,
the tensor and the problem -- never a traceback from the CLI, a hang, an
out-of-memory, a partial output left in place, or a read outside the
checkpoint.  Cases that could exhaust memory run in a subprocess under
``RLIMIT_AS`` (4 GiB) and a timeout, so a regression fails instead of taking the
machine down.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys

import numpy as np
import pytest

import distckpt
from distckpt.cli import main as cli_main
from distckpt.codecs.ckpt import CkptWriter
from distckpt.codecs.proto import field_len, field_varint
from distckpt.errors import (
    ConfigError,
    DestinationExistsError,
    DistCkptError,
    FormatError,
    NotCommittedError,
    StorageError,
    StrategyError,
)
from distckpt.index import INDEX_NAME
from distckpt.layout import MAX_DEVICES, ParamSpec, Strategy, TensorLayout
from distckpt.strategy import load_strategy

MEM_LIMIT = 4 << 30
_BUILTIN_ERROR = re.compile(r"^error: [A-Za-z_]*(Error|Exception|Interrupt)\b")


# ----------------------------------------------------------------- helpers
def _limits():  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))


def _run(args, timeout=120):
    """The CLI in a child process with a memory limit and a timeout."""
    return subprocess.run(
        [sys.executable, "-m", "distckpt", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, preexec_fn=_limits,
    )


def _clean(code: int, err: str, *needles: str) -> str:
    """Exit 1, one ``error:`` line, a distckpt error (not a bare built-in exception), the needles in it."""
    lines = err.strip().splitlines()
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not _BUILTIN_ERROR.match(lines[0]), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _cli(capsys, *args):
    """The CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = cli_main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _refused(exc_type, fn, *needles):
    with pytest.raises(exc_type) as ei:
        fn()
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))
    return str(ei.value)


def _ckpt_value(tag: str, dims, ttype: str, content: bytes) -> bytes:
    tensor = b"".join(field_varint(1, d & ((1 << 64) - 1)) for d in dims) + field_len(2, ttype) + field_len(3, content)
    return field_len(1, field_len(1, tag) + field_len(2, tensor))


def _safetensors(path, header, data=b"", raw: bytes | None = None):
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _write_ckpt(path, tensors: dict[str, np.ndarray]):
    with open(path, "wb") as f:
        w = CkptWriter(f)
        for n, a in tensors.items():
            w.add_tensor(n, distckpt.dtypes.name_of(a.dtype), a.shape, a)
        w.close()
    return path


def _strategy(layouts: dict) -> dict:
    return {"parallel_layout_item": {n: {"dev_matrix": dm, "tensor_map": tm, **kw} for n, (dm, tm, kw) in layouts.items()}}


def _listing(root) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"w": np.arange(64, dtype=np.float32).reshape(8, 8), "v": np.arange(8, dtype=np.int32), "step": 3}, path)
    return path


def _index(path) -> dict:
    return distckpt.sources.open_source(path).index.to_json()  # version 1's JSON of any checkpoint (chunks listed)


def _put_index(path, doc) -> None:
    (path / INDEX_NAME).write_text(json.dumps(doc))


# ---------------------------------------------------------- strategies / layouts
HUGE = {
    "dev_matrix 100000x100000": _strategy({"w": ([100000, 100000], [1, -1], {})}),
    "dev_matrix 2**40": _strategy({"w": ([2**40], [0, -1], {})}),
    "2**31 pipeline stages": {"current_stage": 2**31, "parallel_layout_item": {"w": {"dev_matrix": [2], "tensor_map": [0, -1]}}},
    "distckpt json num_stages 2**40": {"format": "distckpt-strategy", "version": 1, "num_stages": 2**40,
                                       "params": {"w": {"dev_matrix": [2], "tensor_map": [0, -1], "stages": [0]}}},
}


@pytest.mark.parametrize("doc", list(HUGE.values()), ids=list(HUGE))
def test_absurd_world_sizes_are_refused(doc):
    _refused(StrategyError, lambda: load_strategy(doc), "2**24")


def test_world_size_cap_is_exact():
    ok = TensorLayout((MAX_DEVICES,), ((0,),))
    assert ok.device_num == MAX_DEVICES
    _refused(StrategyError, lambda: TensorLayout((MAX_DEVICES, 2), ((1,),)), str(2 * MAX_DEVICES))
    lay = TensorLayout((2,), ((0,),))
    _refused(StrategyError, lambda: Strategy({"w": ParamSpec("w", lay, (0,))}, MAX_DEVICES), "pipeline stage")
    _refused(StrategyError, lambda: Strategy({"w": ParamSpec("w", lay, (0,))}, 0), "num_stages")


def test_huge_strategy_through_cli_no_oom(tmp_path, ck):
    """reshard / inspect / native SRC with a 10**10-device strategy: a clean error under 4 GiB (_run's timeout
    catches a walk over 10**10 devices; no wall-clock assertion on a shared machine)."""
    sf = tmp_path / "huge.json"
    sf.write_text(json.dumps(HUGE["dev_matrix 100000x100000"]))
    res = _run(["reshard", ck, tmp_path / "out", "--dst-strategy", sf])
    _clean(res.returncode, res.stderr, "huge.json", "'w'", "2**24")
    assert not (tmp_path / "out").exists()
    native = tmp_path / "native"
    for r in range(2):
        (native / f"rank_{r}").mkdir(parents=True)
        _write_ckpt(native / f"rank_{r}" / "c.ckpt", {"w": np.ones((2, 4), np.float32)})
    res = _run(["inspect", native, "--src-strategy", sf])
    _clean(res.returncode, res.stderr, "huge.json", "2**24")


BAD_LAYOUTS = {
    "axis out of range": (([2, 2], [5, -1], {}), "device axis 5"),
    "negative axis": (([2, 2], [-3, -1], {}), "device axis -3"),
    "duplicated axis": (([2, 2], [0, 0], {}), "twice"),
    "nested duplicated axis": (([2, 2], [[0, 1], 0], {}), "twice"),
    "dev_matrix zero": (([0, 2], [1, -1], {}), "positive"),
    "dev_matrix negative": (([-2, 2], [1, -1], {}), "positive"),
    "dev_matrix not ints": (([2.5, 2], [1, -1], {}), "integer"),
    "opt shard does not divide": (([4, 2], [0, -1], {"opt_weight_shard_step": 2, "opt_weight_shard_size": 3}), "optimizer shard"),
    "opt shard too big": (([4, 2], [0, -1], {"opt_weight_shard_step": 2, "opt_weight_shard_size": 8}), "optimizer shard"),
    "33 device axes": (([1] * 33, [0, -1], {}), "at most 32"),
    "33 tensor dims": (([2], [-1] * 33, {}), "at most 32"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS.values()), ids=list(BAD_LAYOUTS))
def test_bad_layouts_are_refused_before_any_output(tmp_path, ck, case):
    layout, needle = case
    doc = _strategy({"w": layout})
    msg = _refused(StrategyError, lambda: distckpt.reshard(ck, tmp_path / "o", dst_strategy=doc), needle)
    assert "'w'" in msg
    _refused(StrategyError, lambda: distckpt.load(ck, strategy=doc, rank=0), needle)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_strategy_naming_tensors_not_in_checkpoint(tmp_path, ck):
    doc = _strategy({"w": ([2], [0, -1], {}), "ghost.weight": ([2], [0], {})})
    for fn in (
        lambda: distckpt.reshard(ck, tmp_path / "o", dst_strategy=doc),
        lambda: distckpt.split(ck, tmp_path / "o", dst_strategy=doc, format="ckpt"),
        lambda: distckpt.load(ck, strategy=doc, rank=1),
    ):
        _refused(StrategyError, fn, "ghost.weight")
    assert not (tmp_path / "o").exists()


def test_shapes_not_divisible_split_reshard_load(tmp_path):
    src = _write_ckpt(tmp_path / "full.ckpt", {"w": np.ones((6, 4), np.float32)})
    doc = _strategy({"w": ([4], [0, -1], {})})  # 6 rows over 4 devices
    for fn in (
        lambda: distckpt.split(src, tmp_path / "o", dst_strategy=doc, format="ckpt"),
        lambda: distckpt.reshard(src, tmp_path / "o", dst_strategy=doc),
        lambda: distckpt.load(src, strategy=doc, rank=3),
    ):
        _refused(StrategyError, fn, "w: dim 0", "not divisible", "[6, 4]")
    assert sorted(os.listdir(tmp_path)) == ["full.ckpt"]


# ------------------------------------------------------------------ .ckpt files
def _ckpt_cases(tmp_path):
    big_type = _ckpt_value("w", [2], "F" * (1 << 20), b"\0" * 8)
    inconsistent = b"".join(_ckpt_value("w", [i + 1], "Float32", b"\0" * 4) for i in range(3000))
    st = tmp_path / "st.bin"
    _safetensors(st, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    return {
        "huge dims, tiny content": (_ckpt_value("w", [2**62], "Float32", b"\0" * 8), ["'w'", "8 bytes"]),
        "huge dims 2-d": (_ckpt_value("w", [2**62, 2**62], "Float32", b"\0" * 8), ["'w'"]),
        "negative dims": (_ckpt_value("w", [-1, 4], "Float32", b"\0" * 16), ["'w'", "negative"]),
        "1 MiB tensor_type": (big_type, ["'w'", "tensor_type"]),
        "2 MiB tag": (_ckpt_value("a" * (2 << 20), [1], "Float32", b"\0" * 4), ["tag of"]),
        "inconsistent repeated values": (inconsistent, ["'w'", "disagree"]),
        "content length vs dims": (_ckpt_value("w", [4], "Float32", b"\0" * 12), ["'w'", "12 bytes"]),
        "map tensor": (field_len(1, field_len(1, "m") + field_len(3, b"\x0a\x00")), ["'m'", "map tensor"]),
        "safetensors renamed": (st.read_bytes(), ["not a valid MindSpore checkpoint"]),
        "empty file": (b"", ["empty file"]),
        "unknown tensor_type": (_ckpt_value("w", [2], "Float8", b"\0" * 2), ["'w'", "Float8"]),
        "40 dims": (_ckpt_value("w", [1] * 40, "Float32", b"\0" * 4), ["'w'", "32 dims"]),
    }


def test_hostile_ckpt_files(tmp_path, capsys):
    for label, (data, needles) in _ckpt_cases(tmp_path).items():
        p = tmp_path / "bad.ckpt"
        p.write_bytes(data)
        for fn in (distckpt.load, distckpt.inspect):
            try:
                fn(p)
            except DistCkptError as exc:
                msg = str(exc)
            else:
                raise AssertionError(f"{label}: accepted")
            assert "bad.ckpt" in msg, (label, msg)
            for n in needles:
                assert n in msg, (label, n, msg)
        code, _, err = _cli(capsys, "merge", p, tmp_path / "out.ckpt")
        _clean(code, err, "bad.ckpt")
        assert not (tmp_path / "out.ckpt").exists(), label


def test_huge_dims_ckpt_no_oom_in_subprocess(tmp_path):
    p = tmp_path / "huge.ckpt"
    p.write_bytes(_ckpt_value("w", [2**62], "Float32", b"\0" * 8) + _ckpt_value("v", [2**31, 2**31], "Int8", b"\0"))
    for cmd in (["inspect", p], ["verify", p], ["merge", p, tmp_path / "o.safetensors"]):
        res = _run(cmd)
        _clean(res.returncode, res.stderr, "huge.ckpt", "'w'")
    assert sorted(os.listdir(tmp_path)) == ["huge.ckpt"]


def test_directory_named_like_a_file(tmp_path):
    (tmp_path / "x.ckpt").mkdir()
    _refused(NotCommittedError, lambda: distckpt.load(tmp_path / "x.ckpt"), "x.ckpt")
    (tmp_path / "y.safetensors").mkdir()
    _refused(NotCommittedError, lambda: distckpt.inspect(tmp_path / "y.safetensors"), "y.safetensors")
    # a distckpt checkpoint saved into a directory whose name ends in .ckpt is read as one
    distckpt.save({"w": np.arange(4, dtype=np.int8)}, tmp_path / "z.ckpt")
    assert distckpt.load(tmp_path / "z.ckpt")["w"].tolist() == [0, 1, 2, 3]
    # a rank directory holding a *directory* named like a weights file
    native = tmp_path / "native"
    (native / "rank_0" / "x.ckpt").mkdir(parents=True)
    (native / "strategy.json").write_text(json.dumps(_strategy({"w": ([1], [-1], {})})))
    _refused(FormatError, lambda: distckpt.load(native), "x.ckpt", "directory")


# ------------------------------------------------------------------ safetensors
def _st_cases():
    f32 = lambda shape, offs: {"w": {"dtype": "F32", "shape": shape, "data_offsets": offs}}  # noqa: E731
    return {
        "F8_E4M3 odd byte count": ({"w": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4, None, ["'w'", "needs 3"]),
        "offsets reversed": (f32([1], [4, 0]), b"\0" * 4, None, ["'w'", "data_offsets"]),
        "offsets overlap": (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, ["overlaps"],
        ),
        "offsets past EOF": (f32([4], [0, 16]), b"\0" * 4, None, ["'w'", "past the end"]),
        "offsets 2**63": (f32([2**61], [0, 2**63]), b"\0" * 4, None, ["'w'"]),
        "negative shape": (f32([-1], [0, 4]), b"\0" * 4, None, ["'w'", "shape"]),
        "float shape": (f32([1.0], [0, 4]), b"\0" * 4, None, ["'w'", "shape"]),
        "string shape": (f32(["1"], [0, 4]), b"\0" * 4, None, ["'w'", "shape"]),
        "40-dim shape": (f32([1] * 40, [0, 4]), b"\0" * 4, None, ["'w'", "32"]),
        "10**6 nested arrays": (None, b"", b"[" * 10**6 + b"]" * 10**6, ["not valid"]),
        "10**6 nested in a tensor": (None, b"", b'{"w":' + b"[" * 10**6 + b"]" * 10**6 + b"}", ["not valid"]),
        "duplicate keys": (
            None, b"\0" * 4,
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            ["'w'", "twice"],
        ),
        "__metadata__ int value": ({"__metadata__": {"a": 1}}, b"", None, ["__metadata__"]),
        "__metadata__ nested": ({"__metadata__": {"a": {"b": "c"}}}, b"", None, ["__metadata__"]),
        "__metadata__ list": ({"__metadata__": [1]}, b"", None, ["__metadata__"]),
        "5000-digit integer": (None, b"\0" * 4, b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', ["not valid"]),
    }


def test_hostile_safetensors_files(tmp_path, capsys):
    for label, (header, data, raw, needles) in _st_cases().items():
        p = _safetensors(tmp_path / "bad.safetensors", header, data, raw)
        try:
            distckpt.load(p)
        except FormatError as exc:
            msg = str(exc)
        else:
            raise AssertionError(f"{label}: accepted")
        assert "bad.safetensors" in msg, (label, msg)
        for n in needles:
            assert n in msg, (label, n, msg)
    code, _, err = _cli(capsys, "verify", p)
    _clean(code, err, "bad.safetensors")


# --------------------------------------------------------------- distckpt index
def test_symlinked_data_file_outside_checkpoint_is_refused(tmp_path, ck, capsys):
    fname = next(iter(_index(ck)["files"]))
    secret = tmp_path / "secret.bin"
    os.replace(ck / fname, secret)
    os.symlink(secret, ck / fname)
    for fn in (lambda: distckpt.load(ck), lambda: distckpt.verify(ck), lambda: distckpt.merge(ck, tmp_path / "m.ckpt")):
        _refused(StorageError, fn, fname, "outside the checkpoint")
    code, _, err = _cli(capsys, "verify", ck)
    _clean(code, err, "outside the checkpoint")
    assert not (tmp_path / "m.ckpt").exists()
    # a symlink below a symlinked directory is refused too
    os.unlink(ck / fname)
    (tmp_path / "elsewhere").mkdir()
    os.replace(secret, tmp_path / "elsewhere" / fname)
    doc = _index(ck)
    os.symlink(tmp_path / "elsewhere", ck / "sub")
    os.symlink(f"sub/{fname}", ck / fname)
    _put_index(ck, doc)
    _refused(StorageError, lambda: distckpt.load(ck), "outside the checkpoint")
    # a symlink to the checkpoint directory itself, and links that stay inside it, are fine
    os.unlink(ck / fname)
    os.unlink(ck / "sub")
    os.replace(tmp_path / "elsewhere" / fname, ck / f".{fname}")
    os.symlink(f".{fname}", ck / fname)
    os.symlink(ck, tmp_path / "link")
    assert distckpt.load(tmp_path / "link")["w"].sum() == sum(range(64))
    assert distckpt.verify(ck)["ok"]


def test_overlapping_chunk_bytes_are_refused(ck, capsys):
    doc = _index(ck)
    cw, cv = doc["tensors"]["w"]["chunks"][0], doc["tensors"]["v"]["chunks"][0]
    cv["start"] = cw["start"] + 4  # v's bytes inside w's; checksums dropped so only the overlap is wrong
    cv.pop("crc32c", None)
    _put_index(ck, doc)
    _refused(FormatError, lambda: distckpt.load(ck), "'v'", "'w'", "overlap")
    code, _, err = _cli(capsys, "inspect", ck)
    _clean(code, err, "overlap")


def test_file_sizes_that_lie(tmp_path, ck, capsys):
    doc = _index(ck)
    fname = next(iter(doc["files"]))
    real = os.path.getsize(ck / fname)
    doc["files"][fname]["size"] = real + 1000
    _put_index(ck, doc)
    _refused(FormatError, lambda: distckpt.verify(ck), fname, str(real + 1000))
    code, _, err = _cli(capsys, "verify", ck)
    _clean(code, err, fname)
    doc["files"][fname]["size"] = real - 4
    _put_index(ck, doc)
    _refused(FormatError, lambda: distckpt.load(ck), fname, "past the end")
    # a claimed size larger than the file and a chunk in the missing tail: a read error, named
    doc["files"][fname]["size"] = real + (1 << 20)
    doc["tensors"]["v"]["chunks"][0]["start"] = real + 1000
    _put_index(ck, doc)
    msg = _refused(DistCkptError, lambda: distckpt.load(ck, verify=False), "'v'")
    assert fname in msg


def test_many_chunks_are_fast_and_bounded(tmp_path):
    """10**5 one-byte chunks: index parse, verify and load in seconds, under 4 GiB, in a child process."""
    n = 100_000
    path = tmp_path / "many"
    distckpt.save({"pad": np.arange(n, dtype=np.int8)}, path)
    doc = _index(path)
    fname = next(iter(doc["files"]))
    base = doc["tensors"].pop("pad")["chunks"][0]["start"]
    doc["tensors"]["big"] = {
        "dtype": "int8", "shape": [n],
        "chunks": [{"offsets": [i], "sizes": [1], "file": fname, "start": base + i, "length": 1} for i in range(n)],
    }
    _put_index(path, doc)
    code = (
        "import distckpt, numpy as np, sys; "
        f"a = distckpt.load({str(path)!r})['big']; "
        "assert a.tolist() == np.arange(len(a), dtype=np.int8).tolist(); print(len(a))"
    )
    # ~10 s on an idle 2-core machine; the timeout only catches a quadratic walk, it is not a timing assertion
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, preexec_fn=_limits)
    assert res.returncode == 0 and res.stdout.strip() == str(n), res.stderr
    res = _run(["inspect", path, "--json"])
    assert res.returncode == 0 and json.loads(res.stdout)["tensors"][0]["chunks"] == n


def test_strange_tensor_names_stay_inside_outputs(tmp_path, capsys):
    names = ["a\0b", "line\nbreak", "../../up", "/abs/x", "C:\\win", "..", "."]
    state = {n: np.full(3, i, np.int16) for i, n in enumerate(names)}
    distckpt.save(state, tmp_path / "ck")
    distckpt.merge(tmp_path / "ck", tmp_path / "m", max_shard_size=8)
    distckpt.merge(tmp_path / "ck", tmp_path / "m.safetensors")
    distckpt.reshard(tmp_path / "ck", tmp_path / "r", dst_strategy={"parallel_layout_item": {}}, format="ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ck", "m", "m.safetensors", "r"]
    for out in (tmp_path / "ck", tmp_path / "m", tmp_path / "m.safetensors", tmp_path / "r"):
        got = distckpt.load(out)
        for i, n in enumerate(names):
            assert got[n].tolist() == [i] * 3, (out, n)
    code, out, err = _cli(capsys, "inspect", tmp_path / "ck")
    assert code == 0, err


def test_value_that_does_not_fit_a_ckpt(tmp_path, ck):
    doc = _index(ck)
    doc["values"]["huge"] = {"type": "int", "value": 10**30}
    doc["values"]["long"] = {"type": "str", "value": "x" * (8 << 20)}
    _put_index(ck, doc)
    assert len(distckpt.load(ck)["long"]) == 8 << 20 and distckpt.load(ck)["huge"] == 10**30
    for dst in ("m.ckpt", "m.safetensors", "mdir"):
        _refused(FormatError, lambda d=dst: distckpt.merge(ck, tmp_path / d), "'huge'", "int64")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# ------------------------------------------------------------- native rank dirs
def _native(root, ranks, n, *, dtype=np.float32):
    for r in ranks:
        (root / f"rank_{r}").mkdir(parents=True, exist_ok=True)
        _write_ckpt(root / f"rank_{r}" / f"checkpoint_{r}.ckpt", {"w": np.full((2, 4), r, dtype)})
    (root / "strategy.json").write_text(json.dumps(_strategy({"w": ([n], [0, -1], {})})))
    return root


def test_native_rank_dirs(tmp_path, capsys):
    src = _native(tmp_path / "a", range(4), 8)
    code, _, err = _cli(capsys, "merge", src, tmp_path / "o.ckpt")
    _clean(code, err, "8 ranks", "rank_0..rank_3", "rank_4", "strategy")
    src = _native(tmp_path / "b", range(4), 4)
    (src / "rank_99999999999").mkdir()  # more rank directories than the strategy's ranks: refused (issue 11 A.2)
    _refused(StrategyError, lambda: distckpt.load(src), "5 rank directories", "4 ranks")
    (src / "rank_99999999999").rmdir()
    assert distckpt.load(src)["w"].shape == (8, 4)
    (src / "rank_2" / "checkpoint_2.ckpt").unlink()
    _refused(FormatError, lambda: distckpt.load(src), "rank_2", "no .ckpt")
    (src / "rank_2").rmdir()
    _refused(StrategyError, lambda: distckpt.load(src), "missing rank_2")
    (src / "rank_2").write_text("not a dir")
    _refused(FormatError, lambda: distckpt.load(src), "rank_2", "is a file")
    code, _, err = _cli(capsys, "inspect", src)
    _clean(code, err, "rank_2")


def test_native_rank_files_disagree_on_dtype(tmp_path):
    src = _native(tmp_path / "n", range(4), 4)
    _write_ckpt(src / "rank_1" / "checkpoint_1.ckpt", {"w": np.ones((2, 4), np.float16)})
    _refused(StrategyError, lambda: distckpt.load(src), "rank_1", "'w'", "float16", "float32")


@pytest.mark.parametrize(
    "content, name",
    [
        (b"garbage{", "strategy.json"),
        (b"\x12\xff\xff\xff\x0f garbage", "strategy.ckpt"),
        (b'{"parallel_layout_item": {"w": {"dev_matrix": [4], "tensor_map": "x"}}}', "strategy.json"),
        (b'{"parallel_layout_item": [1, 2]}', "strategy.json"),
        (json.dumps(HUGE["dev_matrix 2**40"]).encode(), "strategy.json"),
    ],
)
def test_garbage_strategy_inside_src(tmp_path, capsys, content, name):
    src = _native(tmp_path / "n", range(4), 4)
    (src / "strategy.json").unlink()
    (src / name).write_bytes(content)
    _refused(StrategyError, lambda: distckpt.load(src), name)
    code, _, err = _cli(capsys, "merge", src, tmp_path / "o")
    _clean(code, err, name)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------- MindFormers dirs
def _pretrained(root):
    root.mkdir()
    _write_ckpt(root / "mindspore_model.ckpt", {"w": np.ones((2, 2), np.float32)})
    (root / "mindspore_model.yaml").write_text("model:\n  arch:\n    type: LlamaForCausalLM\n  model_config:\n    hidden_size: 2\n")
    return root


@pytest.mark.parametrize("target", ["../x.ckpt", "/etc/passwd", "sub/../../x.ckpt", "a\\..\\x.ckpt"])
def test_weight_map_escaping_the_directory(tmp_path, capsys, target):
    d = _pretrained(tmp_path / "m")
    _write_ckpt(tmp_path / "x.ckpt", {"w": np.zeros((2, 2), np.float32)})
    (d / "mindspore_model.ckpt.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
    _refused(StorageError, lambda: distckpt.load(d), "refusing", "shard name")
    code, _, err = _cli(capsys, "inspect", d)
    _clean(code, err, "refusing")


@pytest.mark.parametrize("doc", [[1], {"weight_map": ["a"]}, {"weight_map": {"w": 5}}, {"nothing": 1}])
def test_malformed_weight_index(tmp_path, doc):
    d = _pretrained(tmp_path / "m")
    (d / "mindspore_model.ckpt.index.json").write_text(json.dumps(doc))
    _refused(DistCkptError, lambda: distckpt.load(d), "mindspore_model.ckpt.index.json")


def test_yaml_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = _pretrained(tmp_path / "m")
    (d / "mindspore_model.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    assert distckpt.load(d)["w"].shape == (2, 2)  # the YAML is not needed to read the weights
    code, _, err = _cli(capsys, "merge", d, tmp_path / "o", "--max-shard-size", "1KB")  # here it is parsed
    _clean(code, err, "mindspore_model.yaml")
    from distckpt.mindspore.config import read_config

    _refused(ConfigError, lambda: read_config(str(d / "mindspore_model.yaml")), "mindspore_model.yaml")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_yaml_not_a_mapping_and_config_json_list(tmp_path, capsys):
    d = _pretrained(tmp_path / "m")
    (d / "mindspore_model.yaml").write_text("- a\n- b\n")
    code, _, err = _cli(capsys, "merge", d, tmp_path / "o", "--max-shard-size", "1KB")
    _clean(code, err, "mindspore_model.yaml")
    assert not (tmp_path / "o").exists()
    d2 = _pretrained(tmp_path / "m2")
    (d2 / "mindspore_model.yaml").unlink()
    (d2 / "config.json").write_text("[1, 2]")
    distckpt.merge(d2, tmp_path / "o2")  # config files are copied, never interpreted
    assert (tmp_path / "o2" / "config.json").read_text() == "[1, 2]"


# -------------------------------------------------------------------------- CLI
def test_dst_overlapping_src(tmp_path, ck, capsys):
    before = _listing(ck)
    sf = tmp_path / "s.json"
    sf.write_text(json.dumps(_strategy({"w": ([2], [0, -1], {})})))
    cases = [
        (["merge", ck, ck], "is SRC"),
        (["merge", ck, ck, "--overwrite"], "is SRC"),
        (["merge", ck, ck / "inner.ckpt"], "inside SRC"),
        (["merge", ck, ck / "inner", "--overwrite"], "inside SRC"),
        (["reshard", ck, ck / "r", "--dst-strategy", sf], "inside SRC"),
        (["split", ck, f"{ck}/./", "--dst-strategy", sf, "--overwrite"], "is SRC"),
        (["merge", ck, tmp_path, "--overwrite"], "SRC"),
    ]
    for args, needle in cases:
        code, _, err = _cli(capsys, *args)
        _clean(code, err, needle)
    assert _listing(ck) == before
    os.symlink(ck, tmp_path / "alias")
    code, _, err = _cli(capsys, "merge", tmp_path / "alias", ck, "--overwrite")
    _clean(code, err, "is SRC")
    single = _write_ckpt(tmp_path / "one.ckpt", {"w": np.ones(2, np.float32)})
    data = single.read_bytes()
    code, _, err = _cli(capsys, "merge", single, single, "--overwrite")
    _clean(code, err, "is SRC")
    assert single.read_bytes() == data and _listing(ck) == before


def test_overwrite_replaces_only_on_success(tmp_path, ck, capsys):
    (tmp_path / "file.ckpt").write_text("keep")
    code, _, err = _cli(capsys, "merge", ck, tmp_path / "file.ckpt")
    _clean(code, err, "already exists", "--overwrite")
    assert (tmp_path / "file.ckpt").read_text() == "keep"
    other = tmp_path / "other"
    other.mkdir()
    (other / "important.txt").write_text("precious")
    # corrupt the *last* tensor's bytes so the failure comes mid-write, after output was produced
    doc = _index(ck)
    c = doc["tensors"]["w"]["chunks"][0]
    with open(ck / c["file"], "r+b") as f:
        f.seek(c["start"] + c["length"] - 1)
        f.write(b"\x7f")
    for args in (
        ["merge", ck, other, "--overwrite"],
        ["merge", ck, tmp_path / "file.ckpt", "--overwrite"],
        ["merge", ck, other, "--overwrite", "--max-shard-size", "8"],
        ["reshard", ck, other, "--overwrite", "--dst-strategy", tmp_path / "s.json", "--format", "ckpt"],
    ):
        (tmp_path / "s.json").write_text(json.dumps(_strategy({"w": ([2], [0, -1], {})})))
        code, _, err = _cli(capsys, *args)
        _clean(code, err, "checksum", "'w'")
        assert _listing(other) == ["important.txt"] and (other / "important.txt").read_text() == "precious"
        assert (tmp_path / "file.ckpt").read_text() == "keep"
        assert sorted(os.listdir(tmp_path)) == ["ck", "file.ckpt", "other", "s.json"], args  # no temp debris


@pytest.mark.parametrize(
    "args, code_wanted, needle",
    [
        (["inspect", "{ck}", "--storage-options", "notjson"], 2, "not valid JSON"),
        (["inspect", "{ck}", "--storage-options", "[1]"], 2, "JSON object"),
        (["inspect", "{ck}", "--storage-options", '"str"'], 2, "JSON object"),
        (["merge", "{ck}", "{tmp}/o", "--max-shard-size", "garbage"], 1, "--max-shard-size"),
        (["merge", "{ck}", "{tmp}/o", "--max-shard-size", "-5"], 1, "--max-shard-size"),
        (["merge", "{ck}", "{tmp}/o", "--max-shard-size", "0"], 1, "--max-shard-size"),
        (["merge", "{ck}", "{tmp}/o", "--max-shard-size", "1" + "0" * 5000], 1, "--max-shard-size"),
        (["merge", "{ck}", "{tmp}/o", "--format", "zip"], 2, "invalid choice"),
        (["reshard", "{ck}", "{tmp}/o", "--format", "zip", "--dst-strategy", "x"], 2, "invalid choice"),
        (["reshard", "{ck}", "{tmp}/o"], 2, "--dst-strategy"),  # a missing required option is a usage error (11 D.19)
        (["reshard", "{ck}", "{tmp}/o", "--dst-strategy", "{tmp}/nope.json"], 1, "nope.json"),
    ],
)
def test_cli_option_garbage(tmp_path, ck, capsys, args, code_wanted, needle):
    args = [a.format(ck=ck, tmp=tmp_path) for a in args]
    code, _, err = _cli(capsys, *args)
    assert code == code_wanted, err
    assert needle in err and "Traceback" not in err
    if code == 1 and "nope.json" in needle:  # a missing file: named, in words, one line (no class names, 11 D.17)
        assert err.startswith("error: strategy file not found") and len(err.splitlines()) == 1
    elif code == 1:
        _clean(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_api_refuses_bad_format_and_existing_dst(tmp_path, ck):
    _refused(FormatError, lambda: distckpt.merge(ck, tmp_path / "o", format="zip"), "zip")
    _refused(FormatError, lambda: distckpt.reshard(ck, tmp_path / "o", dst_strategy={"parallel_layout_item": {}}, format="zip"), "zip")
    (tmp_path / "o").mkdir()
    _refused(DestinationExistsError, lambda: distckpt.merge(ck, tmp_path / "o"), "--overwrite")
