"""``--format mindformers`` output and the distributed MindFormers save, against MindFormers 1.9 itself.

Oracles: MindFormers' ``load_checkpoint(DST, net, optimizer=...)`` in standalone mode must load
what distckpt wrote exactly (merged), and for every rank ``distckpt.load(DST, strategy=..., rank=r)``
must equal that rank's slice of it.  The balanced assignment is MindFormers' own
``fully_parallel.distribute_shards`` (compared directly).  Sources: real MindFormers saves
(``tests/mfckpt.py``) and distckpt checkpoints.  The distributed save runs single-process and under
``mpirun -n 4`` (CheckpointManager with ``layout="mindformers"``), and MindFormers resumes from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mfckpt import COMMON, make_mf_checkpoint, mf_load_standalone

import distckpt
from distckpt.cli import main
from distckpt.codecs import mindformers as mf
from distckpt.errors import ConfigError, NotCommittedError, StrategyError
from distckpt.layout import Box, ParamSpec, Strategy, TensorLayout, full_box
from distckpt.manager import CheckpointManager
from distckpt.sources import open_source
from distckpt.writers import mindformers as mfw

ITERATION = 30


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd"))  # MindFormers logs to ./output

    def get(layout: str, balanced: bool) -> SimpleNamespace:
        if (layout, balanced) not in cache:
            root = tmp_path_factory.mktemp(f"mf-{layout}-{'balanced' if balanced else 'plain'}")
            full = make_mf_checkpoint(root, layout=layout, balanced=balanced, iteration=ITERATION, seed=5)
            cache[layout, balanced] = SimpleNamespace(root=root, full=full, specs=_specs(full))
        return cache[layout, balanced]

    yield get
    mp.undo()


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == np.dtype(ml_dtypes.bfloat16) else str(a.dtype)


def _specs(full: dict) -> dict:
    return {n: (a.shape, _dtype_name(a)) for n, a in full.items()}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _slice(full: np.ndarray, box: Box) -> np.ndarray:
    return full[box.relative_to(full_box(full.shape))] if box.ndim else full


def _check_loads(dst: Path, full: dict, strat: Strategy | None) -> None:
    """Both oracles: MindFormers merges DST exactly; every rank's distckpt load is its slice of that."""
    merged = mf_load_standalone(dst, _specs(full))
    for name, arr in full.items():
        assert _same(merged[name], arr), name
    for r in range(strat.world_size if strat is not None else 1):
        got = distckpt.load(str(dst), strategy=strat, rank=r)
        want = {}
        for name, arr in merged.items():
            box = strat.box(name, r, arr.shape) if strat is not None and name in strat else full_box(arr.shape)
            if box is not None:  # None: another pipeline stage holds it
                want[name] = _slice(arr, box)
        assert sorted(got) == sorted(want)
        for name, arr in got.items():
            assert _same(arr, want[name]), (name, r)


def _strategy(full: dict, dm: tuple[int, ...]) -> Strategy:
    """Each tensor's dims split over the device axes (leftmost first) where they divide, else replicated."""
    params = {}
    for name, a in full.items():
        if name == "global_step":
            continue  # not in the strategy: replicated on every rank
        axes = list(range(len(dm)))[::-1]
        tm = []
        for n in a.shape:
            if axes and n % dm[len(dm) - 1 - axes[0]] == 0:
                tm.append((axes.pop(0),))
            else:
                tm.append((-1,))
        params[name] = ParamSpec(name, TensorLayout(dm, tuple(tm)))
    return Strategy(params)


# --------------------------------------------------------------------------- the balanced rule
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda world: st.tuples(st.just(world), st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 4), st.sets(st.integers(0, world - 1), min_size=1)),
    min_size=1, max_size=12))))
def test_balanced_assignment_is_mindformers_distribute_shards(case):
    from mindformers.checkpoint.fully_parallel import distribute_shards

    world, rows = case
    shards = {mf.shard_id(f"p{i % 3}", k): (size * 8, sorted(holders)) for i, (k, size, holders) in enumerate(rows)}
    theirs = distribute_shards({s: list(h) for s, (_, h) in shards.items()}, {s: n for s, (n, _) in shards.items()}, world)
    assert mfw.balanced_assignment(shards, world) == {s: r for s, (r, _) in theirs.items()}


def test_shard_sizes_are_mindformers_bits():
    from mindformers.checkpoint.utils import _get_shard_size

    for dt in ("float32", "bfloat16", "int32", "int64", "bool", "float16", "uint8", "float64", "float8_e4m3fn"):
        assert mfw.shard_bits(dt, 12) == _get_shard_size((3, 4), mf.ms_dtype_name(dt)), dt


