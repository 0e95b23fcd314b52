"""Hostile input: every case ends in a distckpt error with a clear message; no crash, hang or OOM."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distckpt
from distckpt.errors import DistCkptError, FormatError, StorageError
from distckpt.index import INDEX_NAME, Index


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"w": np.arange(64, dtype=np.float32).reshape(8, 8), "step": 1}, path)
    return path


def _index(path) -> dict:
    return distckpt.sources.open_source(path).index.to_json()  # version 1's JSON of any checkpoint (chunks listed)


def _write_index(path, doc) -> None:
    (path / INDEX_NAME).write_text(json.dumps(doc))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distckpt", *map(str, args)], capture_output=True, text=True, timeout=120)


def _assert_clean_error(res, *needles):
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["files"].update({"../../etc/passwd": {"size": 10}}), "refusing"),
        (lambda d: d["files"].update({"/abs/x": {"size": 10}}), "refusing"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(file="../x.safetensors"), "refusing"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(start=-5), "start"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(start=2**70), "start"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(length=10**15), "length"),
        (lambda d: d["tensors"]["w"].update(shape=[8, 9]), "w"),
        (lambda d: d["tensors"]["w"].update(shape=[2**40, 2**40]), "w"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(offsets=[-1, 0]), "offsets"),
        (lambda d: d["tensors"]["w"].update(dtype="object"), "dtype"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["tensors"]["w"]["chunks"].append(dict(d["tensors"]["w"]["chunks"][0])), "w"),
        (lambda d: d["tensors"]["w"]["chunks"][0].update(crc32c=[1, 2, 3]), "checksums"),
    ],
)
def test_hostile_index_is_refused(ckpt, mutate, needle):
    doc = _index(ckpt)
    mutate(doc)
    _write_index(ckpt, doc)
    with pytest.raises(DistCkptError) as ei:
        distckpt.load(ckpt)
    assert needle in str(ei.value)
    _assert_clean_error(_cli("verify", ckpt))


def test_huge_index_is_refused_without_reading(ckpt, monkeypatch):
    import distckpt.index as idx_mod
    import distckpt.sources.distckpt as src_mod

    monkeypatch.setattr(src_mod, "MAX_INDEX_BYTES", 100)
    monkeypatch.setattr(idx_mod, "MAX_INDEX_BYTES", 100)
    with pytest.raises(StorageError, match="limit"):
        distckpt.load(ckpt)


def test_malformed_json_index(ckpt):
    (ckpt / INDEX_NAME).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        distckpt.load(ckpt)
    (ckpt / INDEX_NAME).write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FormatError):
        distckpt.load(ckpt)


def test_safetensors_header_huge_length(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="x.safetensors"):
        distckpt.load(p)
    _assert_clean_error(_cli("inspect", p), "x.safetensors")


def test_safetensors_shape_disagrees_with_bytes(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 12]}}).encode()
    p = tmp_path / "y.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(FormatError, match="w"):
        distckpt.load(p)


def test_ckpt_garbage_and_truncation(tmp_path):
    p = tmp_path / "m.ckpt"
    from distckpt.codecs.ckpt import CkptWriter

    with open(p, "wb") as f:
        w = CkptWriter(f)
        w.add_tensor("w", "float32", (64, 64), np.ones((64, 64), np.float32))
        w.close()
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="m.ckpt"):
        distckpt.load(p)
    p.write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f" + b"junk")
    with pytest.raises(FormatError, match="m.ckpt"):
        distckpt.load(p)
    _assert_clean_error(_cli("merge", p, tmp_path / "out.ckpt"), "m.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_malformed_strategy_and_yaml(tmp_path, ckpt):
    bad = tmp_path / "s.ckpt"
    bad.write_bytes(b"\x12\xff\xff\xff\x0f garbage")
    _assert_clean_error(_cli("reshard", ckpt, tmp_path / "o", "--dst-strategy", bad), "s.ckpt")
    assert not (tmp_path / "o").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checkpoint: [unclosed\n")
    _assert_clean_error(_cli("inspect", ckpt, "--config", cfg), "c.yaml")
    js = tmp_path / "s.json"
    js.write_text('{"parallel_layout_item": {"w": {"dev_matrix": [3], "tensor_map": [0, -1]}}}')
    res = _cli("reshard", ckpt, tmp_path / "o2", "--dst-strategy", js)
    _assert_clean_error(res, "w")
    assert not (tmp_path / "o2").exists()


def test_tensor_names_never_become_paths(tmp_path):
    evil = {"../../escape": np.ones(4, np.float32), "/abs/name": np.zeros(2, np.int8)}
    out = tmp_path / "ck"
    distckpt.save(evil, out)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    got = distckpt.load(out)
    np.testing.assert_array_equal(got["../../escape"], evil["../../escape"])
    distckpt.reshard(out, tmp_path / "r", dst_strategy={"parallel_layout_item": {}}, format="ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ck", "r"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_index_parser(data):
    try:
        Index.loads(data)
    except DistCkptError:
        pass


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_index_structure(doc):
    base = {"format": "distckpt", "version": 1, "files": {"a": {"size": 100}}, "tensors": {"w": doc}}
    try:
        Index.from_json(base)
    except DistCkptError:
        pass
