"""Scenario: a MindFormers 1.9 user's checkpoint through the ``distckpt`` command line, end to end.

A real checkpoint saved by MindFormers' own code (``tests/mfckpt.py``: DP2xMP2, plain, fp32 / bf16 /
int32, model and optimizer tensors) is inspected, verified, listed, merged and resharded with the
CLI as a user types it; every MindFormers output is loaded back with MindFormers' own
``load_checkpoint`` (standalone mode, the oracle) and must equal the tensors MindFormers saved.
Round trips: MindFormers -> distckpt -> MindFormers, and DP2xMP2 -> MP4 -> MindFormers.

Hostile inputs (issue 14, item 4): each is refused by ``inspect``, ``verify`` and ``merge`` with
exit code 1 and exactly one ``error:`` line that names the file and the problem, and nothing is
written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from mfckpt import COMMON, make_mf_checkpoint, mf_load_standalone

from distckpt.cli import main
from distckpt.codecs import mindformers as mf
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.strategy import save_strategy

ITERATION = 30
COL = "model.f32.col"  # (8, 6) split on dim 0 over mp: 2 slices under DP2xMP2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A MindFormers root written by MindFormers itself, its tensors, and strategy files for targets."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd"))  # MindFormers logs to ./output
    root = tmp_path_factory.mktemp("run") / "checkpoint"
    full = make_mf_checkpoint(root, layout="dp2mp2", balanced=False, iteration=ITERATION, seed=21)
    mp.undo()
    here = tmp_path_factory.mktemp("strategies")
    strategies = {}
    for name, dm in (("mp4", (4,)), ("dp2mp2", (2, 2))):
        params = {}
        for n, a in full.items():
            if n == "global_step":
                continue
            axes = list(range(len(dm)))[::-1]
            tm = []
            for size in a.shape:
                tm.append((axes.pop(0),) if axes and size % dm[len(dm) - 1 - axes[0]] == 0 else (-1,))
            params[n] = ParamSpec(n, TensorLayout(dm, tuple(tm)))
        strategies[name] = save_strategy(Strategy(params), here / f"{name}.ckpt")
    return root, full, strategies


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _specs(full: dict) -> dict:
    return {n: (a.shape, "bfloat16" if a.dtype == np.dtype(ml_dtypes.bfloat16) else str(a.dtype)) for n, a in full.items()}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what came before (MindFormers logs to stdout)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ok(capsys, *argv) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    return out


def _mindformers_loads(path: Path, full: dict) -> None:
    got = mf_load_standalone(path, _specs(full))
    for name, arr in full.items():
        assert _same(got[name], arr), name


def test_a_mindformers_user_inspects_verifies_merges_and_reshards(saved, tmp_path, capsys):
    root, full, strategies = saved
    info = json.loads(_ok(capsys, "inspect", root, "--json"))
    assert (info["kind"], info["iteration"], info["world_size"]) == ("mindformers", ITERATION, 4)
    assert info["common"] == {"step_num": ITERATION, "global_step": ITERATION, **COMMON}
    assert {t["name"]: t["layout"]["dev_matrix"] for t in info["tensors"]}[COL] == [2, 2]
    assert "no checksums" in _ok(capsys, "verify", root)
    assert _ok(capsys, "list", root).splitlines() == ["iteration_00000030  committed"]

    merged = tmp_path / "merged"  # one rank, MindFormers' standalone form
    _ok(capsys, "merge", root, merged, "--format", "mindformers", "--dst-iteration", 40, "-q")
    assert (merged / mf.TRACKER).read_text() == "40" and not (merged / mf.iteration_dir(40) / mf.METADATA).exists()
    _mindformers_loads(merged, full)

    for plain in ([], ["--plain"]):  # DP2xMP2 -> MP4, balanced and plain
        out = tmp_path / f"mp4{''.join(plain)}"
        _ok(capsys, "reshard", root, out, "--dst-strategy", strategies["mp4"], "--format", "mindformers", *plain, "-q")
        _mindformers_loads(out, full)
        again = json.loads(_ok(capsys, "inspect", out, "--src-iteration", ITERATION, "--json"))
        assert {t["name"]: t["layout"]["dev_matrix"] for t in again["tensors"]}[COL] == [4]
        assert _ok(capsys, "list", out).splitlines() == ["iteration_00000030  committed"]

    dck = tmp_path / "dck"  # MindFormers -> distckpt -> MindFormers
    _ok(capsys, "reshard", root, dck, "--dst-strategy", strategies["mp4"], "-q")
    assert json.loads(_ok(capsys, "verify", dck, "--json"))["checksums"] is True
    back = tmp_path / "back"
    _ok(capsys, "reshard", dck, back, "--dst-strategy", strategies["dp2mp2"], "--format", "mindformers", "-q")
    assert (back / mf.TRACKER).read_text() == "0"  # a distckpt source has no iteration: 0 unless --dst-iteration
    _mindformers_loads(back, full)

    single = tmp_path / "model.safetensors"  # and the MindSpore world: one file MindSpore loads
    _ok(capsys, "merge", root, single, "-q")
    import mindspore as ms

    loaded = ms.load_checkpoint(str(single), format="safetensors")
    assert sorted(loaded) == sorted(full)
    assert np.array_equal(loaded[COL].asnumpy(), full[COL])


# --------------------------------------------------------------------------- hostile inputs
def _metadata(d: Path) -> dict:
    return json.loads((d / mf.METADATA).read_text())


def _write_metadata(d: Path, doc: dict) -> None:
    os.chmod(d / mf.METADATA, 0o600)
    (d / mf.METADATA).write_text(json.dumps(doc, indent=4))


def _edit(fn):
    def apply(root: Path) -> None:
        d = root / mf.iteration_dir(ITERATION)
        doc = _metadata(d)
        fn(doc)
        _write_metadata(d, doc)

    return apply


def _tracker(text: str):
    def apply(root: Path) -> None:
        os.chmod(root / mf.TRACKER, 0o600)
        (root / mf.TRACKER).write_text(text)

    return apply


def _rename_key(old: str, new: str):
    def fn(doc: dict) -> None:
        doc["storage_data"] = {(new if k == old else k): v for k, v in doc["storage_data"].items()}

    return fn


def _set_chunk(k: int, **fields):
    def fn(doc: dict) -> None:
        doc["state_dict_metadata"][COL]["chunk"][k].update(fields)

    return fn


def _drop_chunk(doc: dict) -> None:
    doc["state_dict_metadata"][COL]["chunk"].pop(1)
    doc["storage_data"].pop(mf.shard_id(COL, 1))


def _dtype(doc: dict) -> None:
    doc["state_dict_metadata"][COL]["properties"]["dtype"] = "float32x"


def _file_name(name: str):
    def fn(doc: dict) -> None:
        doc["storage_data"][mf.shard_id(COL, 0)][0]["file_name"] = name

    return fn


def _remove_file(root: Path) -> None:
    (root / mf.iteration_dir(ITERATION) / mf.file_name("model", 3, 4)).unlink()


META = f"{mf.iteration_dir(ITERATION)}/{mf.METADATA}"
HOSTILE = {
    # case: (mutation, file named in the error, words of the problem)
    "tracker-names-missing-iteration": (_tracker("99"), mf.TRACKER, "names iteration 99, but .*iteration_00000099 does not exist"),
    "tracker-not-a-number": (_tracker("thirty\n"), mf.TRACKER, "tracker 'thirty' is not an iteration number"),
    "storage-key-is-code": (
        _edit(_rename_key(mf.shard_id(COL, 0), "__import__('os').system('touch PWNED')")),
        META,
        "is not a MindFormers shard id",
    ),
    "chunks-overlap": (_edit(_set_chunk(0, local_shape=[8, 6])), META, "overlap"),
    "chunks-listed-twice": (
        _edit(lambda doc: doc["state_dict_metadata"][COL]["chunk"].append({"global_offset": [0], "local_shape": [4, 6]})),
        META,
        "global_offset \\[0\\] is listed twice",
    ),
    "chunks-leave-a-gap": (_edit(_drop_chunk), META, "chunks cover 24 elements but shape \\(8, 6\\) has 48"),
    "data-file-missing": (_remove_file, "model-0000003-0000004.safetensors", "data file named by .*metadata.json is missing"),
    "global-offset-out-of-range": (_edit(_set_chunk(1, global_offset=[7])), META, "global_offset \\[7\\] is out of range"),
    "dtype-not-mindspore": (_edit(_dtype), META, "dtype 'float32x' is not a MindSpore dtype name"),
    "file-name-parent": (_edit(_file_name("../x.safetensors")), META, "refusing file_name '\\.\\./x\\.safetensors'"),
    "file-name-absolute": (_edit(_file_name("/etc/passwd")), META, "refusing file_name '/etc/passwd'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_refused_with_one_line_and_nothing_written(saved, tmp_path, capsys, case):
    import re

    src, _, strategies = saved
    root = tmp_path / "root"
    shutil.copytree(src, root)
    mutate, where, problem = HOSTILE[case]
    mutate(root)
    for argv in (
        ["merge", root, tmp_path / "dst", "--format", "mindformers"],
        ["reshard", root, tmp_path / "dst", "--dst-strategy", strategies["mp4"], "--format", "mindformers"],
        ["merge", root, tmp_path / "dst.safetensors"],
        ["verify", root],
        ["inspect", root],
    ):
        code, out, err = _run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 1, (argv, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert where in lines[0] and re.search(problem, lines[0]), lines[0]
        assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.safetensors").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # no staging debris either
    assert not Path("PWNED").exists() and not (tmp_path / "PWNED").exists()


