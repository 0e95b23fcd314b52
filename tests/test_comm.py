"""Communicators and launch/mpirun.sh.

Single-process tests run everywhere: SingleComm, and ThreadComm (thread-ranks,
up to 64) for every primitive, failure path and the scaling properties.  The MPI
tests run real ``mpirun -n 4 --oversubscribe`` (4 ranks on 2 cores is the point)
through subprocess with a timeout well below pytest's, parse each rank's
``RANK r KEY json`` lines, and are skipped when mpirun or mpi4py is missing.
The exit-status tests run every rank under ``comm_exitwrap.py``, which records
the status each process really ended with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from distckpt import comm as comm_mod
from distckpt.comm import (
    Communicator,
    MPIComm,
    SingleComm,
    comm_timeout,
    format_ranks,
    get_comm,
    reset_comm,
)
from distckpt.errors import ConfigError, DistributedError
from distckpt.testing import run_ranks

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "mpi_scripts"
LAUNCH = ROOT / "launch" / "mpirun.sh"
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun") if (Path(PY).parent / "mpirun").exists() else shutil.which("mpirun")
HAVE_MPI = MPIRUN is not None and importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpirun or mpi4py not installed (pip install 'distckpt[mpi]')")
LIMIT = 120  # seconds per mpirun job: generous for a loaded 2-core machine, far below pytest's timeout


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "DISTCKPT_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def mpirun(mode: str, n: int = 4, **env: str) -> tuple[subprocess.CompletedProcess, dict[int, dict[str, object]], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [MPIRUN, "-n", str(n), "--oversubscribe", PY, str(SCRIPTS / "comm_ops.py"), mode],
        capture_output=True, text=True, timeout=LIMIT, env=_env(**env), cwd=ROOT,
    )
    return proc, parse(proc.stdout), time.monotonic() - t0


def parse(stdout: str) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for line in stdout.splitlines():
        if line.startswith("RANK "):
            _, rank, key, value = line.split(" ", 3)
            out.setdefault(int(rank), {})[key] = json.loads(value)
    return out


# ----------------------------------------------------------------------------------------
# single process


def test_single_comm_collectives_are_identity_through_json():
    c = SingleComm()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    c.barrier("b")
    assert c.allgather({"a": (1, 2), 3: "x"}, "g") == [{"a": [1, 2], "3": "x"}]
    assert c.broadcast([1, "two"], name="bc") == [1, "two"]
    assert c.run("work", lambda: 41 + 1) == 42
    assert c.run("work", lambda x, y=0: x + y, 1, y=2, gather=True) == [3]
    assert c.run_on_root("commit", lambda: {"ok": True}) == {"ok": True}
    assert c.gather_errors("g") == {}
    assert c.gather_errors("g", ValueError("bad")) == {0: "ValueError: bad"}


def test_single_comm_run_failure_names_rank_and_chains():
    c = SingleComm()

    def boom():
        raise ValueError("boom")

    with pytest.raises(DistributedError) as info:
        c.run("save", boom)
    assert str(info.value) == "save failed on rank(s) 0: rank 0: ValueError: boom"
    assert info.value.failures == {0: "ValueError: boom"}
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DistributedError, match="commit failed on rank"):
        c.run_on_root("commit", boom)


def test_non_json_values_raise_distributed_error():
    c = SingleComm()
    with pytest.raises(DistributedError, match="not JSON-serializable"):
        c.allgather({1, 2}, "g")
    with pytest.raises(DistributedError, match="not JSON-serializable"):
        c.broadcast(object(), name="b")
    with pytest.raises(DistributedError, match="plan failed on rank"):
        c.run("plan", lambda: object(), gather=True)
    with pytest.raises(DistributedError, match="root 1 is not a rank"):
        c.broadcast(1, root=1, name="b")


def test_long_messages_are_truncated():
    c = SingleComm()
    with pytest.raises(DistributedError) as info:
        c.run("x", lambda: (_ for _ in ()).throw(RuntimeError("y" * 10000)))
    assert len(info.value.failures[0]) <= comm_mod._MAX_MESSAGE
    assert info.value.failures[0].endswith("(truncated)")


def test_format_ranks():
    assert format_ranks([1, 3]) == "1, 3"
    assert format_ranks([3, 1, 2, 7, 8, 10, 11, 12]) == "1-3, 7, 8, 10-12"
    assert format_ranks([]) == ""


def test_comm_timeout(monkeypatch):
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    assert comm_timeout() == 600.0
    assert comm_timeout(5) == 5.0
    assert comm_timeout(0) is None
    monkeypatch.setenv("DISTCKPT_COMM_TIMEOUT", "12.5")
    assert comm_timeout() == 12.5
    monkeypatch.setenv("DISTCKPT_COMM_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="DISTCKPT_COMM_TIMEOUT"):
        comm_timeout()


def test_get_comm_selection(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "DISTCKPT_COMM"):
        monkeypatch.delenv(var, raising=False)
    reset_comm()
    try:
        mine = SingleComm()
        assert get_comm(mine) is mine
        auto = get_comm()
        assert isinstance(auto, SingleComm) and get_comm() is auto  # cached
        reset_comm()
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # mpirun -n 1: no need for mpi4py
        assert isinstance(get_comm(), SingleComm)
        reset_comm()
        monkeypatch.setenv("DISTCKPT_COMM", "bogus")
        with pytest.raises(DistributedError, match="single, mpi or mindspore"):
            get_comm()
        with pytest.raises(DistributedError, match="Communicator or an mpi4py communicator"):
            get_comm(42)
    finally:
        reset_comm()


def test_core_import_does_not_import_mpi4py_or_mindspore():
    code = (
        "import distckpt.comm, distckpt.jobconfig, sys; "
        "print('mpi4py' in sys.modules, 'mindspore' in sys.modules, 'distckpt.mindspore' in sys.modules); "
        "from distckpt.comm import MindSporeComm; "
        "print(MindSporeComm.__module__, 'mindspore' in sys.modules, MindSporeComm.can_exchange)"
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=LIMIT)
    assert out.stdout.split() == ["False", "False", "False", "distckpt.mindspore.comm", "False", "False"], out.stderr


def test_mindspore_comm_is_resolved_through_the_registry(monkeypatch):
    assert comm_mod.COMM_REGISTRY["mindspore"] == "distckpt.mindspore.comm:MindSporeComm"
    monkeypatch.setitem(comm_mod.COMM_REGISTRY, "mindspore", "distckpt.comm:SingleComm")
    monkeypatch.setenv("DISTCKPT_COMM", "mindspore")
    assert type(comm_mod._detect()) is SingleComm
    with pytest.raises(AttributeError):
        comm_mod.NoSuchComm  # noqa: B018


def test_single_comm_new_primitives():
    c = SingleComm()
    assert c.gather({"a": (1,)}, "g") == [{"a": [1]}]
    assert c.gather_bytes(b"\x00\xff", "gb") == [b"\x00\xff"]
    b16 = np.arange(7, dtype=np.float32).astype(ml_dtypes.bfloat16)
    assert c.gather_bytes(b16, "gb16") == [b16.tobytes()]
    assert c.run("w", lambda: 5, gather="root") == [5]
    c.agree("ok")
    with pytest.raises(DistributedError) as info:
        c.agree("plan", ValueError("disk full"))
    assert str(info.value) == "plan failed on rank(s) 0: rank 0: ValueError: disk full"
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(DistributedError, match="plan failed on rank"):
        c.agree("plan", "a message")
    with pytest.raises(ConfigError, match="gather must be"):
        c.run("w", lambda: 1, gather="all")
    # exchange with itself: pieces matched in posting order, cut consistently, zero-copy into the arrays
    a = np.arange(1000, dtype=np.float32).astype(ml_dtypes.bfloat16)
    got, empty = np.zeros_like(a), bytearray()
    c.exchange([(0, a), (0, b"")], [(0, got), (0, empty)], "self", chunk=333)
    assert got.view(np.uint16).tobytes() == a.view(np.uint16).tobytes()
    with pytest.raises(DistributedError, match="received 4 bytes from rank 0 into a 6-byte piece"):
        c.exchange([(0, b"abcd")], [(0, bytearray(6))], "short")
    with pytest.raises(DistributedError, match="not a rank of this 1-rank"):
        c.exchange([(1, b"x")], [], "bad.rank")
    with pytest.raises(DistributedError, match="read-only"):
        c.exchange([], [(0, b"immutable")], "bad.buf")
    with pytest.raises(DistributedError, match="non-contiguous"):
        c.exchange([(0, np.zeros((4, 4))[:, 1])], [], "bad.stride")
    with pytest.raises(ConfigError, match="chunk"):
        c.exchange([], [], "bad.chunk", chunk=0)
    assert c.stats["collectives"] > 0 and c.stats["bytes_sent"] > 0


# ----------------------------------------------------------------------------------------
# thread-ranks (ThreadComm): the same protocol as MPIComm, in one process


def outcomes(n, fn, timeout=60):
    """Each rank's result or exception, and how long the group took."""
    t0 = time.monotonic()
    got = run_ranks(n, fn, timeout=timeout, return_exceptions=True)
    return got, time.monotonic() - t0


