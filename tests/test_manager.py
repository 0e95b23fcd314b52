"""CheckpointManager: intervals, retention, best-N, async save, restore into another layout."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distckpt
from distckpt import CheckpointManager
from distckpt.errors import ConfigError, NotCommittedError
from distckpt.layout import ParamSpec, Strategy, TensorLayout


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": np.full(8, step, np.int32), "step": step}


def test_interval_and_latest(tmp_path):
    m = CheckpointManager(tmp_path, save_interval_steps=3)
    assert m.latest_step() is None
    saved = [s for s in range(1, 10) if m.save(s, _state(s))]
    assert saved == [3, 6, 9]
    assert m.all_steps() == [3, 6, 9]
    assert m.latest_step() == 9
    assert m.save(10, _state(10), force=True)
    assert m.latest_step() == 10
    np.testing.assert_array_equal(m.restore()["w"], _state(10)["w"])
    assert m.restore(6)["step"] == 6


def test_max_to_keep_and_keep_period(tmp_path):
    m = CheckpointManager(tmp_path, max_to_keep=2, keep_period=4)
    for s in range(1, 10):
        m.save(s, _state(s))
    assert m.all_steps() == [4, 8, 9]


def test_best_is_never_deleted(tmp_path):
    m = CheckpointManager(tmp_path, max_to_keep=1, best_fn=lambda x: x["loss"], best_mode="min")
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7}
    for s, loss in losses.items():
        m.save(s, _state(s), metrics={"loss": loss})
    steps = m.all_steps()
    assert 2 in steps  # best
    assert 4 in steps  # newest
    assert 1 not in steps and 3 not in steps


def test_uncommitted_step_is_invisible(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, _state(1))
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "data-x-00000.safetensors").write_bytes(b"junk")
    assert m.all_steps() == [1]
    with pytest.raises(NotCommittedError):
        m.restore(2)


def test_async_save_and_restore_other_layout(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True, max_to_keep=3)
    full = {s: _state(s) for s in range(1, 6)}
    for s in range(1, 6):
        st = full[s]
        assert m.save(s, st)
        st["w"][:] = -1  # training mutates its buffers right after save returns
    m.wait()
    assert m.all_steps() == [3, 4, 5]
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)))})
    for r in range(2):
        got = m.restore(strategy=strat, rank=r)
        np.testing.assert_array_equal(got["w"], _state(5)["w"][r * 8 : (r + 1) * 8])
        np.testing.assert_array_equal(got["b"], _state(5)["b"])


def test_async_error_surfaces_at_wait(tmp_path):
    m = CheckpointManager(tmp_path, async_save=True)
    m.save(1, {"w": np.zeros(4, np.float32)})
    m.wait()
    bad = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0,)))})  # needs 2 ranks, job has 1
    m.save(2, {"w": np.zeros(4, np.float32)}, strategy=bad)
    with pytest.raises(distckpt.DistCkptError):
        m.wait()
    assert m.all_steps() == [1]
    m.save(3, {"w": np.ones(4, np.float32)})
    m.close()
    assert m.latest_step() == 3


def test_bad_options():
    with pytest.raises(ConfigError, match="max_to_keep"):
        CheckpointManager("/tmp/x", max_to_keep=0)
    with pytest.raises(ConfigError, match="best_mode"):
        CheckpointManager("/tmp/x", best_mode="up")


def test_memory_bounded_over_50_async_saves(tmp_path):
    script = textwrap.dedent(
        f"""
        import resource, numpy as np
        from distckpt import CheckpointManager
        m = CheckpointManager({str(tmp_path)!r}, async_save=True, max_to_keep=2)
        w = np.ones((1024, 1024, 4), np.float32)  # 16 MiB
        marks = []
        for s in range(50):
            m.save(s, {{"w": w, "step": s}})
            if s in (5, 49):
                m.wait()
                marks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        m.close()
        print(marks[0], marks[1], m.all_steps())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, last, steps = out.stdout.split(maxsplit=2)
    # peak RSS after 50 saves grows by less than 64 MiB over the peak after 6 saves
    assert int(last) - int(first) < 64 * 1024, (first, last)
    assert steps.strip() == "[48, 49]"


def test_cli_list(tmp_path):
    m = CheckpointManager(tmp_path)
    for s in (1, 2):
        m.save(s, _state(s))
    out = subprocess.run([sys.executable, "-m", "distckpt", "list", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2"]
    out = subprocess.run([sys.executable, "-m", "distckpt", "list", str(tmp_path), "--json"], capture_output=True, text=True)
    assert '"latest": 2' in out.stdout



