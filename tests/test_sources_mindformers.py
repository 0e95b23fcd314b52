"""The ``mindformers`` source kind against real MindFormers 1.9 checkpoints and MindFormers' own loader.

Fixtures are real saves (``tests/mfckpt.py``: MindFormers' ``save_checkpoint`` replayed rank by
rank): plain and balanced, DP2xMP2, MP4 and standalone; fp32, bf16 and int32; model and optimizer
tensors.  The oracle is MindFormers' ``load_checkpoint`` in standalone mode (it merges any of them).

* every tensor distckpt reads equals, bit for bit, MindFormers' merge;
* ``load(strategy=..., rank=r)`` returns exactly rank r's slices and reads exactly their bytes;
* the layouts of ``metadata.json`` become the source's strategy (so ``inspect`` shows them) and give
  each rank the area MindFormers' own ``infer_slice_area_by_rank`` gives it;
* roots follow their tracker, ``--src-iteration`` picks another iteration, ``list`` names each
  iteration's state; what MindFormers itself loads (extra safetensors files, prefixed names) is read.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from mfckpt import COMMON, make_mf_checkpoint, mf_load_standalone

import distckpt
from distckpt import api
from distckpt.cli import main
from distckpt.codecs import mindformers as mf
from distckpt.errors import FormatError, NotCommittedError, NotFoundError, UsageError
from distckpt.execute import ReadStats
from distckpt.layout import Box, ParamSpec, Strategy, TensorLayout, full_box
from distckpt.manager import CheckpointManager
from distckpt.sources import SourceKind, open_source

MULTI = [("dp2mp2", False), ("dp2mp2", True), ("mp4", False), ("mp4", True)]
CASES = MULTI + [("standalone", False)]
ITERATION = 30


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Real MindFormers checkpoints by case, each written and merged by MindFormers once."""
    cache: dict = {}
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd"))  # MindFormers logs to ./output

    def get(layout: str, balanced: bool) -> SimpleNamespace:
        if (layout, balanced) not in cache:
            root = tmp_path_factory.mktemp(f"mf-{layout}-{'balanced' if balanced else 'plain'}")
            full = make_mf_checkpoint(root, layout=layout, balanced=balanced, iteration=ITERATION, seed=11)
            specs = {n: (a.shape, _dtype_name(a)) for n, a in full.items()}
            oracle = mf_load_standalone(root, specs)
            cache[layout, balanced] = SimpleNamespace(root=root, dir=root / mf.iteration_dir(ITERATION), layout=layout,
                                                      balanced=balanced, full=full, specs=specs, oracle=oracle)
        return cache[layout, balanced]

    yield get
    mp.undo()


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _case_id(case) -> str:
    return f"{case[0]}-{'balanced' if case[1] else 'plain'}"


@pytest.fixture(params=CASES, ids=_case_id)
def ckpt(request, built):
    return built(*request.param)


@pytest.fixture(params=MULTI, ids=_case_id)
def multi(request, built):
    return built(*request.param)


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == np.dtype(ml_dtypes.bfloat16) else str(a.dtype)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _slice(full: np.ndarray, box: Box) -> np.ndarray:
    return full[box.relative_to(full_box(full.shape))] if box.ndim else full


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- reading
def test_every_tensor_equals_mindformers_own_merge(ckpt):
    for path in (ckpt.root, ckpt.dir):  # a root follows its tracker; an iteration dir is read directly
        src = open_source(str(path))
        assert src.kind == SourceKind.MINDFORMERS and str(src.kind) == "mindformers"
        assert src.info["inspect"]["iteration"] == ITERATION
        got = distckpt.load(str(path))
        assert sorted(got) == sorted(ckpt.oracle)
        assert {_dtype_name(a) for a in got.values()} >= {"float32", "bfloat16", "int32"}
        for name, arr in got.items():
            assert _same(arr, ckpt.oracle[name]), name
            assert _same(arr, ckpt.full[name]), name
    assert open_source(str(ckpt.root)).world_size == (1 if ckpt.layout == "standalone" else 4)


def test_layouts_become_the_strategy_mindformers_slices_by(multi):
    from mindformers.checkpoint.reshard import infer_slice_area_by_rank

    src = open_source(str(multi.root))
    md = mf.parse_metadata((multi.dir / mf.METADATA).read_bytes())
    assert src.strategy is not None and set(src.strategy.params) == set(multi.full)
    assert src.strategy.world_size == 4
    for t in md.tensors:
        d = t.mf_layout.to_json()
        for rank in range(4):
            area = infer_slice_area_by_rank(d["device_matrix"], d["tensor_map"], rank, t.shape)
            want = Box(tuple(a for a, _ in area), tuple(b - a for a, b in area))
            assert src.strategy.box(t.name, rank, t.shape) == want, (t.name, rank)


