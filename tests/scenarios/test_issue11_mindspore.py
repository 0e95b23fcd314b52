"""Issue 11, F (item 29): checkpoints saved with MindSpore's ``remove_redundancy`` are read exactly.

With ``remove_redundancy`` (``CheckpointConfig(remove_redundancy=True)``, MindFormers'
``remove_redundancy: True``) each replicated slice is written by one rank of its replica group only.
The rank files here are written the way MindSpore's ``ModelCheckpoint`` writes them: each rank
saves, with the real ``mindspore.save_checkpoint(..., choice_func=..., remove_redundancy=True)``,
the parameters MindSpore's own rank-to-save rule gives it --
``remove_param_redundancy(get_parameter_redundancy(strategy_file, initial_rank=0))`` -- plus every
parameter the strategy does not name.  Oracles:

* ``.safetensors``: MindSpore's ``unified_safetensors(..., merge_with_redundancy=False)`` merges the
  same rank files; distckpt's merge must equal it, bit for bit;
* ``.ckpt`` (which ``unified_safetensors`` does not read): the full tensors the slices were cut from
  (plain ``np.split``, :func:`synth.np_slice`).

Every command reads them: inspect, verify, merge, split, reshard, load into another layout; only a
slice that no replica holds is an error, naming the parameter and its replica group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from issue11_util import assert_error, assert_nothing_at, cli
from synth import _ms_tensor, make_strategy, np_slice, random_model, random_strategy, random_tensor, write_strategy

import distckpt
from distckpt.errors import StrategyError
from distckpt.layout import Strategy

SEEDS = [2, 4, 7]  # random layouts in which MindSpore's rule leaves some rank without a parameter


def _keep_map(strategy_file: Path) -> dict[int, set[str]]:
    """MindSpore's rank-to-save rule for a remove_redundancy save, from the strategy file."""
    from mindspore.train._utils import get_parameter_redundancy, remove_param_redundancy

    return {int(r): set(names) for r, names in
            remove_param_redundancy(get_parameter_redundancy(str(strategy_file), initial_rank=0)).items()}


def _case(tmp_path: Path, seed: int, *, dtypes=("float32", "float16", "int32", "bfloat16")):
    """A random DP x TP (x optimizer shard) strategy over 8 ranks, its file, and full tensors."""
    rng = np.random.default_rng(seed)
    model = random_model(rng, n_params=5, unit=24)
    for i, name in enumerate(model.dtypes):
        model.dtypes[name] = dtypes[i % len(dtypes)]
    strat = random_strategy(rng, model, 8, opt=True)
    full = {n: random_tensor(rng, s, model.dtypes[n]) for n, s in model.shapes.items()}
    sfile = write_strategy(strat, str(tmp_path / f"strategy_{seed}.ckpt"), writer="pb2")
    return strat, Path(sfile), full


def _write_ranks(root: Path, strat: Strategy, sfile: Path, full: dict, fmt: str) -> dict[int, set[str]]:
    """Each rank's file as ModelCheckpoint(remove_redundancy=True) writes it; returns what each rank saved."""
    import mindspore as ms

    keep = _keep_map(sfile)
    extras = {"global_step": np.array([12], np.int32)}
    saved = {}
    for r in range(strat.world_size):
        d = root / f"rank_{r}"
        d.mkdir(parents=True)
        items = [{"name": n, "data": _ms_tensor(np_slice(a, strat.params[n].layout, r))} for n, a in full.items()]
        items += [{"name": n, "data": _ms_tensor(a)} for n, a in extras.items()]
        mine = keep.get(r, set())

        def choice(name, mine=mine):  # ModelCheckpoint's own choice_func for a remove_redundancy save
            return name not in strat.params or name in mine

        ms.save_checkpoint(items, str(d / f"checkpoint_{r}.{fmt}"), format=fmt, choice_func=choice,
                           remove_redundancy=True)
        saved[r] = {n for n in list(full) + list(extras) if choice(n)}
    return saved


def test_replica_groups_are_mindspores(tmp_path):
    """distckpt's replica groups (who holds the same slice) are get_parameter_redundancy's, layout by layout."""
    from mindspore.train._utils import get_parameter_redundancy

    for seed in range(12):
        strat, sfile, full = _case(tmp_path, seed)
        theirs = get_parameter_redundancy(str(sfile), initial_rank=0)
        for name, spec in strat.params.items():
            ours = sorted(tuple(sorted(np.asarray(ranks).tolist())) for _, ranks in
                          strat.replica_groups(name, full[name].shape))
            assert ours == sorted(tuple(sorted(g)) for g in theirs[name]), (seed, name, spec.layout)


