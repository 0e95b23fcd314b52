"""Issue 11, C (item 14): a rank that fails before (or between) the collectives never hangs the others.

Under real ``mpirun -n 4`` at the DEFAULT collective deadline (600 s; ``DISTCKPT_COMM_TIMEOUT``
is removed from the environment), rank 1 fails locally in every way the issue names: its state
holds ``object()``, its strategy file is missing, its storage cannot be opened, its model is not a
Cell.  Every rank must raise the same error naming rank 1, from a collective that completed (not
from a deadline: no message says "timed out"), long before the deadline -- the whole job runs
under a subprocess timeout well below 600 s.  Audited: ``save``, ``CheckpointManager.save`` (sync
and async), ``save_pretrained``; ``load``, ``load_pretrained`` and ``finalize`` have no collectives
at all (a rank's failure is raised on that rank only, and the others finish).

This file is also the job: ``python test_issue11_hang.py {core|pretrained} ROOT`` under mpirun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
TIMEOUT = 540  # seconds for a whole mpirun job (startup included): below the 600 s default deadline of one collective

CORE_CASES = ["save_state", "save_strategy", "save_storage", "manager", "manager_async", "load"]
PRETRAINED_CASES = ["save_pretrained", "load_pretrained"]


# ------------------------------------------------------------------ the job (each rank)
def _state(rank: int, rows: slice = slice(None)) -> dict:
    state = {"w": np.arange(64, dtype=np.float32).reshape(8, 8)[rows].copy(), "step": 1}
    if rank == 1:
        state["opt.moment"] = object()  # rank 1 fails while converting its state, before any collective
    return state


def _core(case: str, root: Path, rank: int) -> str:
    import distckpt

    if case == "save_state":
        distckpt.save(_state(rank), root / "save_state")
    elif case == "save_strategy":
        strat = root / ("missing.ckpt" if rank == 1 else "tp4.ckpt")
        distckpt.save({"w": np.ones((2, 8), np.float32)}, root / "save_strategy", strategy=strat)
    elif case == "save_storage":
        path = "nosuchproto://bucket/x" if rank == 1 else root / "save_storage"
        distckpt.save({"w": np.ones((2, 2), np.float32)}, path)
    elif case == "manager":
        distckpt.CheckpointManager(root / "run").save(1, _state(rank))
    elif case == "manager_async":
        mgr = distckpt.CheckpointManager(root / "run_async", async_save=True)
        mgr.save(1, _state(rank))
        mgr.wait()
    elif case == "load":
        got = distckpt.load(root / "ck", names=["nope"] if rank == 1 else ["w"])
        return f"loaded {sorted(got)}"
    else:
        raise AssertionError(case)
    return "saved"


def _pretrained(case: str, root: Path, rank: int) -> str:
    import mindspore as ms

    from distckpt.mindspore import load_pretrained, save_pretrained

    class Net(ms.nn.Cell):
        def __init__(self, extra: bool = False):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(np.arange(16, dtype=np.float32).reshape(4, 4)), name="w")
            if extra:
                self.v = ms.Parameter(ms.Tensor(np.zeros(2, np.float32)), name="v")

    if case == "save_pretrained":
        save_pretrained(object() if rank == 1 else Net(), root / "pretrained")
        return "saved"
    net = Net(extra=rank == 1)
    missing, unexpected = load_pretrained(net, root / "ck", strict=rank == 1)
    return f"loaded missing={missing}"


def _job(kind: str, root: Path) -> None:
    from distckpt.comm import get_comm
    from distckpt.errors import DistCkptError

    rank = get_comm().rank
    for case in CORE_CASES if kind == "core" else PRETRAINED_CASES:
        t0 = time.monotonic()
        try:
            what = (_core if kind == "core" else _pretrained)(case, root, rank)
            rec = {"ok": True, "what": what}
        except DistCkptError as exc:
            rec = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        rec.update(case=case, rank=rank, seconds=round(time.monotonic() - t0, 2))
        print("RESULT " + json.dumps(rec), flush=True)


# ------------------------------------------------------------------ the tests
def _mpirun(kind: str, root: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISTCKPT_COMM_TIMEOUT", "DISTCKPT_COMM")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    mpirun = str(Path(sys.executable).parent / "mpirun")
    cmd = [mpirun, "-n", "4", "--oversubscribe", sys.executable, str(HERE), kind, str(root)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:  # a hang: name the cases that never finished
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"mpirun {kind} still running after {TIMEOUT} s (a hang); finished:\n{out}") from None
    results: dict = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
            results.setdefault(rec["case"], {})[rec["rank"]] = rec
    return results, res.stdout + res.stderr


def _same_error_naming_rank_1(results: dict, case: str, log: str, *needles: str) -> str:
    recs = results.get(case, {})
    assert sorted(recs) == [0, 1, 2, 3], (case, log)
    assert not any(r["ok"] for r in recs.values()), (case, recs)
    messages = {r["error"] for r in recs.values()}
    assert len(messages) == 1, (case, messages)  # the same error on every rank
    msg = messages.pop()
    assert {r["type"] for r in recs.values()} == {"DistributedError"}, recs
    assert "rank 1" in msg and "timed out" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _prepare(root: Path) -> None:
    import distckpt
    from distckpt.layout import ParamSpec, Strategy, TensorLayout

    distckpt.save_strategy(Strategy({"w": ParamSpec("w", TensorLayout((4,), (0, -1)))}), root / "tp4.ckpt")
    distckpt.save({"w": np.arange(16, dtype=np.float32).reshape(4, 4), "step": 1}, root / "ck")


def test_a_rank_failing_locally_never_hangs_save_or_the_manager(tmp_path):
    from distckpt.index import INDEX_NAME

    _prepare(tmp_path)
    results, log = _mpirun("core", tmp_path)
    _same_error_naming_rank_1(results, "save_state", log, "opt.moment", "object")
    _same_error_naming_rank_1(results, "save_strategy", log, "missing.ckpt")
    _same_error_naming_rank_1(results, "save_storage", log, "nosuchproto")
    _same_error_naming_rank_1(results, "manager", log, "opt.moment")
    _same_error_naming_rank_1(results, "manager_async", log, "opt.moment")
    for d in ("save_state", "save_strategy", "save_storage", "run/1", "run_async/1"):
        assert not (tmp_path / d / INDEX_NAME).exists(), d  # nothing was committed
        if (tmp_path / d).exists():  # and every failed save removed what it wrote
            assert os.listdir(tmp_path / d) == [], (d, os.listdir(tmp_path / d))
    # load has no collectives: rank 1's error is its own, the others finish
    load = results["load"]
    assert sorted(load) == [0, 1, 2, 3], log
    assert not load[1]["ok"] and "nope" in load[1]["error"]
    assert all(load[r]["ok"] and load[r]["what"] == "loaded ['w']" for r in (0, 2, 3)), load


def test_a_rank_failing_locally_never_hangs_save_pretrained(tmp_path):
    from distckpt.index import INDEX_NAME

    _prepare(tmp_path)
    results, log = _mpirun("pretrained", tmp_path)
    _same_error_naming_rank_1(results, "save_pretrained", log)
    assert not (tmp_path / "pretrained" / INDEX_NAME).exists()
    load = results["load_pretrained"]
    assert sorted(load) == [0, 1, 2, 3], log
    assert not load[1]["ok"] and "['v']" in load[1]["error"], load[1]
    assert all(load[r]["ok"] for r in (0, 2, 3)), load


if __name__ == "__main__":
    _job(sys.argv[1], Path(sys.argv[2]))
