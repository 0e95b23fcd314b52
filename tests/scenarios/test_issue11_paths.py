"""Issue 11, B (items 9-11): never write or delete outside what the user named.

Every test looks at the whole temporary tree afterwards, not only at DST: a name read from storage
(item 9) or given as an option (item 10) must never become a path outside DST, and ``gc`` (item 11)
deletes only what a save marker, a manifest or a committed index proves distckpt wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from issue11_util import assert_error, assert_nothing_at, cli

import distckpt
from distckpt import naming
from distckpt.commit import write_marker
from distckpt.errors import DistCkptError, FormatError, NotCommittedError, UsageError
from distckpt.index import INDEX_NAME
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.storage import open_storage
from distckpt.strategy import save_strategy


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def ck(tmp_path):
    path = tmp_path / "ck"
    distckpt.save({"w": np.arange(16, dtype=np.float32).reshape(4, 4), "step": 2}, path)
    return path


# ------------------------------------------------------------------ item 9
HOSTILE_NAMES = ["../../ESCAPED", "{tmp}/ESCAPED_abs", "..", "sub/ESCAPED", ".", "", "a\\..\\ESCAPED", "x\x00y", 7]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n) for n in HOSTILE_NAMES])
def test_a_name_from_the_index_never_reaches_a_path(tmp_path, capsys, ck, name):
    """metadata.name "../../ESCAPED" made `merge ck out/dst` write ESCAPED.ckpt two levels above DST."""
    idx = ck / INDEX_NAME
    doc = json.loads(idx.read_text())
    if isinstance(name, str):
        name = name.replace("{tmp}", str(tmp_path))  # an absolute path, inside this test's directory
    doc["metadata"]["name"] = name
    idx.write_text(json.dumps(doc))
    (tmp_path / "out" / "deeper").mkdir(parents=True)
    dst = tmp_path / "out" / "deeper" / "dst"
    before = _tree(tmp_path)
    if isinstance(name, str):
        line = assert_error(cli(capsys, "merge", ck, dst))
        assert "metadata.name" in line and str(idx) in line
        with pytest.raises(FormatError, match="not a plain file name"):
            distckpt.merge(ck, dst)
    else:  # not a string: not a name at all, so nothing names the output after it
        assert cli(capsys, "merge", ck, dst, "-q")[0] == 0
        assert os.listdir(dst) == ["mindspore_model.ckpt"]
        return
    assert _tree(tmp_path) == before


def test_finalize_refuses_a_manifest_name_that_is_a_path(tmp_path, capsys):
    """The same name in a rank-mode manifest would be committed into the index by finalize."""
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))})
    path = tmp_path / "rm"
    for r in range(2):
        distckpt.save({"w": np.ones((2, 4), np.float32)}, path, rank=r, strategy=strat, metadata={"name": "ok"})
    man = path / ".manifest-00000.json"
    doc = json.loads(man.read_text())
    doc["metadata"]["name"] = "../../ESCAPED"
    man.write_text(json.dumps(doc))
    line = assert_error(cli(capsys, "finalize", path))
    assert str(man) in line and "metadata.name" in line
    assert not (path / INDEX_NAME).exists()


def test_save_refuses_a_model_name_that_is_a_path(tmp_path):
    with pytest.raises(FormatError, match="metadata.name"):
        distckpt.save({"w": np.ones(2, np.float32)}, tmp_path / "s", metadata={"name": "../x"})
    assert os.listdir(tmp_path / "s") == []  # the failed save removed its data file and its marker
    assert sorted(os.listdir(tmp_path)) == ["s"]


# ------------------------------------------------------------------ item 10
@pytest.fixture
def tp2(tmp_path):
    path = tmp_path / "tp2.ckpt"
    save_strategy(Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))}), path)
    return path


BAD_PREFIXES = ["../../PFX_", "../PFX_", "{tmp}/PFX_abs_", "sub/PFX_", "../", "PFX\\..\\"]


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
@pytest.mark.parametrize("verb", ["reshard", "split"])
def test_prefix_is_a_plain_name(tmp_path, capsys, ck, tp2, verb, prefix):
    """reshard ... --format ckpt --prefix ../../PFX_ wrote per-rank files two levels above DST."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    dst = tmp_path / "a" / "b" / "dst"
    prefix = prefix.replace("{tmp}", str(tmp_path))  # an absolute path, inside this test's directory
    before = _tree(tmp_path)
    line = assert_error(cli(capsys, verb, ck, dst, "--dst-strategy", tp2, "--format", "ckpt", "--prefix", prefix),
                        code=2, command=verb)
    assert "--prefix" in line and repr(prefix) in line
    with pytest.raises(UsageError, match="--prefix"):
        getattr(distckpt, verb)(ck, dst, dst_strategy=tp2, format="ckpt", prefix=prefix)
    assert _tree(tmp_path) == before
    assert_nothing_at(dst)