# --------------------------------------------------------------------------- reshard / split / merge
@pytest.mark.parametrize("src_case", [("dp2mp2", False), ("mp4", True)], ids=["from-dp2mp2-plain", "from-mp4-balanced"])
@pytest.mark.parametrize("target", ["mp4", "dp2mp2", "mp3"])
@pytest.mark.parametrize("plain", [False, True], ids=["balanced", "plain"])
def test_reshard_to_mindformers_loads_exactly(built, tmp_path, src_case, target, plain):
    from mindformers.checkpoint.fully_parallel import distribute_shards
    from mindformers.checkpoint.utils import _get_shard_size

    src = built(*src_case)
    dm = {"mp4": (4,), "dp2mp2": (2, 2), "mp3": (3,)}[target]
    strat = _strategy(src.full, dm)
    dst = tmp_path / "dst"
    rep = distckpt.reshard(str(src.root), str(dst), dst_strategy=strat, format="mindformers", plain=plain)
    assert rep["ranks"] == strat.world_size
    world = strat.world_size
    d = dst / mf.iteration_dir(ITERATION)  # SRC's iteration and common.json
    assert (dst / mf.TRACKER).read_bytes() == b"30"
    assert mf.parse_common((d / mf.COMMON).read_bytes()) == mf.MFCommon(step_num=ITERATION, global_step=ITERATION, **COMMON)
    _check_loads(dst, src.full, strat)
    md = mf.parse_metadata((d / mf.METADATA).read_bytes())
    files = sorted(p.name for p in d.glob("*.safetensors"))
    assert set(md.files) == set(files)
    for f in files:  # MindFormers' names, no prefix; MindFormers' model/opt split
        parts = mf.parse_file_name(f)
        assert parts is not None and parts.prefix is None
        with open(d / f, "rb") as fh:
            from distckpt.codecs.safetensors import read_safetensors_header

            entries, meta = read_safetensors_header(fh, size=(d / f).stat().st_size, name=f)
        assert meta == {"format": "ms"}
        assert all(mf.is_optimizer_state(e.name) == (parts.kind == "opt") for e in entries), f
        if plain:
            assert parts.file_count == world
    by_kind: dict[str, dict] = {k: {} for k in mf.KINDS}
    for t in md.tensors:
        assert t.layout is not None  # real layouts, rank_list = the target's ranks
        for c in t.chunks:
            if plain:  # every holder wrote its copy into its own file
                assert sorted(s.storage_rank for s in c.storage) == sorted(c.storage[0].rank_group)
                assert all(mf.parse_file_name(s.file_name).file_index == s.storage_rank for s in c.storage)
            else:
                (s,) = c.storage
                kind = "opt" if mf.is_optimizer_state(t.name) else "model"
                by_kind[kind][mf.shard_id(t.name, c.index)] = (s, c, t)
    for kind, shards in by_kind.items():  # each shard once, where MindFormers' own rule puts it
        if not shards:
            continue
        theirs = distribute_shards(
            {sid: list(s.rank_group) for sid, (s, _, _) in shards.items()},
            {sid: _get_shard_size(c.box.sizes, mf.ms_dtype_name(t.dtype)) for sid, (_, c, t) in shards.items()},
            world,
        )
        assert {sid: s.storage_rank for sid, (s, _, _) in shards.items()} == {sid: r for sid, (r, _) in theirs.items()}
        writers = sorted({s.storage_rank for s, _, _ in shards.values()})
        for s, _, _ in shards.values():  # files numbered over the ranks that write, in rank order
            assert s.file_name == mf.file_name(kind, writers.index(s.storage_rank), len(writers))


def test_merge_to_mindformers_is_a_one_rank_checkpoint(built, tmp_path, capsys):
    src = built("dp2mp2", True)
    dst = tmp_path / "merged"
    assert main(["merge", str(src.root), str(dst), "--format", "mindformers", "--dst-iteration", "7", "-q"]) == 0
    d = dst / mf.iteration_dir(7)
    assert sorted(p.name for p in dst.iterdir()) == [mf.iteration_dir(7), mf.TRACKER]
    assert sorted(p.name for p in d.iterdir()) == [mf.COMMON, mf.file_name("model", 0, 1), mf.file_name("opt", 0, 1)]
    assert (dst / mf.TRACKER).read_bytes() == b"7"
    assert json.loads((d / mf.COMMON).read_text())["global_step"] == ITERATION  # SRC's own common.json
    _check_loads(dst, src.full, None)


