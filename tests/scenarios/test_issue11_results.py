"""Issue 11, A (items 2-8): never report success on a wrong or partial result.

Each test is the issue's reproduction, through the CLI (exit code, one ``error:`` line, nothing
at DST) and through the library.  On the code before the fix each of them failed: the merge or
reshard exited 0 with a wrong output, or a value came back changed.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from issue11_util import REPO, assert_error, assert_nothing_at, cli, native_tp

import distckpt
from distckpt.errors import DistCkptError, FormatError, StrategyError, UsageError
from distckpt.index import INDEX_NAME
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.strategy import save_strategy, strategy_to_json


# ------------------------------------------------------------------ item 2
def test_strategy_for_fewer_ranks_than_the_directory_is_refused(tmp_path, capsys):
    """A TP2 strategy applied to 4 TP4 rank dirs merged w as [4, 8] and ignored rank_2, rank_3."""
    src, _, _ = native_tp(tmp_path / "tp4", 4)
    _, tp2_strategy, _ = native_tp(tmp_path / "tp2", 2)
    dst = tmp_path / "m.ckpt"
    line = assert_error(cli(capsys, "merge", src, dst, "--src-strategy", tp2_strategy))
    assert "4 rank directories" in line and "2 ranks" in line
    assert_nothing_at(dst)
    for verb in (distckpt.merge, distckpt.inspect, distckpt.verify):
        with pytest.raises(StrategyError, match="4 rank directories"):
            verb(src, *([dst] if verb is distckpt.merge else []), src_strategy=tp2_strategy)
    with pytest.raises(StrategyError, match="describes 2 ranks"):
        distckpt.load(src, src_strategy=tp2_strategy)


# ------------------------------------------------------------------ item 3
@pytest.fixture
def ck32(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"w": np.arange(32 * 16, dtype=np.float32).reshape(32, 16), "step": 3}, path)
    return path


def _shape_lie(tmp_path) -> str:
    """A JSON strategy whose tensor_shape [64, 16] contradicts the [32, 16] tensor (the layout itself divides both)."""
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)), shape=(64, 16))})
    path = tmp_path / "lie.json"
    path.write_text(json.dumps(strategy_to_json(strat)))
    return str(path)


@pytest.mark.parametrize("verb", ["reshard", "split"])
def test_strategy_tensor_shape_contradicting_the_tensor_is_refused(tmp_path, capsys, ck32, verb):
    """reshard with tensor_shape [64, 16] for a [32, 16] tensor exited 0 and the output's index claimed [64, 16]."""
    dst = tmp_path / "out"
    line = assert_error(cli(capsys, verb, ck32, dst, "--dst-strategy", _shape_lie(tmp_path)))
    assert "'w'" in line and "[32, 16]" in line and "[64, 16]" in line
    assert_nothing_at(dst)
    with pytest.raises(StrategyError, match=r"\[64, 16\]"):
        getattr(distckpt, verb)(ck32, dst, dst_strategy=_shape_lie(tmp_path))
    with pytest.raises(StrategyError, match=r"\[64, 16\]"):
        distckpt.load(ck32, strategy=_shape_lie(tmp_path), rank=0)
    assert_nothing_at(dst)


def test_src_strategy_tensor_shape_contradicting_the_rank_files_is_refused(tmp_path, capsys):
    src, _, _ = native_tp(tmp_path / "tp2", 2)
    lie = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)), shape=(16, 8)),
                    "b": ParamSpec("b", TensorLayout((2,), (-1,)))})
    lie_path = tmp_path / "lie.json"
    save_strategy(lie, lie_path)
    line = assert_error(cli(capsys, "merge", src, tmp_path / "m.ckpt", "--src-strategy", lie_path))
    assert "'w'" in line and "[16, 8]" in line and "[8, 8]" in line
    assert_nothing_at(tmp_path / "m.ckpt")