def test_thread_comm_every_primitive_is_exact():
    def body(r, c):
        big = bytes(range(256)) * 20 + bytes([r]) * r  # above 4 KiB
        return {
            "gather": c.gather({"r": r}, "g", root=2),
            "gather_bytes": c.gather_bytes(big, "gb"),
            "allgather": c.allgather((r, str(r)), "ag"),
            "bcast_small": c.broadcast({"id": "x"} if r == 1 else None, root=1, name="b1"),
            "bcast_big": c.broadcast("y" * 3000 if r == 3 else None, root=3, name="b2"),
            "run": c.run("run", lambda: r * r, gather=True),
            "run_root": c.run("run.root", lambda: r + 1, gather="root"),
            "run_on_root": c.run_on_root("commit", lambda: f"by {r}"),
            "errors": c.gather_errors("ge", None),
            "agree": c.agree("ok"),
        }

    got = run_ranks(4, body, timeout=60)
    for r, g in enumerate(got):
        assert g["gather"] == ([{"r": i} for i in range(4)] if r == 2 else None)
        assert g["gather_bytes"] == ([bytes(range(256)) * 20 + bytes([i]) * i for i in range(4)] if r == 0 else None)
        assert g["allgather"] == [[i, str(i)] for i in range(4)]
        assert g["bcast_small"] == {"id": "x"} and g["bcast_big"] == "y" * 3000
        assert g["run"] == [0, 1, 4, 9]
        assert g["run_root"] == ([1, 2, 3, 4] if r == 0 else None)
        assert g["run_on_root"] == "by 0" and g["errors"] == {} and g["agree"] is None