def test_round_trip_mindformers_distckpt_mindformers(built, tmp_path):
    src = built("dp2mp2", False)
    mid = tmp_path / "mid"
    distckpt.reshard(str(src.root), str(mid), dst_strategy=_strategy(src.full, (4,)), format="distckpt")
    back = tmp_path / "back"
    strat = _strategy(src.full, (2, 2))
    distckpt.split(str(mid), str(back), dst_strategy=strat, format="mindformers", dst_iteration=31)
    assert mf.parse_common((back / mf.iteration_dir(31) / mf.COMMON).read_bytes()) == mfw.default_common(31)
    _check_loads(back, src.full, strat)


def test_a_target_mindformers_cannot_load_is_refused(built, tmp_path, capsys):
    src = built("mp4", True)
    strat = Strategy({"model.f32.col": ParamSpec("model.f32.col", TensorLayout((3,), ((0,), (-1,))))})  # 8 rows / 3
    from distckpt.strategy import save_strategy

    path = save_strategy(strat, tmp_path / "mp3.json")
    dst = tmp_path / "dst"
    code = main(["reshard", str(src.root), str(dst), "--dst-strategy", path, "--format", "mindformers"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "not divisible by its split count 3" in lines[0], err
    assert not dst.exists()


# --------------------------------------------------------------------------- layouts a MindSpore Layout cannot say
def test_pipeline_and_optimizer_shard_layouts_load_exactly(tmp_path):
    rng = np.random.default_rng(7)
    full = {
        "a": rng.standard_normal((8, 4)).astype(np.float32),
        "b": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16),
        "emb": rng.integers(-9, 9, (8, 4)).astype(np.int32),
        "adam_m.a": rng.standard_normal((8, 4)).astype(np.float32),
        "adam_v.b": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16),
        "global_step": np.array([3], np.int32),
        "learning_rate": np.array(0.5, np.float32),
    }
    src = tmp_path / "src"
    distckpt.save(full, src)
    strat = Strategy(
        {
            "a": ParamSpec("a", TensorLayout((2,), ((0,), (-1,))), stages=(0,)),
            "b": ParamSpec("b", TensorLayout((2,), ((-1,), (0,))), stages=(1,)),
            "emb": ParamSpec("emb", TensorLayout((2,), ((0,), (-1,))), stages=(0, 1)),  # shared by two stages
            "adam_m.a": ParamSpec("adam_m.a", TensorLayout((2,), ((-1,), (-1,)), 1, 2), stages=(0,)),  # optimizer shard
            "adam_v.b": ParamSpec("adam_v.b", TensorLayout((2,), ((-1,), (0,))), stages=(1,)),
        },
        num_stages=2,
    )
    for plain in (False, True):
        dst = tmp_path / f"dst-{plain}"
        distckpt.reshard(str(src), str(dst), dst_strategy=strat, format="mindformers", plain=plain)
        _check_loads(dst, full, strat)
        md = mf.parse_metadata((dst / mf.iteration_dir(0) / mf.METADATA).read_bytes()).by_name
        assert md["a"].mf_layout.rank_list == (0, 1) and md["b"].mf_layout.rank_list == (2, 3)
        assert md["adam_m.a"].mf_layout.tensor_map == (0, -1)  # the optimizer shard as dim 0 over the device axis
        assert md["emb"].mf_layout.alias_name == ("d0",) and md["emb"].mf_layout.rank_list == (0, 1)  # a grid
        assert md["global_step"].mf_layout.rank_list == (0, 1, 2, 3)  # replicated everywhere
        assert mf.parse_common((dst / mf.iteration_dir(0) / mf.COMMON).read_bytes()) == mfw.default_common(0)


def test_partial_axis_optimizer_shard_is_written_as_a_grid(tmp_path):
    full = {"w": np.arange(16, dtype=np.float32).reshape(8, 2)}
    src = tmp_path / "src"
    distckpt.save(full, src)
    strat = Strategy({"w": ParamSpec("w", TensorLayout((4, 1), ((-1,), (-1,)), opt_shard_step=1, opt_shard_size=2))})
    dst = tmp_path / "dst"
    distckpt.reshard(str(src), str(dst), dst_strategy=strat, format="mindformers")
    _check_loads(dst, full, strat)
    (t,) = mf.parse_metadata((dst / mf.iteration_dir(0) / mf.METADATA).read_bytes()).tensors
    assert t.axis_fragmentations == (2, 1) and t.mf_layout.rank_list == (0, 1)