def test_prefix_from_a_config_file_is_checked_too(tmp_path, capsys, ck, tp2):
    (tmp_path / "a" / "b").mkdir(parents=True)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"version: 1\ncheckpoint:\n  format: ckpt\n  prefix: ../../PFX_\nstrategy:\n  dst: {tp2}\n")
    before = _tree(tmp_path)
    line = assert_error(cli(capsys, "reshard", ck, tmp_path / "a" / "b" / "dst", "--config", cfg), code=2,
                        command="reshard")
    assert "'../../PFX_'" in line
    assert _tree(tmp_path) == before
    # a plain prefix from the same config works, and names the files
    cfg.write_text(f"version: 1\ncheckpoint:\n  format: ckpt\n  prefix: step9_\nstrategy:\n  dst: {tp2}\n")
    rc, out, err = cli(capsys, "reshard", ck, tmp_path / "a" / "b" / "dst", "--config", cfg, "-q")
    assert rc == 0, err
    assert (tmp_path / "a" / "b" / "dst" / "rank_1" / "step9_1.ckpt").is_file()


# ------------------------------------------------------------------ item 11
def test_gc_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    """mkdir d; touch d/data-train-00000-of-00002.safetensors d/.editor.tmp; distckpt gc d -- deleted both."""
    d = tmp_path / "d"
    d.mkdir()
    names = ["data-train-00000-of-00002.safetensors", ".editor.tmp", "data-20260101T000000-0badc0de-00000.safetensors",
             ".distckpt.index.json.123.tmp"]
    for n in names:
        (d / n).write_bytes(b"mine")
    for args in (("gc", d), ("gc", d, "--dry-run")):
        line = assert_error(cli(capsys, *args))
        assert "not a distckpt checkpoint" in line and str(d) in line
    with pytest.raises(NotCommittedError):
        distckpt.gc(d)
    assert sorted(os.listdir(d)) == sorted(names)
    assert all((d / n).read_bytes() == b"mine" for n in names)


def _crashed_save(store_dir: Path, rank_files=(0, 1)) -> list[str]:
    """What a save killed after writing its data files leaves: its marker and its files (no index)."""
    store = open_storage(store_dir)
    sid = naming.new_save_id()
    write_marker(store, sid)
    out = [naming.save_marker(sid)]
    for r in rank_files:
        (store_dir / naming.data_file(sid, r)).write_bytes(b"partial")
        out.append(naming.data_file(sid, r))
    return out


def test_gc_deletes_only_what_distckpt_can_prove_it_wrote(tmp_path, capsys, ck):
    ours = _crashed_save(ck)
    strangers = {  # look like ours by name, but nothing proves it
        "data-20260101T000000-0badc0de-00000.safetensors": b"someone else's",
        ".editor.tmp": b"x",
        "notes.txt": b"y",
        "model.safetensors": b"z",
    }
    for n, data in strangers.items():
        (ck / n).write_bytes(data)
    before = set(os.listdir(ck))
    rc, out, err = cli(capsys, "gc", ck, "--dry-run")
    assert rc == 0, err
    assert sorted(ln.split(" ", 2)[2] for ln in out.splitlines()) == sorted(ours)
    assert set(os.listdir(ck)) == before
    assert cli(capsys, "gc", ck, "-q")[0] == 0
    assert set(os.listdir(ck)) == before - set(ours)
    for n, data in strangers.items():
        assert (ck / n).read_bytes() == data
    got = distckpt.load(ck)  # the committed checkpoint is untouched
    assert np.array_equal(got["w"], np.arange(16, dtype=np.float32).reshape(4, 4)) and got["step"] == 2
    distckpt.verify(ck)


def test_gc_of_a_failed_first_save_is_proven_by_its_marker(tmp_path, capsys):
    d = tmp_path / "first"
    d.mkdir()
    ours = _crashed_save(d, rank_files=(0, 1, 2))
    (d / "README").write_text("keep me")
    assert sorted(distckpt.gc(d, dry_run=True)) == sorted(ours)
    assert sorted(distckpt.gc(d)) == sorted(ours)
    assert os.listdir(d) == ["README"]
    line = assert_error(cli(capsys, "gc", d))  # nothing left that proves a checkpoint: refused, not guessed
    assert "not a distckpt checkpoint" in line


def test_gc_refuses_to_guess_next_to_a_corrupt_index(tmp_path, capsys, ck):
    (ck / INDEX_NAME).write_text('{"format": "distckpt", "version": 1, "version": 1}')
    files = set(os.listdir(ck))
    assert "refuses to guess" in assert_error(cli(capsys, "gc", ck))
    with pytest.raises(DistCkptError):
        distckpt.gc(ck)
    assert set(os.listdir(ck)) == files
