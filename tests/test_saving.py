"""SaveJob, one rank's part in one save, step by step: prepare keeps errors, stage copies only what
the rank writes, run writes through a pluggable writer, commits, or removes what it wrote.

Oracles: ``distckpt.load`` / ``distckpt.verify`` of what was committed, and the directory listing.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt import naming
from distckpt.errors import StrategyError, UsageError
from distckpt.execute import write_chunk_file
from distckpt.saving import SaveJob, describe_error


def _strat() -> distckpt.Strategy:
    # w split in two by rows over 2 ranks; r replicated on both
    return distckpt.Strategy({
        "w": distckpt.ParamSpec("w", distckpt.TensorLayout((2,), (0, -1))),
        "r": distckpt.ParamSpec("r", distckpt.TensorLayout((2,), (-1,))),
    })


def _full() -> dict:
    rng = np.random.default_rng(3)
    bf = rng.integers(0, 1 << 16, size=(8, 3), dtype=np.uint16).view(ml_dtypes.bfloat16)
    return {"w": bf, "r": rng.standard_normal(5).astype(np.float32)}


def _rank_state(full: dict, r: int) -> dict:
    return {"w": full["w"][4 * r : 4 * r + 4].copy(), "r": full["r"].copy(), "step": 7}


def test_prepare_keeps_errors_instead_of_raising(tmp_path):
    job = SaveJob({"w": np.ones((4, 3), np.float32)}, tmp_path / "a", strategy=_strat(), rank=2)
    assert isinstance(job.error, StrategyError) and "outside the world of 2" in str(job.error)
    job = SaveJob({"w": np.ones(3, np.float32)}, tmp_path / "b", block_size=1000)
    assert isinstance(job.error, UsageError) and "power of two" in str(job.error)
    job = SaveJob({"r": np.ones(5, np.float32)}, tmp_path / "c", strategy=_strat(), rank=0)
    assert isinstance(job.error, StrategyError) and "'w'" in str(job.error)  # the strategy places w on rank 0
    with pytest.raises(StrategyError, match="outside the world"):
        SaveJob({"w": np.ones((4, 3), np.float32)}, tmp_path / "a", strategy=_strat(), rank=2).run()
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")  # nothing written for a failed job


def test_stage_copies_only_the_rank_s_pieces_and_decouples_them(tmp_path):
    full = _full()
    jobs = [SaveJob(_rank_state(full, r), tmp_path / "ck", strategy=_strat(), rank=r) for r in (0, 1)]
    assert all(j.error is None for j in jobs)
    # each rank writes its half of w; the replicated r is written by exactly one rank
    assert sorted(it.name for j in jobs for it in j.items) == ["r", "w", "w"]
    assert sum(j.nbytes for j in jobs) == full["w"].nbytes + full["r"].nbytes
    got = []

    def allocate(n: int) -> memoryview:
        got.append(n)
        return memoryview(bytearray(n))

    for j in jobs:
        j.stage(allocate)
        for p in j.pieces:
            assert not np.shares_memory(p, j.arrays["w"]) and not np.shares_memory(p, j.arrays["r"])
        j.arrays["w"][...] = 0  # training goes on changing its arrays: the staged copy is what is saved
    assert got == [j.nbytes for j in jobs]
    for j in jobs:
        j.run()
    distckpt.finalize(tmp_path / "ck")
    loaded = distckpt.load(tmp_path / "ck")
    assert loaded["w"].dtype == full["w"].dtype and loaded["w"].tobytes() == full["w"].tobytes()
    assert np.array_equal(loaded["r"], full["r"]) and loaded["step"] == 7
    assert distckpt.verify(tmp_path / "ck")["ok"]


def test_run_uses_the_writer_it_is_given(tmp_path):
    calls = []

    def writer(store, fname, pending, **kw):
        calls.append((fname, sorted(p.name for p in pending), kw["rank"], kw["checksums"]))
        return write_chunk_file(store, fname, pending, **kw)

    state = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "lr": 1e-300}
    save_id = SaveJob(state, tmp_path / "ck", checksums=False).run(writer)
    assert calls == [(naming.data_file(save_id, 0), ["a"], 0, False)]
    got = distckpt.load(tmp_path / "ck")
    assert np.array_equal(got["a"], state["a"]) and got["lr"] == 1e-300


def test_a_failing_writer_leaves_nothing_and_raises_its_error(tmp_path):
    def writer(store, fname, pending, **kw):
        write_chunk_file(store, fname, pending, **kw)  # the file exists, then the writer fails
        raise OSError(28, "No space left on device")

    dst = tmp_path / "ck"
    with pytest.raises(OSError, match="No space left"):
        SaveJob({"a": np.ones(4, np.float32)}, dst).run(writer)
    assert not [n for n in os.listdir(dst) if naming.is_data_file(n) or n == naming.INDEX_NAME]
    assert not [n for n in os.listdir(dst) if n.startswith(".distckpt-save-")]  # the marker went too


def test_describe_error_words():
    assert describe_error(None) is None
    assert describe_error(StrategyError("bad layout")) == "bad layout"
    assert describe_error(ValueError("x")) == "ValueError: x"