@pytest.mark.parametrize("seed", SEEDS)
def test_ckpt_remove_redundancy_every_command(tmp_path, capsys, seed):
    strat, sfile, full = _case(tmp_path, seed)
    src = tmp_path / "native"
    saved = _write_ranks(src, strat, sfile, full, "ckpt")
    # the files really are de-duplicated: some rank lacks a parameter it holds a slice of
    assert any(set(strat.params) - saved[r] for r in saved), saved
    # merge: exactly the full tensors
    rc, _, err = cli(capsys, "merge", src, tmp_path / "m.ckpt", "--src-strategy", sfile, "-q")
    assert rc == 0, err
    got = distckpt.load(tmp_path / "m.ckpt")
    for n, a in full.items():
        assert got[n].dtype == a.dtype and got[n].tobytes() == a.tobytes(), n
    assert got["global_step"].tolist() == [12]
    # inspect and verify read it
    info = distckpt.inspect(src, src_strategy=sfile)
    assert {t["name"] for t in info["tensors"]} == set(full) | {"global_step"}
    assert distckpt.verify(src, src_strategy=sfile)["ok"]
    # load into each rank's own layout: what that rank held before de-duplication
    for r in (0, 5):
        mine = distckpt.load(src, src_strategy=sfile, strategy=sfile, rank=r)
        for n, a in full.items():
            assert mine[n].tobytes() == np_slice(a, strat.params[n].layout, r).tobytes(), (r, n)
    # split and reshard into another layout, then back to whole tensors
    tp2 = make_strategy({n: ((2,), (0,) + (-1,) * (len(s.shape) - 1)) for n, s in
                         ((n, a) for n, a in full.items())})
    write_strategy(tp2, str(tmp_path / "tp2.ckpt"))
    for verb in ("split", "reshard"):
        rc, _, err = cli(capsys, verb, src, tmp_path / verb, "--src-strategy", sfile, "--dst-strategy",
                         tmp_path / "tp2.ckpt", "--format", "ckpt", "-q")
        assert rc == 0, err
        back = distckpt.load(tmp_path / verb)
        for n, a in full.items():
            assert back[n].tobytes() == a.tobytes(), (verb, n)


@pytest.mark.parametrize("seed", SEEDS)
def test_safetensors_remove_redundancy_equals_unified_safetensors(tmp_path, capsys, monkeypatch, seed):
    import mindspore.parallel.transform_safetensors as ts
    from mindspore.parallel import unified_safetensors

    # unified_safetensors waits while the machine's memory is over half used (a throttle, not a
    # result); on a shared test machine that could be forever
    monkeypatch.setattr(ts.psutil, "virtual_memory", lambda: type("M", (), {"percent": 0.0})())
    strat, sfile, full = _case(tmp_path, seed, dtypes=("float32", "float16", "int32"))
    src = tmp_path / "native"
    saved = _write_ranks(src, strat, sfile, full, "safetensors")
    assert any(set(strat.params) - saved[r] for r in saved), saved
    unified_safetensors(str(src), str(sfile), str(tmp_path / "unified"), merge_with_redundancy=False)
    import mindspore as ms

    theirs = {}
    for part in sorted((tmp_path / "unified").glob("*.safetensors")):
        theirs.update({k: v.asnumpy() for k, v in ms.load_checkpoint(str(part), format="safetensors").items()})
    assert set(theirs) == set(full) | {"global_step"}
    rc, _, err = cli(capsys, "merge", src, tmp_path / "m.safetensors", "--src-strategy", sfile, "-q")
    assert rc == 0, err
    ours = distckpt.load(tmp_path / "m.safetensors")
    for n, a in full.items():
        assert ours[n].dtype == theirs[n].dtype and ours[n].tobytes() == theirs[n].tobytes(), n
        assert ours[n].tobytes() == a.tobytes(), n
    assert ours["global_step"].tolist() == theirs["global_step"].tolist() == [12]


def test_a_slice_no_replica_holds_is_a_clear_error(tmp_path, capsys):
    """Only when every rank of a replica group lacks the slice: an error naming the parameter and the group."""
    strat = make_strategy({"w": ((2, 2), (0, -1)), "b": ((2, 2), (-1,))})  # DP2 x TP2: w's replicas are {0, 2}, {1, 3}
    sfile = write_strategy(strat, str(tmp_path / "s.ckpt"), writer="pb2")
    rng = np.random.default_rng(0)
    full = {"w": random_tensor(rng, (8, 4), "float32"), "b": random_tensor(rng, (4,), "float32")}
    import mindspore as ms

    holders = {"w": {0, 3}, "b": {1}}  # w's slice 0 on rank 0, slice 1 on rank 3; b on rank 1 only
    for r in range(4):
        (tmp_path / "ok" / f"rank_{r}").mkdir(parents=True)
        items = [{"name": n, "data": _ms_tensor(np_slice(a, strat.params[n].layout, r))}
                 for n, a in full.items() if r in holders[n]]
        items.append({"name": "global_step", "data": ms.Tensor(np.array([1], np.int32))})
        ms.save_checkpoint(items, str(tmp_path / "ok" / f"rank_{r}" / f"checkpoint_{r}.ckpt"))
    got = distckpt.load(tmp_path / "ok", src_strategy=sfile)
    assert got["w"].tobytes() == full["w"].tobytes() and got["b"].tobytes() == full["b"].tobytes()
    # now drop w's second slice from rank 3 too: neither rank 1 nor rank 3 holds it
    os.rename(tmp_path / "ok", tmp_path / "bad")
    ms.save_checkpoint([{"name": "global_step", "data": ms.Tensor(np.array([1], np.int32))}],
                       str(tmp_path / "bad" / "rank_3" / "checkpoint_3.ckpt"))
    line = assert_error(cli(capsys, "merge", tmp_path / "bad", tmp_path / "m.ckpt", "--src-strategy", sfile))
    assert "'w'" in line and "rank_1, rank_3" in line and "offsets [4, 0]" in line
    assert_nothing_at(tmp_path / "m.ckpt")
    with pytest.raises(StrategyError, match="no rank of its replica group"):
        distckpt.load(tmp_path / "bad", src_strategy=sfile)


def test_mindspore_metadata_of_a_remove_redundancy_file(tmp_path):
    """The real save_checkpoint(..., remove_redundancy=True) marks its .safetensors files; distckpt reads them."""
    import mindspore as ms

    f = tmp_path / "r.safetensors"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones((2, 2), np.float32))}], str(f), format="safetensors",
                       remove_redundancy=True)
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        meta = json.loads(fh.read(n)).get("__metadata__", {})
    assert meta.get("remove_redundancy") == "True"
    assert distckpt.load(f)["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