# ------------------------------------------------------------------ item 4
@pytest.mark.parametrize("dst_name, fmt", [("x.ckpt", "safetensors"), ("x.safetensors", "ckpt"),
                                           ("x.ckpt", "distckpt"), ("x.safetensors", "hf")])
def test_format_contradicting_dst_suffix_is_a_usage_error(tmp_path, capsys, ck32, dst_name, fmt):
    """merge SRC x.ckpt --format safetensors wrote safetensors bytes into a .ckpt MindSpore cannot load."""
    dst = tmp_path / dst_name
    line = assert_error(cli(capsys, "merge", ck32, dst, "--format", fmt), code=2, command="merge")
    assert f"--format {fmt}" in line and dst_name in line
    assert_nothing_at(dst)
    with pytest.raises(UsageError, match="contradicts"):
        distckpt.merge(ck32, dst, format=fmt)
    assert_nothing_at(dst)
    # agreeing spellings still work
    same = "ckpt" if dst_name.endswith(".ckpt") else "safetensors"
    assert cli(capsys, "merge", ck32, dst, "--format", same, "-q")[0] == 0
    assert dst.is_file()


# ------------------------------------------------------------------ item 5
def test_one_ranks_folder_is_not_a_model(tmp_path, capsys):
    """merge tp2_native/rank_0 m.ckpt exited 0 with half-size slices."""
    src, strategy, _ = native_tp(tmp_path / "tp2_native", 2)
    dst = tmp_path / "m.ckpt"
    line = assert_error(cli(capsys, "merge", src / "rank_0", dst))
    assert "one rank's slice" in line and "merge the parent" in line and str(src) in line
    assert_nothing_at(dst)
    for args in (("inspect", src / "rank_1"), ("verify", src / "rank_0"), ("split", src / "rank_0", tmp_path / "s",
                                                                              "--dst-strategy", strategy)):
        assert "one rank's slice" in assert_error(cli(capsys, *args))
    with pytest.raises(StrategyError, match="one rank's slice"):
        distckpt.load(src / "rank_0")
    # the parent with its strategy is the model
    assert cli(capsys, "merge", src, dst, "--src-strategy", strategy, "-q")[0] == 0


def test_a_lone_rank_dir_without_siblings_is_still_read(tmp_path, capsys):
    """Only a rank_N *with* rank_* siblings is a slice; a lone folder that happens to be named rank_0 is a model."""
    d = tmp_path / "lone" / "rank_0"
    d.mkdir(parents=True)
    distckpt.merge(_ck(tmp_path), d / "model.ckpt")
    rc, out, err = cli(capsys, "merge", d, tmp_path / "m.safetensors", "-q")
    assert rc == 0, err
    assert set(distckpt.load(tmp_path / "m.safetensors")) == {"w", "step"}


def _ck(tmp_path):
    path = tmp_path / "small"
    if not path.exists():
        distckpt.save({"w": np.ones((4, 4), np.float32), "step": 1}, path)
    return path


# ------------------------------------------------------------------ item 6
GHOSTS = {"ghost.alpha": ((2,), (0, -1)), "ghost.beta": ((2,), (-1,))}


@pytest.fixture
def ghostly(tmp_path):
    """TP2 rank files + a strategy naming two parameters that no rank's file holds."""
    return native_tp(tmp_path / "native", 2, extra_params=GHOSTS)