def test_thread_comm_failures_raise_the_same_error_everywhere():
    def body(r, c):
        seen = []
        for name, call in (
            ("agree", lambda: c.agree("plan", ValueError(f"bad {r}") if r in (1, 3) else None)),
            ("run", lambda: c.run("save.write", lambda: 1 / (r - 2), gather=True)),
            ("root", lambda: c.run_on_root("commit", lambda: {}["missing"])),
        ):
            try:
                call()
            except DistributedError as exc:
                seen.append((name, str(exc), exc.failures))
        seen.append(c.gather_errors("ge", "oops" if r == 0 else None))
        return seen

    got = run_ranks(4, body, timeout=60)
    assert all(g == got[0] for g in got)
    (_, agree, agree_f), (_, run, run_f), (_, root, root_f), errors = got[0]
    assert agree == "plan failed on rank(s) 1, 3: rank 1: ValueError: bad 1; rank 3: ValueError: bad 3"
    assert agree_f == {1: "ValueError: bad 1", 3: "ValueError: bad 3"}
    assert run == "save.write failed on rank(s) 2: rank 2: ZeroDivisionError: division by zero" and list(run_f) == [2]
    assert root == "commit failed on rank(s) 0: rank 0: KeyError: 'missing'" and list(root_f) == [0]
    assert errors == {0: "oops"}


def test_thread_comm_timeout_names_the_missing_rank_everywhere():
    gave_up = threading.Semaphore(0)

    def body(r, c):
        c.barrier("warmup")
        if r == 2:  # reaches save.commit only after the others gave up on it
            for _ in range(3):
                gave_up.acquire(timeout=30)
            try:
                c.barrier("save.commit")
            except DistributedError as exc:
                return ("late", str(exc))
            return ("late", None)
        try:
            c.barrier("save.commit", timeout=1)
        except DistributedError as exc:
            result = ("error", str(exc), exc.failures)
        gave_up.release()
        try:
            c.barrier("later")
        except DistributedError as exc:
            result += (str(exc),)
        return result

    got = run_ranks(4, body, timeout=60)
    message = got[0][1]
    assert message.startswith("collective 'save.commit' (#1) timed out after 1 s: rank(s) 2 did not arrive")
    for r in (0, 1, 3):
        assert got[r][1] == message and list(got[r][2]) == [2]
        assert "unusable after an earlier failure" in got[r][3]
    assert got[2] == ("late", message)  # the late rank finds the verdict waiting


def test_thread_comm_rank_that_dies_fails_the_others_at_once():
    def body(r, c):
        if r == 1:
            raise RuntimeError("rank 1 dies before the first collective")
        c.barrier("save.describe")  # default-size timeout: only the departure can end this quickly

    got, took = outcomes(4, body, timeout=120)
    assert isinstance(got[1], RuntimeError)
    for r in (0, 2, 3):
        assert isinstance(got[r], DistributedError)
        assert "save.describe' (#0) cannot complete: rank(s) 1 did not arrive" in str(got[r])
        assert "raised RuntimeError: rank 1 dies" in str(got[r]) and list(got[r].failures) == [1]
    assert took < 60  # a hang detector, not a timing measurement


def test_thread_comm_rank_that_leaves_inside_an_exchange_fails_the_others():
    def body(r, c):
        if r == 1:
            c._t_exchange = lambda *a, **k: sys.exit(7)
        c.exchange([((r + 1) % 4, b"x" * 10)], [((r - 1) % 4, bytearray(10))], "load.share")

    got, took = outcomes(4, body, timeout=120)
    assert isinstance(got[1], SystemExit)
    for r in (0, 2, 3):
        assert isinstance(got[r], DistributedError), got[r]
        assert str(got[r]) == "collective 'load.share' (#0) cannot complete: rank(s) 1 did not arrive (rank 1 raised SystemExit: 7)"
        assert list(got[r].failures) == [1]
    assert took < 60