@pytest.mark.parametrize("target", ["own", "mp4", "dp2mp2"])
def test_rank_loads_return_and_read_exactly_their_slices(multi, target):
    src = open_source(str(multi.root))
    shapes = {n: a.shape for n, a in multi.full.items()}
    if target == "own":
        strat = src.strategy
    else:  # another layout than the one saved: dim 0 split 4 ways, or dims 0/1 over a 2x2 mesh where they divide
        dm = (4,) if target == "mp4" else (2, 2)
        strat = Strategy({n: ParamSpec(n, TensorLayout(dm, _split_map(s, dm))) for n, s in shapes.items()})
    total = ReadStats()
    for r in range(4):
        st = ReadStats()
        got = distckpt.load(str(multi.root), strategy=strat, rank=r, stats=st)
        assert sorted(got) == sorted(multi.full)
        want = touched = 0
        for name, arr in got.items():
            box = strat.box(name, r, shapes[name]) if name in strat else full_box(shapes[name])
            assert _same(arr, _slice(multi.oracle[name], box)), (name, r)
            want += arr.nbytes
            touched += sum(c.nbytes for _, c, _ in src.tensors[name].overlapping(box))
        assert st.bytes_needed == want, (r, st.to_json())
        # only the chunks this rank's slices overlap; exactly its bytes when the layout is the saved one
        assert st.bytes_read <= touched and (target != "own" or st.bytes_read == want), (r, st.to_json())
        total.add(st)
    assert target != "own" or total.ratio == 1.0


def _split_map(shape, dm):
    axes = list(range(len(dm)))[::-1]  # leftmost device axis first (tensor_map counts from the right)
    out = []
    for n in shape:
        if axes and n % dm[len(dm) - 1 - axes[0]] == 0:
            out.append((axes.pop(0),))
        else:
            out.append((-1,))
    return tuple(out)