def test_values_become_scalars_and_strings_survive(tmp_path):
    src = tmp_path / "src"
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    distckpt.save({"w": w, "step": 5, "lr": 0.25, "flag": True, "note": "hello"}, src)
    dst = tmp_path / "dst"
    distckpt.merge(str(src), str(dst), format="mindformers", dst_iteration=12)
    assert mf.parse_common((dst / mf.iteration_dir(12) / mf.COMMON).read_bytes()) == mfw.default_common(12)
    got = distckpt.load(str(dst))
    assert got["note"] == "hello" and _same(got["w"], w)
    assert _same(got["step"], np.array(5, np.int64)) and _same(got["lr"], np.array(0.25, np.float64))
    assert _same(got["flag"], np.array(True))
    merged = mf_load_standalone(dst, {"w": ((2, 3), "float32"), "step": ((), "int64"), "lr": ((), "float64")})
    assert _same(merged["step"], np.array(5, np.int64)) and _same(merged["w"], w)


# --------------------------------------------------------------------------- the distributed save, one process
def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "model.w": rng.standard_normal((8, 6)).astype(np.float32),
        "model.b": rng.standard_normal((6,)).astype(ml_dtypes.bfloat16),
        "model.n": rng.integers(-100, 100, (4, 2)).astype(np.int32),
        "adam_m.model.w": rng.standard_normal((8, 6)).astype(np.float32),
        "global_step": np.array([step], np.int32),
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_manager_saves_what_mindformers_resumes(tmp_path, async_save):
    root = tmp_path / "run"
    mgr = CheckpointManager(root, layout="mindformers", max_to_keep=2, async_save=async_save)
    for step in (1, 2, 3, 4):
        mgr.save(step, _state(step))
    mgr.wait()
    assert mgr.all_steps() == [3, 4] and mgr.latest_step() == 4
    assert sorted(p.name for p in root.iterdir()) == [mf.iteration_dir(3), mf.iteration_dir(4), mf.TRACKER]
    assert (root / mf.TRACKER).read_bytes() == b"4"
    d = root / mf.iteration_dir(4)
    assert sorted(p.name for p in d.iterdir()) == [mf.COMMON, mf.file_name("model", 0, 1), mf.file_name("opt", 0, 1)]
    assert mf.parse_common((d / mf.COMMON).read_bytes()) == mfw.default_common(4)
    merged = mf_load_standalone(root, _specs(_state(4)))  # MindFormers follows the tracker
    assert all(_same(merged[n], a) for n, a in _state(4).items())
    for step in (None, 3):
        got = mgr.restore(step)
        assert all(_same(got[n], a) for n, a in _state(step or 4).items())
    with pytest.raises(NotCommittedError, match="iteration_00000001"):
        mgr.restore(1)


def test_manager_restores_what_mindformers_saved(built):
    src = built("dp2mp2", True)
    mgr = CheckpointManager(src.root, layout="mindformers")
    assert mgr.all_steps() == [ITERATION] and mgr.latest_step() == ITERATION
    strat = _strategy(src.full, (4,))
    for r in range(4):
        got = mgr.restore(strategy=strat, rank=r)
        for name, arr in got.items():
            box = strat.box(name, r, src.full[name].shape) if name in strat else full_box(arr.shape)
            assert _same(arr, _slice(src.full[name], box)), (name, r)


def test_manager_options_mindformers_cannot_keep_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no metrics"):
        CheckpointManager(tmp_path, layout="mindformers", best_fn=lambda m: m["loss"])
    with pytest.raises(ConfigError, match="layout must be one of"):
        CheckpointManager(tmp_path, layout="megatron")
    with pytest.raises(ConfigError, match="no metrics"):
        CheckpointManager(tmp_path, layout="mindformers").save(1, _state(1), metrics={"loss": 1.0})


