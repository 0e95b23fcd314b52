"""distckpt.asyncsave: asynchronous saves written by a separate process from shared memory."""

from __future__ import annotations

import os
import signal

import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt import CheckpointManager
from distckpt.asyncsave import _PREFIX, AsyncWriter, _sweep_dead_segments
from distckpt.saving import SaveJob


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bf = rng.integers(0, 1 << 16, size=(64, 33), dtype=np.uint16).view(ml_dtypes.bfloat16)
    return {"w": rng.standard_normal((128, 96)).astype(np.float32), "b": bf, "step": seed, "lr": 1e-300}


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_async_save_is_exact_and_written_by_another_process(tmp_path):
    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        state = _state(1)
        want = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
        assert mgr.save(1, state)
        state["w"][:] = -1  # training changes its arrays at once: the staged copy is what is saved
        state["b"][:] = 0
        mgr.wait()
        writer = mgr._async_writer
        assert writer is not None and writer._proc.pid != os.getpid() and writer._proc.is_alive()
        mgr.save(2, state)
        mgr.wait()
        assert mgr._async_writer is writer and writer._proc.is_alive()  # one writer process serves every save
        got = mgr.restore(1)
    for k, v in want.items():
        assert _same(got[k], v) if isinstance(v, np.ndarray) else got[k] == v, k
    assert distckpt.verify(tmp_path / "run" / "1")["ok"]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"{_PREFIX}{os.getpid()}_")]  # segments freed



def test_the_next_save_stages_into_the_last_segment_and_close_frees_it(tmp_path):
    """The spare segment: reused by a save of about the same size (no fresh pages to fault in), replaced
    for a much larger one, never shared by two saves' data, freed by close."""
    ours = lambda: sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{_PREFIX}{os.getpid()}_"))  # noqa: E731
    big = {"w": np.arange(3 << 20, dtype=np.float32).reshape(3, -1)}
    with CheckpointManager(tmp_path / "run", async_save=True, max_to_keep=5) as mgr:
        states = {1: _state(1), 2: _state(2)}
        mgr.save(1, states[1])
        mgr.wait()
        first = ours()
        assert len(first) == 1  # kept after the save, for the next one
        mgr.save(2, states[2])
        mgr.wait()
        assert ours() == first  # the same segment again
        mgr.save(3, big)  # 12 MiB: more than the spare holds -> a new segment, the old one freed
        mgr.wait()
        assert len(ours()) == 1 and ours() != first
        got = {s: mgr.restore(s) for s in (1, 2, 3)}
    assert not ours()
    for s, st in states.items():
        for k, v in st.items():
            assert _same(got[s][k], v) if isinstance(v, np.ndarray) else got[s][k] == v, (s, k)
    assert _same(got[3]["w"], big["w"])


def test_only_the_pieces_a_rank_writes_are_staged():
    strat = distckpt.Strategy({"w": distckpt.ParamSpec("w", distckpt.TensorLayout((2,), (0, -1)))})
    state = {"w": np.ones((2, 3), np.float32), "r": np.ones(1000, np.float32)}  # w split in two, r replicated
    jobs = [SaveJob(state, "memory://x/y", strategy=strat, rank=r) for r in (0, 1)]
    assert all(j.error is None for j in jobs)
    # each rank stages its own half of w; the replicated r is staged by exactly one of them
    assert sorted(sum(int(p.nbytes) for it, p in zip(j.items, j.pieces) if it.name == "w") for j in jobs) == [24, 24]
    assert sum(j.nbytes for j in jobs) == 2 * 24 + 4000


def test_over_the_staging_cap_saves_synchronously(tmp_path):
    with CheckpointManager(tmp_path / "run", async_save=True, staging_limit_bytes=1024) as mgr:
        mgr.save(1, _state(1))
        assert mgr._async_writer is None and mgr._thread is None  # no writer process, no background thread
        assert mgr.all_steps() == [1]


def test_killed_writer_fails_that_save_only(tmp_path):
    with CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        mgr.save(1, _state(1))
        mgr.wait()
        writer = mgr._async_writer
        real = AsyncWriter._ensure

        def dies_mid_job(self):
            real(self)
            os.kill(self._proc.pid, signal.SIGKILL)  # the writer process dies with the job in flight
            self._proc.join()

        AsyncWriter._ensure = dies_mid_job
        try:
            mgr.save(2, _state(2))
            with pytest.raises(distckpt.DistCkptError, match="writer process died"):
                mgr.wait()
        finally:
            AsyncWriter._ensure = real
        assert mgr.all_steps() == [1]  # step 2 never committed
        mgr.save(3, _state(3))  # a new writer process takes over
        mgr.wait()
        assert writer is not None and mgr._async_writer is writer
        assert mgr.all_steps() == [1, 3]
        got = mgr.restore(3)
    assert _same(got["w"], _state(3)["w"])
    left = tmp_path / "run" / "2"
    assert not left.exists() or os.listdir(left) == []  # the failed save removed its data file and marker


def test_segments_of_dead_processes_are_swept(tmp_path):
    d = tmp_path / "shm"
    d.mkdir()
    dead = 2 ** 22 + 12345  # above pid_max on this kernel: never alive
    (d / f"{_PREFIX}{dead}_abc").write_bytes(b"x")
    (d / f"{_PREFIX}{os.getpid()}_def").write_bytes(b"x")
    (d / "someone_else").write_bytes(b"x")
    _sweep_dead_segments(str(d))
    assert sorted(os.listdir(d)) == [f"{_PREFIX}{os.getpid()}_def", "someone_else"]