@pytest.mark.parametrize("verb", ["merge", "split", "reshard"])
def test_strategy_parameter_no_file_holds_warns_and_strict_fails(tmp_path, capsys, ghostly, verb):
    src, strategy, full = ghostly
    _, tp2_only, _ = native_tp(tmp_path / "plain", 2)
    dst = tmp_path / ("m.ckpt" if verb == "merge" else "out")
    extra = [] if verb == "merge" else ["--dst-strategy", tp2_only]
    rc, out, err = cli(capsys, verb, src, dst, "--src-strategy", strategy, "-q", *extra)
    assert rc == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    assert "ghost.alpha" in lines[0] and "ghost.beta" in lines[0] and "2 parameter(s)" in lines[0]
    got = distckpt.load(dst)
    assert np.array_equal(got["w"], full["w"]) and "ghost.alpha" not in got
    dst2 = tmp_path / ("m2.ckpt" if verb == "merge" else "out2")
    line = assert_error(cli(capsys, verb, src, dst2, "--src-strategy", strategy, "--strict", *extra))
    assert "ghost.alpha" in line and "ghost.beta" in line
    assert_nothing_at(dst2)
    kwargs = {} if verb == "merge" else {"dst_strategy": tp2_only}
    with pytest.raises(StrategyError, match="ghost.alpha, ghost.beta"):
        getattr(distckpt, verb)(src, dst2, src_strategy=strategy, strict=True, **kwargs)
    assert_nothing_at(dst2)


def test_library_warns_on_stderr_without_strict(tmp_path, capsys, ghostly):
    src, strategy, _ = ghostly
    capsys.readouterr()
    distckpt.merge(src, tmp_path / "m.safetensors", src_strategy=strategy)
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "ghost.alpha" in err


# ------------------------------------------------------------------ item 7
LONG = "héllo wörld ✓ 𝄞 " * 3000  # 51,000 characters, astral-plane ones included
VALUES = {
    "big": 1e300, "tiny": 1e-50, "subnormal": 5e-324, "third": 1 / 3, "nan": math.nan, "inf": math.inf,
    "ninf": -math.inf, "neg_zero": -0.0, "i_min": -(2**63), "i_max": 2**63 - 1, "yes": True, "no": False,
    "long": LONG, "empty": "", "newline": "a\nb\x00c",
}


def _bits(v) -> bytes:
    return struct.pack("<d", v)


def _plain(v):
    """A value as read back: plain Python from distckpt indexes, 0-d arrays from .ckpt/.safetensors tensors."""
    if isinstance(v, np.ndarray):
        assert v.shape == () and v.dtype in (np.float64, np.int64, np.bool_), (v.dtype, v.shape)
        return v.item()
    return v


def _assert_values(got: dict, where: str) -> None:
    for k, want in VALUES.items():
        assert k in got, (where, k)
        v = _plain(got[k])
        assert type(v) is type(want), (where, k, type(v))
        if isinstance(want, float):
            assert _bits(v) == _bits(want) or (math.isnan(v) and math.isnan(want)), (where, k, v)
        else:
            assert v == want, (where, k)


@pytest.fixture(scope="module")
def valued(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))})
    save_strategy(strat, root / "tp2.ckpt")
    ck = root / "ck"
    distckpt.save({"w": np.arange(16, dtype=np.float32).reshape(4, 4), **VALUES}, ck)
    return root, ck


OUTPUTS = [
    ("merge", "m.ckpt", []),
    ("merge", "m.safetensors", []),
    ("merge", "mdir", []),
    ("merge", "mdir_st", ["--format", "safetensors"]),
    ("merge", "mdir_sharded", ["--max-shard-size", "40"]),
    ("merge", "mdir_st_sharded", ["--format", "safetensors", "--max-shard-size", "40"]),
    ("merge", "mdir_distckpt", ["--format", "distckpt"]),
    ("reshard", "rank_ckpt", ["--format", "ckpt"]),
    ("reshard", "rank_st", ["--format", "safetensors"]),
    ("split", "split_distckpt", []),
]