def test_thread_comm_mismatch_is_reported_everywhere():
    def body(r, c):
        try:
            c.barrier("phase.b" if r == 3 else "phase.a")
        except DistributedError as exc:
            return str(exc), exc.failures

    got = run_ranks(4, body, timeout=60)
    assert all(g == got[0] for g in got)
    message, failures = got[0]
    assert message.startswith("collective mismatch: rank 0 is in barrier 'phase.a' (#0) but rank 3 is in barrier 'phase.b'")
    assert failures == {3: "in barrier 'phase.b' (#0)"}


def payload(src: int, dst: int) -> bytes:
    n = 0 if (src, dst) == (1, 2) else 517 * (src + 1) * (dst + 1) + src
    return hashlib.shake_256(f"{src}->{dst}".encode()).digest(n) if n else b""


def test_thread_comm_exchange_is_exact():
    def body(r, c):
        n = c.size
        recv = {s: bytearray(len(payload(s, r))) for s in range(n)}
        c.exchange([(d, payload(r, d)) for d in range(n)], [(s, recv[s]) for s in range(n)], "all", chunk=1000)
        left, right = (r - 1) % n, (r + 1) % n
        mine = (np.arange(1000 + 37 * r, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16)
        theirs = np.zeros(1000 + 37 * left, dtype=ml_dtypes.bfloat16)
        c.exchange([(right, mine)], [(left, theirs)], "ring", chunk=333)
        want = (np.arange(1000 + 37 * left, dtype=np.float32) / 7).astype(ml_dtypes.bfloat16)
        return [bytes(recv[s]) == payload(s, r) for s in range(n)] + [theirs.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()]

    assert run_ranks(4, body, timeout=60) == [[True] * 5] * 4


def test_thread_comm_exchange_bad_arguments_fail_everywhere():
    def body(r, c):
        sends = [((r + 1) % 4, np.zeros((4, 4))[:, 1] if r == 2 else b"x")]
        try:
            c.exchange(sends, [((r - 1) % 4, bytearray(1))], "share")
        except DistributedError as exc:
            return str(exc), c.allgather(r, "after")

    got = run_ranks(4, body, timeout=60)
    assert all(g == got[0] for g in got)
    assert got[0][0].startswith("exchange 'share' failed on rank(s) 2: rank 2: ValueError: sends[0] buffer is a non-contiguous")
    assert got[0][1] == [0, 1, 2, 3]  # not a broken communicator


def test_64_thread_ranks_gather_and_agree():
    def body(r, c):
        g = c.gather({"rank": r, "chunks": list(range(r % 5))}, "save.reports")
        c.agree("save.plan")
        try:
            c.agree("save.write", OSError(f"disk full on {r}") if r in (5, 40, 41, 42) else None)
        except DistributedError as exc:
            return g, str(exc), sorted(exc.failures)

    got = run_ranks(64, body, timeout=120)
    assert got[0][0] == [{"rank": r, "chunks": list(range(r % 5))} for r in range(64)]
    assert all(g[0] is None for g in got[1:])
    assert all(g[1:] == got[0][1:] for g in got)
    assert got[0][1].startswith("save.write failed on rank(s) 5, 40-42: rank 5: OSError: disk full on 5; rank 40:")
    assert got[0][2] == [5, 40, 41, 42]


@pytest.mark.parametrize("nbytes", [100, 10_000])
def test_bytes_a_rank_sends_in_gather_and_agree_do_not_grow_with_world_size(nbytes):
    def sent(n):
        def body(r, c):
            before = c.stats["bytes_sent"]
            c.gather_bytes(bytes(nbytes), "reports")
            mid = c.stats["bytes_sent"]
            c.agree("plan")
            return mid - before, c.stats["bytes_sent"] - mid

        return run_ranks(n, body, timeout=60)[1]  # a non-root rank

    assert sent(2) == sent(8) == sent(32)
    assert sent(32)[0] <= nbytes + 400  # its own data, plus one fixed-size header


# ----------------------------------------------------------------------------------------
# MPI, one process


@needs_mpi
def test_mpicomm_in_one_process(monkeypatch):
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    from mpi4py import MPI

    c = get_comm(MPI.COMM_SELF)
    assert c.gather(1, "g") == [1] and c.gather_bytes(b"ab", "gb") == [b"ab"]
    got = bytearray(3)
    c.exchange([(0, b"xyz")], [(0, got)], "self", chunk=2)
    assert got == b"xyz"
    c.agree("ok")
    with pytest.raises(DistributedError, match="plan failed on rank"):
        c.agree("plan", "no")


@needs_mpi
def test_mpicomm_in_one_process_old_calls(monkeypatch):
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    from mpi4py import MPI

    c = get_comm(MPI.COMM_SELF)
    assert isinstance(c, MPIComm) and isinstance(c, Communicator) and (c.rank, c.size) == (0, 1)
    assert c.allgather({"a": 1}, "g") == [{"a": 1}]
    assert c.broadcast("x", name="b") == "x"
    c.barrier("b")
    with pytest.raises(DistributedError, match="step failed on rank"):
        c.run("step", lambda: 1 / 0)


@needs_mpi
def test_a_verdict_about_a_later_collective_waits_for_it(monkeypatch):
    """Root's verdict about collective #2 reaches a rank still inside #1 (descheduled; in a loaded full-suite run
    #1's completion and the verdict arrived in one Waitsome).  #1 is complete on every rank, so it must not
    fail there: #2 raises the verdict word for word, and later collectives say the communicator is unusable."""
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    from mpi4py import MPI

    c = MPIComm(MPI.COMM_SELF)
    c.barrier("warmup")  # #0
    verdict = "collective 'save.commit' (#2) cannot complete: rank(s) 1 did not arrive (rank 1 exited with status 5)"
    monkeypatch.setattr(c, "_recv_verdict", lambda nbytes: (verdict, {1: "rank 1 exited with status 5"}))
    current = comm_mod._Op(1, "barrier", "load.plan", 0, None, time.monotonic())
    c._seq = 2  # inside #1
    c._on_notice((comm_mod._FAIL, 0, 2, 99), 0, current, False)  # about #2: recorded, #1 goes on
    with pytest.raises(DistributedError) as got:
        c.barrier("save.commit")  # #2
    assert str(got.value) == verdict and got.value.failures == {1: "rank 1 exited with status 5"}
    with pytest.raises(DistributedError, match=r"unusable after an earlier failure \(collective 'save.commit' \(#2\)"):
        c.barrier("later")

    fresh = MPIComm(MPI.COMM_SELF)
    fresh.barrier("warmup")
    monkeypatch.setattr(fresh, "_recv_verdict", lambda nbytes: ("boom", {}))
    with pytest.raises(DistributedError, match="^boom$"):  # a verdict about the current collective: at once
        fresh._on_notice((comm_mod._FAIL, 0, 1, 4), 0, comm_mod._Op(1, "barrier", "x", 0, None, time.monotonic()), False)


# ----------------------------------------------------------------------------------------
# real mpirun, 4 ranks on 2 cores


@needs_mpi
def test_collectives_across_4_ranks():
    proc, ranks, _ = mpirun("collectives")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    expected = [{"rank": r, "sq": r * r, "t": [1, 2]} for r in range(4)]
    for r, got in ranks.items():
        assert got["TYPE"] == ["MPIComm", r, 4]
        assert got["ALLGATHER"] == expected
        assert got["UNEVEN"] == ["x" * (i * 3) for i in range(4)]
        assert got["BCAST0"] == {"plan": [1, 2, 3]}
        assert got["BCASTLAST"] == "from 3"
        assert got["RUN"] == [0, 10, 20, 30]
        assert got["ROOT"] == {"index": "written by 0"}
        msg, failures = got["BADJSON"]
        assert "rank(s) 1" in msg and list(failures) == ["1"]
        assert got["DONE"] is True


@needs_mpi
def test_failure_in_run_raises_same_error_on_every_rank():
    proc, ranks, _ = mpirun("run_fail")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    errors = {r: tuple(json.dumps(x, sort_keys=True) for x in got["ERROR"]) for r, got in ranks.items()}
    assert len(set(errors.values())) == 1, errors  # identical everywhere
    kind, message, failures = ranks[0]["ERROR"]
    assert kind == "DistributedError"
    assert message == "save failed on rank(s) 1, 3: rank 1: ValueError: boom on 1; rank 3: ValueError: boom on 3"
    assert failures == {"1": "ValueError: boom on 1", "3": "ValueError: boom on 3"}
    for got in ranks.values():  # the communicator stays usable after a failure inside run()
        assert got["AFTER"] == [0, 1, 2, 3]


@needs_mpi
def test_missing_rank_times_out_and_is_named():
    proc, ranks, elapsed = mpirun("timeout", T="3")
    assert elapsed < LIMIT - 30  # rank 2 sleeps 60 s; nobody waits for it
    # mpirun's teardown normally kills rank 2 in its sleep.  If prterun misses it (seen for a rank asleep in
    # user code in stop 18's CI), rank 2 wakes after 60 s and must meet the failure at once, not succeed.
    if 2 in ranks:
        assert "NOERROR" not in ranks[2] and "collective 'save.commit'" in ranks[2]["ERROR"][0], ranks[2]
        del ranks[2]
    assert sorted(ranks) == [0, 1, 3], proc.stdout + proc.stderr[-3000:]
    for r in (0, 1, 3):
        message, failures, waited = ranks[r]["ERROR"]
        assert "collective 'save.commit'" in message and "rank(s) 2 did not arrive" in message
        assert list(failures) == ["2"]
        assert waited < 30
        assert "unusable after an earlier failure" in ranks[r]["BROKEN"]


@needs_mpi
def test_uncaught_exception_aborts_the_job():
    proc, ranks, elapsed = mpirun("uncaught")
    assert proc.returncode != 0
    assert elapsed < 60
    assert "rank 1 dies outside run()" in proc.stderr
    assert "aborting the MPI job" in proc.stderr
    assert not any("NOERROR" in got for got in ranks.values())


@needs_mpi
def test_uncaught_exception_without_abort_hook_still_does_not_hang():
    proc, ranks, elapsed = mpirun("uncaught", DISTCKPT_NO_ABORT="1", DISTCKPT_COMM_TIMEOUT="4")
    assert proc.returncode != 0
    assert elapsed < LIMIT - 30
    assert "rank(s) 1 did not arrive" in proc.stderr


@needs_mpi
def test_collective_mismatch_is_reported_everywhere():
    proc, ranks, _ = mpirun("mismatch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    for got in ranks.values():
        assert "collective mismatch" in got["ERROR"] and "rank 3 is in barrier 'phase.b'" in got["ERROR"]


@needs_mpi
@pytest.mark.parametrize("wait", ["auto", "block", "poll"])
def test_new_primitives_across_4_ranks(wait):
    proc, ranks, _ = mpirun("primitives", DISTCKPT_COMM_WAIT=wait)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    big = bytes(range(256)) * 40
    for r, got in ranks.items():
        assert got["GATHER"] == ([{"r": i, "s": "x" * i} for i in range(4)] if r == 0 else None)
        assert got["GATHER1"] == ([0, 10, 20, 30] if r == 1 else None)
        want = [hashlib.sha256(big[: 4000 + 1000 * i]).hexdigest() for i in range(4)]
        assert got["GATHERBYTES"] == (want if r == 0 else None)
        assert got["GATHERNUMPY"] == ([[], [0], [0, 1], [0, 1, 2]] if r == 3 else None)
        assert got["AGREE"] is True
        assert got["RUNROOT"] == ([0, 2, 4, 6] if r == 0 else None)
        assert got["BCASTBIG"] == hashlib.sha256(("z" * 5000 + "end").encode()).hexdigest()
        assert got["ERRORS"] == {"3": "bad"}
        assert got["EXCHANGE"] == [True] * 4  # every pair, sizes 0 to ~10 KiB, 1000-byte pieces
        assert got["RING"] == [True, True]  # bf16 bit for bit, 333-byte pieces, two messages per pair in order
        assert got["SHORT"] == ["exchange 'exchange.short' failed on rank(s) 1: rank 1: received 8 bytes from rank 0 "
                                "into a 10-byte piece", [1]]
        assert got["AFTER"] == [0, 1, 2, 3]


@needs_mpi
def test_agree_failure_raises_same_error_on_every_rank():
    proc, ranks, _ = mpirun("agree_fail")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    for got in ranks.values():
        assert got["ERROR"] == ["DistributedError", "plan failed on rank(s) 2: rank 2: ValueError: no space on rank 2",
                                {"2": "ValueError: no space on rank 2"}]
        assert got["AFTER"] == [0, 1, 2, 3]


@needs_mpi
def test_failure_in_the_first_phase_reaches_every_rank_at_default_settings():
    proc, ranks, elapsed = mpirun("early_fail")  # DISTCKPT_COMM_TIMEOUT unset: 600 s
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    for got in ranks.values():
        message, failures, waited = got["ERROR"]
        assert message == "save.describe failed on rank(s) 1: rank 1: ValueError: state holds an object() on rank 1"
        assert list(failures) == ["1"]
        assert waited < 10
    assert elapsed < LIMIT - 30


@needs_mpi
def test_a_rank_leaving_inside_an_exchange_fails_the_others_at_once():
    proc, ranks, elapsed = mpirun("exchange_death")  # default deadline: only the departure can end this quickly
    assert sorted(ranks) == [0, 2, 3], proc.stdout + proc.stderr[-3000:]
    for got in ranks.values():
        message, failures, waited = got["ERROR"]
        assert message == "collective 'load.share' (#1) cannot complete: rank(s) 1 did not arrive (rank 1 exited with status 7)"
        assert list(failures) == ["1"]
        assert waited < 10
    assert proc.returncode != 0 and elapsed < LIMIT - 30


def run_exits(mode: str, out: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """Run comm_exit.py MODE on 4 ranks, each under comm_exitwrap.py; the intended and the real statuses."""
    out.mkdir()
    cmd = [MPIRUN, "-n", "4", "--oversubscribe", PY, str(SCRIPTS / "comm_exitwrap.py"), str(out), "--",
           PY, str(SCRIPTS / "comm_exit.py"), mode, str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT, env=_env(DISTCKPT_COMM_TIMEOUT="3"))
        deadline = time.monotonic() + 15  # the recorders write the real status as their rank ends
        while len(list(out.glob("status_*.json"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for pid_file in out.glob("pid_*"):  # never leave a rank behind, whatever happened
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
    intents = {int(f.stem.split("_")[1]): json.loads(f.read_text()) for f in out.glob("intent_*.json")}
    real = {int(f.stem.split("_")[1]): json.loads(f.read_text()) for f in out.glob("status_*.json")}
    return proc, intents, real


@needs_mpi
def test_every_rank_exits_with_its_own_status_after_a_timeout(tmp_path):
    # rank 1 sleeps; rank 0 raises SystemExit(4) at the top level, rank 2 returns normally, rank 3 sys.exit(3)
    proc, intents, real = run_exits("mixed", tmp_path / "out")
    assert sorted(real) == [0, 1, 2, 3], proc.stderr[-3000:]
    assert {0, 2, 3} <= set(intents) <= {0, 1, 2, 3}
    assert {r: intents[r]["code"] for r in (0, 2, 3)} == {0: 4, 2: 0, 3: 3}
    for r in (0, 2, 3):
        assert real[r]["rc"] == intents[r]["code"], (r, real, proc.stderr[-3000:])
        assert "collective 'save.commit' (#1) timed out after 3 s: rank(s) 1 did not arrive" in intents[r]["error"]
    # Rank 1 is in user code (asleep), not in distckpt: mpirun's teardown normally kills it about 0.25 s
    # after the first non-zero exit.  In two loaded full-suite runs OpenMPI 5's prterun (launching these
    # wrapped ranks) did not, and rank 1 ended on its own when its sleep was over: it met the broken
    # communicator at once (its peers' BYE) and exited 3.  Either way the job ends; what distckpt owes
    # is checked above and here: the ranks that left did so within seconds, each with its own status.
    if 1 in intents:  # rank 1 outlived mpirun's teardown: it must have met the error and left with 3
        assert real[1]["rc"] == 3 and intents[1]["code"] == 3, (real[1], intents[1])
        assert intents[1]["error"].startswith("collective 'save.commit'"), intents[1]
    else:  # killed by mpirun's teardown
        assert real[1]["rc"] < 0, real[1]
    first_error = min(i["t"] for i in intents.values())
    assert max(real[r]["t"] for r in (0, 2, 3)) - first_error < 10
    assert real[1]["rc"] == 3 or real[1]["t"] - first_error < 10


@needs_mpi
def test_every_rank_exits_with_its_own_status_when_one_leaves_early(tmp_path):
    # rank 1 exits with 5 before the collective; the others learn it at once and sys.exit(3)
    proc, intents, real = run_exits("exit5", tmp_path / "out")
    assert sorted(real) == [0, 1, 2, 3], proc.stderr[-3000:]
    assert {r: x["rc"] for r, x in real.items()} == {0: 3, 1: 5, 2: 3, 3: 3}
    assert {r: x["code"] for r, x in intents.items()} == {0: 3, 1: 5, 2: 3, 3: 3}
    for r in (0, 2, 3):
        assert intents[r]["error"] == ("collective 'save.commit' (#1) cannot complete: rank(s) 1 did not arrive "
                                       "(rank 1 exited with status 5)")
    assert max(x["t"] for x in real.values()) - intents[1]["t"] < 10


# ----------------------------------------------------------------------------------------
# launch/mpirun.sh


def launch(*args: str, env: dict | None = None, timeout: float = LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _env(), cwd=ROOT)


@needs_mpi
def test_launcher_exports_rank_env_and_writes_per_rank_logs(tmp_path):
    logs = tmp_path / "logs"
    proc = launch("-n", "4", "--device", "cpu", "--log-dir", str(logs), "--", PY, str(SCRIPTS / "env_dump.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ranks share the console, so one rank's line may land in the middle of another's
    seen = sorted(json.loads(m)["RANK_ID"] for m in re.findall(r"ENV (\{[^{}]*\})", proc.stdout))
    assert seen == ["0", "1", "2", "3"]  # console still shows every rank
    local = set()
    for r in range(4):
        text = (logs / f"rank_{r}.log").read_text()
        found = re.search(r"ENV (\{[^{}]*\})", text)  # stdout and stderr share the log file
        assert found, text
        env = json.loads(found.group(1))
        assert env["RANK_ID"] == str(r) and env["RANK_SIZE"] == "4"
        assert env["DEVICE_ID"] == env["LOCAL_RANK"]
        assert env["CUDA_VISIBLE_DEVICES"] is None and env["MS_ROLE"] is None
        assert f"stderr line from rank {r}" in text
        local.add(env["LOCAL_RANK"])
    assert local == {"0", "1", "2", "3"}


@needs_mpi
def test_launcher_exit_code_is_mpiruns():
    proc = launch("-n", "2", "--", PY, str(SCRIPTS / "env_dump.py"), env=_env(RC="3"))
    assert proc.returncode == 3, proc.stderr[-2000:]


@needs_mpi
def test_launcher_gpu_and_ascend_mapping(tmp_path):
    # No GPU/NPU here: the wrapper only sets variables, so a CPU process shows the mapping.
    proc = launch("-n", "2", "--device", "gpu", "--mpi-arg", "--oversubscribe", "--", PY, str(SCRIPTS / "env_dump.py"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    envs = sorted((json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ENV ")), key=lambda e: e["RANK_ID"])
    assert [(e["CUDA_VISIBLE_DEVICES"], e["DEVICE_ID"]) for e in sorted(envs, key=lambda e: e["LOCAL_RANK"])] == [("0", "0"), ("1", "0")]
    table = tmp_path / "rank_table.json"
    table.write_text("{}")
    proc = launch("-n", "2", "--device", "ascend", "--mpi-arg", "--oversubscribe", "--", PY, str(SCRIPTS / "env_dump.py"),
                  env=_env(RANK_TABLE_FILE=str(table)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    envs = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ENV ")]
    assert {e["RANK_TABLE_FILE"] for e in envs} == {str(table)}
    assert all(e["DEVICE_ID"] == e["LOCAL_RANK"] for e in envs)


def test_launcher_dry_run_flags(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = _env(MPIRUN=str(fake), DISTCKPT_SKIP_MPI4PY_CHECK="1")
    many = str((os.cpu_count() or 1) + 3)
    out = launch("-n", many, "--dry-run", "-x", "FOO", "--", "python", "train.py", env=env)
    assert out.returncode == 0, out.stderr
    assert f"-n {many}" in out.stdout and "--oversubscribe" in out.stdout and "-x FOO" in out.stdout
    assert "--rank-wrapper -- python train.py" in out.stdout
    if os.getuid() == 0:
        assert "--allow-run-as-root" in out.stdout
    out = launch("-n", many, "--hostfile", "/dev/null", "--dry-run", "--", "python", "x.py", env=env)
    assert "--hostfile /dev/null" in out.stdout and "--oversubscribe" not in out.stdout
    bad = launch("-n", "two", "--", "python", env=env)
    assert bad.returncode == 2 and "--np must be a positive integer" in bad.stderr
    bad = launch("--device", "tpu", "--", "python", env=env)
    assert bad.returncode == 2 and "ascend, gpu or cpu" in bad.stderr
    bad = launch("-n", "2", env=env)
    assert bad.returncode == 2 and "no command given" in bad.stderr


def test_launcher_reports_missing_mpirun(tmp_path):
    # PATH without any mpirun, and a python with no mpirun beside it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "basename", "id", "nproc", "cat", "sed", "mkdir"):
        src = shutil.which(tool)
        if src:
            (bindir / tool).symlink_to(src)
    env = {k: v for k, v in _env().items() if k not in ("MPIRUN", "VIRTUAL_ENV")}
    env["PATH"] = str(bindir)
    proc = subprocess.run(["/bin/bash", str(LAUNCH), "-n", "2", "--", "/nonexistent/python3", "x.py"],
                          capture_output=True, text=True, timeout=LIMIT, env=env, cwd=ROOT)
    assert proc.returncode == 127
    assert "mpirun not found" in proc.stderr
    assert "pip install 'distckpt[mpi]'" in proc.stderr


@needs_mpi
def test_launcher_reports_missing_mpi4py(tmp_path):
    pys = [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if Path(p).exists()]
    bare = next((p for p in pys if subprocess.run([p, "-c", "import mpi4py"], capture_output=True).returncode != 0), None)
    if bare is None:
        pytest.skip("no python without mpi4py on this machine")
    proc = launch("-n", "2", "--", bare, "x.py", env=_env(MPIRUN=MPIRUN))
    assert proc.returncode == 127
    assert "mpi4py is not installed" in proc.stderr and "pip install 'distckpt[mpi]'" in proc.stderr


@pytest.mark.slow
@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("mindspore") is None, reason="mindspore not installed")
def test_launcher_ms_scheduler_runs_mindspore_collectives(tmp_path):
    proc = launch("-n", "2", "--ms-scheduler", "--log-dir", str(tmp_path), "--", PY, str(SCRIPTS / "ms_comm.py"),
                  timeout=400)
    results = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1], proc.stdout[-2000:] + proc.stderr[-3000:]
    # Under heavy load (two CPU hogs on the 2 cores) MindSpore 2.9's CPU cluster sometimes segfaults in a
    # libmindspore_cluster.so thread while the worker process exits, after every collective has completed
    # and the results above were printed (about 1 run in 4 so; never seen idle).  That crash is MindSpore's
    # teardown, not the launcher's: accept exactly it, nothing else.
    ms_teardown_crash = (proc.returncode == 139 and "Segmentation fault" in proc.stderr
                         and "libmindspore_cluster.so" in proc.stderr)
    assert proc.returncode == 0 or ms_teardown_crash, proc.stdout[-2000:] + proc.stderr[-3000:]
    for r in results:
        assert r["auto"] == "MPIComm" and r["size"] == 2
        assert r["gather"] == [{"r": 0, "pad": ""}, {"r": 1, "pad": "x"}]
        assert r["bcast"] == "from 1"
    assert (tmp_path / "scheduler.log").exists()