def test_inspect_reports_iteration_common_files_and_layouts(ckpt, capsys):
    code, out, err = _cli(capsys, "inspect", ckpt.root, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "mindformers" and info["iteration"] == ITERATION
    assert info["common"] == {"step_num": ITERATION, "global_step": ITERATION, **COMMON}
    assert info["files"] == sorted(p.name for p in ckpt.dir.glob("*.safetensors"))
    rows = {t["name"]: t for t in info["tensors"]}
    assert set(rows) == set(ckpt.full)
    if ckpt.layout == "standalone":
        assert all(t["layout"] is None for t in rows.values()) and info["world_size"] == 1
        return
    col = rows["model.f32.col"]  # (mp, None): 2 slices over DP2xMP2 (2 replicas each), 4 over MP4
    assert col["layout"]["dev_matrix"] == ([2, 2] if ckpt.layout == "dp2mp2" else [4])
    assert col["replicas"] == (2 if ckpt.layout == "dp2mp2" else 1)
    assert rows["model.bf16.bias"]["replicas"] == 4
    assert col["chunks"] == (2 if ckpt.layout == "dp2mp2" else 4)
    code, out, _ = _cli(capsys, "inspect", ckpt.root)
    assert code == 0 and "mindformers, 4 rank(s)" in out


def test_verify_checks_structure_and_says_there_are_no_checksums(ckpt, capsys, tmp_path):
    code, out, err = _cli(capsys, "verify", ckpt.root, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["ok"] and rep["kind"] == "mindformers" and rep["checksums"] is False
    assert rep["bytes_checked"] == sum(a.nbytes for a in ckpt.full.values())
    code, out, _ = _cli(capsys, "verify", ckpt.root)
    assert code == 0 and "no checksums" in out
    # a truncated data file: one error naming the file
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.root, bad)
    victim = sorted((bad / mf.iteration_dir(ITERATION)).glob("model-*.safetensors"))[-1]
    os.chmod(victim, 0o600)
    victim.write_bytes(victim.read_bytes()[:-8])
    code, out, err = _cli(capsys, "verify", bad)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and victim.name in lines[0], err


# --------------------------------------------------------------------------- roots, iterations, list
@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """A root with iterations 10 and 20 (the tracker names 20), saved by MindFormers."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd2"))
    root = tmp_path_factory.mktemp("two")
    first = make_mf_checkpoint(root, layout="mp4", balanced=True, iteration=10, seed=1)
    second = make_mf_checkpoint(root, layout="mp4", balanced=True, iteration=20, seed=2)
    mp.undo()
    return SimpleNamespace(root=root, first=first, second=second)


def test_src_iteration_picks_another_iteration(two_iterations, capsys):
    root = two_iterations.root
    assert (root / mf.TRACKER).read_text() == "20"
    for it, want in ((None, two_iterations.second), (20, two_iterations.second), (10, two_iterations.first)):
        got = distckpt.load(str(root), iteration=it)
        assert all(_same(got[n], a) for n, a in want.items()), it
    code, out, err = _cli(capsys, "inspect", root, "--src-iteration", 10, "--json")
    assert code == 0, err
    assert json.loads(out)["iteration"] == 10
    with pytest.raises(NotFoundError, match=r"iteration_00000015: no such iteration .*iterations present: 10, 20"):
        open_source(str(root), iteration=15)
    with pytest.raises(UsageError, match="pass the root"):
        open_source(str(root / mf.iteration_dir(10)), iteration=20)
    assert open_source(str(root / mf.iteration_dir(10)), iteration=10).info["inspect"]["iteration"] == 10


def test_src_iteration_on_another_kind_is_a_usage_error(tmp_path, capsys):
    distckpt.save({"w": np.ones((2, 2), np.float32)}, tmp_path / "d")
    code, _, err = _cli(capsys, "inspect", tmp_path / "d", "--src-iteration", 3)
    assert code == 2 and "MindFormers" in err


def test_list_names_each_iteration_and_its_state(two_iterations, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(two_iterations.root, root)
    (root / mf.iteration_dir(25)).mkdir()  # a save in flight: newer than the tracker
    (root / mf.iteration_dir(25) / mf.file_name("model", 0, 4)).write_bytes(b"x")
    code, out, err = _cli(capsys, "list", root)
    assert code == 0, err
    assert out.splitlines() == [
        "iteration_00000010  previous",
        "iteration_00000020  committed",
        "iteration_00000025  uncommitted",
    ]
    code, out, _ = _cli(capsys, "list", root, "--json")
    assert json.loads(out) == [
        {"name": "iteration_00000010", "iteration": 10, "state": "previous"},
        {"name": "iteration_00000020", "iteration": 20, "state": "committed"},
        {"name": "iteration_00000025", "iteration": 25, "state": "uncommitted"},
    ]
    mgr = CheckpointManager(root, layout="mindformers")
    assert mgr.all_steps() == [10, 20] and mgr.latest_step() == 20
    (root / mf.TRACKER).write_text("25")  # a tracker naming a directory that does not exist
    shutil.rmtree(root / mf.iteration_dir(25))
    code, out, _ = _cli(capsys, "list", root)
    assert out.splitlines()[-1] == "iteration_00000025  missing"


def test_manager_roots_keep_their_list_output(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, {"w": np.zeros(4, np.float32)})
    code, out, _ = _cli(capsys, "list", tmp_path)
    assert code == 0 and out.split() == ["3"]
    code, out, _ = _cli(capsys, "list", tmp_path, "--json")
    assert json.loads(out)["latest"] == 3


def test_root_without_tracker_needs_an_iteration(two_iterations, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(two_iterations.root, root)
    (root / mf.TRACKER).unlink()
    with pytest.raises(NotCommittedError, match=r"without latest_checkpointed_iteration.txt.*iterations present: 10, 20.*--src-iteration"):
        open_source(str(root))
    got = distckpt.load(str(root), iteration=10)
    assert all(_same(got[n], a) for n, a in two_iterations.first.items())


# --------------------------------------------------------------------------- what MindFormers loads, we load
def test_standalone_directory_reads_every_safetensors_file_as_mindformers_does(built, tmp_path):
    import mindspore as ms
    from mfckpt import _ms_tensor

    base = built("standalone", False)
    root = tmp_path / "root"
    shutil.copytree(base.root, root)
    d = root / mf.iteration_dir(ITERATION)
    extra = np.arange(6, dtype=np.float32).reshape(2, 3)
    ms.save_checkpoint([{"name": "extra.w", "data": _ms_tensor(extra)}], str(d / "extra.safetensors"), format="safetensors")
    specs = {**base.specs, "extra.w": ((2, 3), "float32")}
    oracle = mf_load_standalone(root, specs)
    got = distckpt.load(str(root))
    assert sorted(got) == sorted(oracle)
    assert all(_same(got[n], oracle[n]) for n in got)
    # a tensor in two files: MindFormers refuses it, and so do we, naming both files
    ms.save_checkpoint([{"name": "extra.w", "data": _ms_tensor(extra)}], str(d / "again.safetensors"), format="safetensors")
    with pytest.raises(RuntimeError, match="Duplicate"):
        mf_load_standalone(root, specs)
    with pytest.raises(FormatError, match=r"'extra.w' appears in both 'again.safetensors' and 'extra.safetensors'"):
        open_source(str(root))


def test_prefixed_file_names_are_read(built, tmp_path):
    """The graph trainer passes prefix CKP: ``CKP-model-0000000-0000001.safetensors``."""
    base = built("standalone", False)
    d = tmp_path / mf.iteration_dir(ITERATION)
    shutil.copytree(base.dir, d)
    for p in d.glob("*.safetensors"):
        p.rename(d / f"CKP-{p.name}")
    src = open_source(str(d))
    assert src.kind == SourceKind.MINDFORMERS and src.info["kinds"]["adam_m.model.f32.col"] == "opt"
    got = distckpt.load(str(d))
    assert all(_same(got[n], a) for n, a in base.full.items())


def test_metadata_naming_a_file_without_the_tensor_is_refused(built, tmp_path):
    base = built("dp2mp2", False)
    root = tmp_path / "root"
    shutil.copytree(base.root, root)
    d = root / mf.iteration_dir(ITERATION)
    doc = json.loads((d / mf.METADATA).read_text())
    key = mf.shard_id("model.f32.col", 0)
    doc["storage_data"][key][0]["file_name"] = mf.file_name("opt", 0, 4)
    os.chmod(d / mf.METADATA, 0o600)
    (d / mf.METADATA).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"opt-0000000-0000004.safetensors: holds no tensor 'model.f32.col'"):
        open_source(str(root))


def test_a_data_file_with_another_dtype_than_metadata_says_is_refused(built, tmp_path):
    base = built("mp4", True)
    root = tmp_path / "root"
    shutil.copytree(base.root, root)
    d = root / mf.iteration_dir(ITERATION)
    doc = json.loads((d / mf.METADATA).read_text())
    doc["state_dict_metadata"]["model.f32.row"]["properties"]["dtype"] = "Float16"
    os.chmod(d / mf.METADATA, 0o600)
    (d / mf.METADATA).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"model-\d+-0000004.safetensors: tensor 'model.f32.row' is float32\[6, 2\], "
                                          r"but .*metadata.json describes chunk \d as float16"):
        open_source(str(root))


def test_api_load_by_name_and_values(built):
    base = built("dp2mp2", True)
    got = api.load(str(base.root), names=["model.bf16.grid"])
    assert list(got) == ["model.bf16.grid"] and _same(got["model.bf16.grid"], base.full["model.bf16.grid"])


def test_described_tensors_no_file_holds_are_skipped_as_mindformers_skips_them(built, tmp_path, capsys):
    """A compiled graph may report parameters (``accu_grads.*``) that no file holds; MindFormers never reads them."""
    base = built("dp2mp2", False)
    root = tmp_path / "root"
    shutil.copytree(base.root, root)
    d = root / mf.iteration_dir(ITERATION)
    doc = json.loads((d / mf.METADATA).read_text())
    doc["state_dict_metadata"]["accu_grads.model.f32.col"] = doc["state_dict_metadata"]["model.f32.col"]
    for k in (0, 1):
        doc["storage_data"][mf.shard_id("accu_grads.model.f32.col", k)] = doc["storage_data"][mf.shard_id("model.f32.col", k)]
    os.chmod(d / mf.METADATA, 0o600)
    (d / mf.METADATA).write_text(json.dumps(doc))
    oracle = mf_load_standalone(root, base.specs)  # MindFormers loads it
    src = open_source(str(root))
    assert src.info["missing"] == ["accu_grads.model.f32.col"] and "accu_grads.model.f32.col" not in src.tensors
    got = distckpt.load(str(root))
    assert sorted(got) == sorted(oracle) and all(_same(got[n], oracle[n]) for n in got)
    code, _, err = _cli(capsys, "merge", root, tmp_path / "m.safetensors", "-q")
    assert code == 0 and "warning:" in err and "accu_grads.model.f32.col" in err
    code, _, err = _cli(capsys, "merge", root, tmp_path / "s.safetensors", "--strict")
    assert code == 1 and "accu_grads.model.f32.col" in err and not (tmp_path / "s.safetensors").exists()