@pytest.mark.parametrize("verb, name, args", OUTPUTS, ids=[o[1] for o in OUTPUTS])
def test_plain_values_round_trip_exactly_through_every_output(capsys, valued, verb, name, args):
    """A str was dropped by a .safetensors merge; 1e300 became inf and 1e-50 became 0."""
    root, ck = valued
    dst = root / name
    strategy = [] if verb == "merge" else ["--dst-strategy", root / "tp2.ckpt"]
    rc, out, err = cli(capsys, verb, ck, dst, "-q", *strategy, *args)
    assert rc == 0, err
    _assert_values(distckpt.load(dst), name)
    # and through a second hop: the output merged again into a distckpt checkpoint
    again = root / f"{name}_again"
    assert cli(capsys, "merge", dst, again, "--format", "distckpt", "-q")[0] == 0
    _assert_values(distckpt.load(again), name + " -> distckpt")


def test_mindspore_loads_the_value_outputs(capsys, valued):
    """MindSpore's own loader takes every .ckpt / .safetensors output, values included, unchanged."""
    import mindspore as ms

    root, ck = valued
    for name in ("ms.ckpt", "ms.safetensors"):
        assert cli(capsys, "merge", ck, root / name, "-q")[0] == 0
    got = ms.load_checkpoint(str(root / "ms.ckpt"))
    for k, want in VALUES.items():
        v = got[k]
        if isinstance(want, str):
            assert v == want, k
            continue
        arr = v.asnumpy()
        assert arr.shape == () and arr.item() == want or (isinstance(want, float) and math.isnan(want)), k
        if isinstance(want, float):
            assert arr.dtype == np.float64 and _bits(arr.item()) == _bits(want) or math.isnan(want), k
    st = ms.load_checkpoint(str(root / "ms.safetensors"), format="safetensors")
    assert st["big"].asnumpy().item() == 1e300 and st["tiny"].asnumpy().item() == 1e-50
    assert np.array_equal(st["w"].asnumpy(), np.arange(16, dtype=np.float32).reshape(4, 4))
    assert cli(capsys, "reshard", ck, root / "ms_ranks", "--dst-strategy", root / "tp2.ckpt", "--format", "ckpt",
               "-q")[0] == 0
    r1 = ms.load_checkpoint(str(root / "ms_ranks" / "rank_1" / "checkpoint_1.ckpt"))
    assert r1["long"] == LONG and r1["i_min"].asnumpy().item() == -(2**63)
    assert np.array_equal(r1["w"].asnumpy(), np.arange(8, 16, dtype=np.float32).reshape(2, 4))


def test_a_string_ending_in_nul_is_refused_by_ckpt_outputs_only(tmp_path, capsys):
    """MindSpore reads a .ckpt string as a numpy "U" string, which drops trailing NULs: refuse, never change it."""
    ck = tmp_path / "ck"
    distckpt.save({"w": np.ones(2, np.float32), "s": "ab\x00"}, ck)
    assert_error(cli(capsys, "merge", ck, tmp_path / "m.ckpt"), "'s'", "NUL")
    assert_nothing_at(tmp_path / "m.ckpt")
    assert cli(capsys, "merge", ck, tmp_path / "m.safetensors", "-q")[0] == 0
    assert distckpt.load(tmp_path / "m.safetensors")["s"] == "ab\x00"


def test_value_encoding_is_documented():
    readme = (REPO / "README.md").read_text()
    assert "distckpt.values" in readme and "Float64" in readme


# ------------------------------------------------------------------ item 8
@pytest.fixture
def ck8(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_INDEX_VERSION", "1")  # the edits below are to version 1's text
    path = tmp_path / "ck"
    distckpt.save({"w": np.ones((4, 4), np.float32), "step": 1}, path)
    return path


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace('"version":1', '"version":99,"version":1', 1), "version"),
    (lambda t: t[:-1] + ',"tensors":{}}', "tensors"),
    (lambda t: t.replace('"values":{', '"values":{"step":{"type":"int","value":2},', 1), "step"),
])
def test_duplicate_json_keys_in_an_index_are_refused(ck8, capsys, edit, key):
    """"version": 99 then "version": 1 was accepted; a second, empty "tensors" made verify say ok: 0 tensors."""
    idx = ck8 / INDEX_NAME
    text = idx.read_text()
    assert text.startswith("{") and '"version":1' in text
    idx.write_text(edit(text))
    line = assert_error(cli(capsys, "verify", ck8))
    assert f"duplicate key {key!r}" in line and str(idx) in line
    with pytest.raises(FormatError, match="duplicate key"):
        distckpt.load(ck8)
    assert_error(cli(capsys, "inspect", ck8), "duplicate key")