def test_a_failed_save_leaves_the_tracker_and_the_committed_iteration(tmp_path, monkeypatch):
    root = tmp_path / "run"
    mfw.save_distributed(_state(4), root, iteration=4)
    committed = {p.name: p.read_bytes() for p in (root / mf.iteration_dir(4)).iterdir()}
    # a preparation error: the strategy is for two ranks, this job has one
    two = Strategy({"model.w": ParamSpec("model.w", TensorLayout((2,), ((0,), (-1,))))})
    with pytest.raises(StrategyError, match="describes 2 ranks but this job has 1"):
        mfw.save_distributed(_state(5), root, iteration=5, strategy=two)
    # a write error half way: the files written are removed, and the iteration directory
    calls = []
    real = mfw.write_safetensors_file

    def flaky(store, fname, items, values, metadata=None):
        calls.append(fname)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", fname)
        real(store, fname, items, values, metadata)

    monkeypatch.setattr(mfw, "write_safetensors_file", flaky)
    with pytest.raises(OSError, match="No space"):
        mfw.save_distributed(_state(6), root, iteration=6)
    monkeypatch.undo()
    # saving over the committed iteration is refused before anything is touched
    with pytest.raises(ConfigError, match="is the committed iteration"):
        mfw.save_distributed(_state(9), root, iteration=4)
    assert sorted(p.name for p in root.iterdir()) == [mf.iteration_dir(4), mf.TRACKER]
    assert (root / mf.TRACKER).read_bytes() == b"4"
    assert {p.name: p.read_bytes() for p in (root / mf.iteration_dir(4)).iterdir()} == committed


def test_save_distributed_common_and_stale_directory(tmp_path):
    root = tmp_path / "run"
    (root / mf.iteration_dir(8)).mkdir(parents=True)
    (root / mf.iteration_dir(8) / "stale.safetensors").write_bytes(b"junk")  # debris of an earlier failed save
    common = {"epoch_num": 1, "step_num": 8, "global_step": 8, "loss_scale": 512.0, "global_batch_size": 4, "ckpt_status": 0}
    assert mfw.save_distributed(_state(8), root, iteration=8, common=common) == 8
    d = root / mf.iteration_dir(8)
    assert not (d / "stale.safetensors").exists()
    assert json.loads((d / mf.COMMON).read_text()) == common
    assert open_source(str(root)).info["inspect"]["common"] == common


# --------------------------------------------------------------------------- the distributed save under mpirun
SCRIPT = textwrap.dedent(
    '''
    """Run under mpirun: CheckpointManager(layout="mindformers") over DP2xMP2, and resumes in other layouts."""
    import sys
    import ml_dtypes
    import numpy as np
    from distckpt import CheckpointManager
    from distckpt.comm import get_comm
    from distckpt.errors import DistributedError
    from distckpt.layout import ParamSpec, Strategy, TensorLayout, full_box
    from distckpt.writers.mindformers import save_distributed

    LAYOUT = {  # name -> (shape, dtype, tensor map over a (2, 2) or (world,) mesh)
        "model.w": ((8, 6), "float32", ((0,), (-1,))),
        "model.g": ((4, 8), "bfloat16", ((1,), (0,))),
        "model.b": ((6,), "int32", ((-1,),)),
        "adam_m.model.w": ((8, 6), "float32", ((0,), (-1,))),
    }


    def full(step):
        rng = np.random.default_rng(step)
        out = {}
        for name, (shape, dt, _) in LAYOUT.items():
            a = rng.standard_normal(shape).astype(np.float32)
            out[name] = (a * 100).astype(np.int32) if dt == "int32" else a.astype(ml_dtypes.bfloat16 if dt == "bfloat16" else dt)
        out["global_step"] = np.array([step], np.int32)
        return out


    def strategy(world):
        """DP2xMP2 on 4 ranks; elsewhere the first dim that divides by the world size is split."""
        if world == 4:
            return Strategy({n: ParamSpec(n, TensorLayout((2, 2), m)) for n, (_, _, m) in LAYOUT.items()})
        params = {}
        for n, (shape, _, _) in LAYOUT.items():
            first = next((i for i, d in enumerate(shape) if d % world == 0), None)
            params[n] = ParamSpec(n, TensorLayout((world,), tuple((0,) if i == first else (-1,) for i in range(len(shape)))))
        return Strategy(params)


    def mine(state, strat, rank):
        out = {}
        for n, a in state.items():
            box = strat.box(n, rank, a.shape) if n in strat else full_box(a.shape)
            out[n] = np.ascontiguousarray(a[box.relative_to(full_box(a.shape))]) if a.ndim else a
        return out


    mode, root = sys.argv[1], sys.argv[2]
    comm = get_comm()
    rank, world = comm.rank, comm.size
    strat = strategy(world)
    if mode == "train":
        mgr = CheckpointManager(root, layout="mindformers", max_to_keep=2, async_save=True)
        for step in (1, 2, 3):
            mgr.save(step, mine(full(step), strat, rank), strategy=strat)
        mgr.close()
        print(f"RANK {rank} STEPS {mgr.all_steps()}", flush=True)
    elif mode == "plain":
        save_distributed(mine(full(7), strat, rank), root, iteration=7, strategy=strat, plain=True)
        print(f"RANK {rank} PLAIN OK", flush=True)
    elif mode == "fail":
        state = mine(full(9), strat, rank)
        if rank == 2:
            del state["model.w"]  # one rank lacks a tensor the strategy places on it
        try:
            CheckpointManager(root, layout="mindformers").save(9, state, strategy=strat)
        except DistributedError as exc:
            print(f"RANK {rank} FAILED {sorted(exc.failures)}", flush=True)
    else:
        mgr = CheckpointManager(root, layout="mindformers")
        step = mgr.latest_step()
        got = mgr.restore(strategy=strat, rank=rank)
        want = mine(full(step), strat, rank)
        ok = sorted(got) == sorted(want) and all(got[n].tobytes() == want[n].tobytes() for n in want)
        print(f"RANK {rank} RESUME {step} {'OK' if ok else 'BAD'}", flush=True)
    '''
)