def test_duplicate_keys_in_every_json_read_from_storage(tmp_path, capsys):
    """Manifests, weight-map indexes, strategy JSON, config.json, safetensors headers, hub documents."""
    from distckpt import hub, mfconfig
    from distckpt.codecs.safetensors import read_safetensors_header

    # a rank-mode manifest
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))})
    for r in range(2):
        distckpt.save({"w": np.ones((2, 4), np.float32)}, tmp_path / "rm", rank=r, strategy=strat)
    man = tmp_path / "rm" / ".manifest-00000.json"
    man.write_text(man.read_text().replace('"rank": 0', '"rank": 0, "rank": 0', 1))
    assert "duplicate key 'rank'" in assert_error(cli(capsys, "finalize", tmp_path / "rm"))
    # a HuggingFace / MindFormers weight-map index
    hf = tmp_path / "hf"
    distckpt.save({"w": np.ones((4, 4), np.float32), "v": np.zeros((4, 4), np.float32)}, tmp_path / "two")
    distckpt.merge(tmp_path / "two", hf, format="safetensors", max_shard_size=40)
    wm = hf / "model.safetensors.index.json"
    doc = wm.read_text()
    wm.write_text(doc.replace('"weight_map": {', '"weight_map": {"w": "model-00001-of-00002.safetensors", ', 1))
    assert "duplicate key 'w'" in assert_error(cli(capsys, "inspect", hf))
    # a strategy JSON
    sj = tmp_path / "s.json"
    save_strategy(strat, sj)
    sj.write_text(sj.read_text().replace('"current_stage": 0', '"current_stage": 0, "current_stage": 1', 1))
    with pytest.raises(StrategyError, match="duplicate key 'current_stage'"):
        distckpt.load_strategy(sj)
    # a config.json
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 8, "hidden_size": 16}')
    with pytest.raises(DistCkptError, match="duplicate key 'hidden_size'"):
        mfconfig.read_config(cfg)
    # a safetensors header
    hdr = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    blob = tmp_path / "dup.safetensors"
    blob.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\0" * 4)
    with open(blob, "rb") as f, pytest.raises(FormatError, match="twice"):
        read_safetensors_header(f, size=blob.stat().st_size, name=str(blob))
    # a document from a model hub
    with pytest.raises(DistCkptError, match="duplicate key 'files'"):
        hub._loads(b'{"files": [], "files": ["x"]}', "http://hub/m/listing.json")


def test_every_json_parse_in_the_package_rejects_duplicate_keys():
    """No ``json.loads`` / ``json.load`` in distckpt outside jsonutil, except where named here and why."""
    import re

    allowed = {
        "distckpt/comm.py": "ranks' own messages over MPI, not storage",
        "distckpt/mindspore/config.py": "a MindFormers config object in memory (to_json_string)",
        "distckpt/codecs/safetensors.py": "own object_pairs_hook (duplicate tensor names)",
        "distckpt/codecs/mindformers.py": "own object_pairs_hook",
    }
    found = {}
    for path in sorted((REPO / "distckpt").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel == "distckpt/jsonutil.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bjson\.loads?\(", line):
                found.setdefault(rel, []).append((n, line.strip()))
    assert set(found) <= set(allowed), {k: v for k, v in found.items() if k not in allowed}
    for rel in ("distckpt/codecs/safetensors.py", "distckpt/codecs/mindformers.py"):
        assert all("object_pairs_hook" in ln for _, ln in found.get(rel, [])), found[rel]