def _mpirun(tmp_path: Path, n: int, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "mf_manager.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "DISTCKPT_COMM_TIMEOUT": "120"}
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(n), "--oversubscribe", sys.executable, str(script),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def _script_full(step: int) -> dict:
    ns: dict = {}
    exec(SCRIPT.split("mode, root = sys.argv")[0].replace("import sys", ""), ns)  # the script's own tensors
    return ns["full"](step)


def test_mpirun_manager_saves_what_mindformers_resumes_and_other_worlds_restore(tmp_path):
    root = tmp_path / "run"
    res = _mpirun(tmp_path, 4, "train", root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("STEPS [2, 3]") == 4, res.stdout
    assert sorted(p.name for p in root.iterdir()) == [mf.iteration_dir(2), mf.iteration_dir(3), mf.TRACKER]
    d = root / mf.iteration_dir(3)
    md = mf.parse_metadata((d / mf.METADATA).read_bytes())
    for t in md.tensors:  # balanced: each slice once, by one of its holders
        assert all(len(c.storage) == 1 and c.storage[0].storage_rank in c.storage[0].rank_group for c in t.chunks)
    full = _script_full(3)
    merged = mf_load_standalone(root, _specs(full))  # MindFormers resumes from the tracker's iteration
    assert all(_same(merged[n], a) for n, a in full.items())
    for n in (2, 3):
        res = _mpirun(tmp_path, n, "resume", root)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("RESUME 3 OK") == n, res.stdout
    res = _mpirun(tmp_path, 4, "fail", root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("FAILED [2]") == 4, res.stdout  # every rank raises the same error, naming rank 2
    assert (root / mf.TRACKER).read_bytes() == b"3" and not (root / mf.iteration_dir(9)).exists()


def test_mpirun_plain_save_lists_every_copy(tmp_path):
    root = tmp_path / "plain"
    res = _mpirun(tmp_path, 4, "plain", root)
    assert res.returncode == 0, res.stdout + res.stderr
    d = root / mf.iteration_dir(7)
    md = mf.parse_metadata((d / mf.METADATA).read_bytes())
    for t in md.tensors:
        for c in t.chunks:
            assert sorted(s.storage_rank for s in c.storage) == sorted(c.storage[0].rank_group)
    assert sorted(p.name for p in d.glob("*.safetensors")) == sorted(
        mf.file_name(k, r, 4) for k in mf.KINDS for r in range(4)
    )
    full = _script_full(7)
    merged = mf_load_standalone(root, _specs(full))
    assert all(_same(merged[n], a) for n, a in full.items())



def test_output_streams_one_box_at_a_time(tmp_path):
    """Peak memory of a reshard into MindFormers' format stays near two tensor boxes, not the checkpoint."""
    import tracemalloc

    rng = np.random.default_rng(0)
    full = {f"layer{i}.w": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(16)}  # 2 MiB each
    src = tmp_path / "src"
    distckpt.save(full, src)
    del full
    strat = Strategy({f"layer{i}.w": ParamSpec(f"layer{i}.w", TensorLayout((2,), ((-1,), (-1,)))) for i in range(16)})
    tracemalloc.start()
    try:
        distckpt.reshard(str(src), str(tmp_path / "dst"), dst_strategy=strat, format="mindformers", plain=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 32 MiB of tensors, 64 MiB written (plain: two copies); a box is read into one array (plus its read buffer)
    assert peak < 4 * (2 << 20), peak
