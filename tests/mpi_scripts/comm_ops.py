"""Run under mpirun by tests/test_comm.py: ``python comm_ops.py MODE``.

Every rank prints ``RANK <r> <KEY> <json>`` lines the test parses.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import hashlib  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from distckpt.comm import MPIComm, get_comm  # noqa: E402
from distckpt.errors import DistributedError  # noqa: E402


def out(comm, key, value):
    print(f"RANK {comm.rank} {key} {json.dumps(value, sort_keys=True)}", flush=True)


def collectives():
    comm = get_comm()
    out(comm, "TYPE", [type(comm).__name__, comm.rank, comm.size])
    comm.barrier("start")
    out(comm, "ALLGATHER", comm.allgather({"rank": comm.rank, "sq": comm.rank**2, "t": (1, 2)}, "gather.info"))
    # uneven payload sizes, including an empty string
    out(comm, "UNEVEN", comm.allgather("x" * (comm.rank * 3), "gather.uneven"))
    out(comm, "BCAST0", comm.broadcast({"plan": [1, 2, 3]} if comm.rank == 0 else None, name="bcast.plan"))
    root = comm.size - 1
    out(comm, "BCASTLAST", comm.broadcast(f"from {comm.rank}", root=root, name="bcast.last"))
    out(comm, "RUN", comm.run("work", lambda: comm.rank * 10, gather=True))
    out(comm, "ROOT", comm.run_on_root("commit", lambda: {"index": "written by " + str(comm.rank)}))
    try:
        comm.allgather({1, 2} if comm.rank == 1 else [1], "bad.json")
    except DistributedError as exc:
        out(comm, "BADJSON", [str(exc), exc.failures])
    comm.barrier("end")
    out(comm, "DONE", True)


def payload(src: int, dst: int) -> bytes:
    """What rank ``src`` sends rank ``dst`` in ``primitives`` (sizes from 0 to ~10 KiB, content from both ranks)."""
    n = 0 if (src, dst) == (1, 2) else 517 * (src + 1) * (dst + 1) + src
    return hashlib.shake_256(f"{src}->{dst}".encode()).digest(n) if n else b""


def bf16(rank: int) -> np.ndarray:
    return (np.arange(1000 + 37 * rank, dtype=np.float32) * (rank + 1) / 7).astype(ml_dtypes.bfloat16)


def primitives():
    """Every new primitive on 4 ranks; each rank prints what it got (the test checks exact values)."""
    comm = get_comm()
    r, n = comm.rank, comm.size
    out(comm, "GATHER", comm.gather({"r": r, "s": "x" * r}, "gather.small"))
    out(comm, "GATHER1", comm.gather(r * 10, "gather.root1", root=1))
    big = (bytes(range(256)) * 40)[: 4000 + 1000 * r]  # above 4 KiB on ranks 1-3: the two-round path
    got = comm.gather_bytes(big, "gather.bytes")
    out(comm, "GATHERBYTES", None if got is None else [hashlib.sha256(g).hexdigest() for g in got])
    got = comm.gather_bytes(np.arange(r, dtype=np.int16), "gather.numpy", root=3)
    out(comm, "GATHERNUMPY", None if got is None else [np.frombuffer(g, np.int16).tolist() for g in got])
    comm.agree("agree.ok")
    out(comm, "AGREE", True)
    out(comm, "RUNROOT", comm.run("run.root", lambda: r * 2, gather="root"))
    out(comm, "BCASTBIG", hashlib.sha256(comm.broadcast("z" * 5000 + "end" if r == 2 else None, root=2,
                                                        name="bcast.big").encode()).hexdigest())
    out(comm, "ERRORS", {str(k): v for k, v in comm.gather_errors("errors", "bad" if r == 3 else None).items()})
    # exchange: every rank to every rank (itself too; one empty message), each cut into 1000-byte pieces
    recv = {src: bytearray(len(payload(src, r))) for src in range(n)}
    comm.exchange([(dst, payload(r, dst)) for dst in range(n)], [(src, recv[src]) for src in range(n)],
                  "exchange.all", chunk=1000)
    out(comm, "EXCHANGE", [bytes(recv[src]) == payload(src, r) for src in range(n)])
    # a ring of bf16 arrays, 333-byte pieces (not a multiple of the element size), two messages per pair
    left, right = (r - 1) % n, (r + 1) % n
    first, second = np.zeros_like(bf16(left)), np.zeros_like(bf16(left))
    comm.exchange([(right, bf16(r)), (right, bf16(r)[::-1].copy())], [(left, first), (left, second)],
                  "exchange.ring", chunk=333)
    out(comm, "RING", [first.view(np.uint16).tobytes() == bf16(left).view(np.uint16).tobytes(),
                       second.view(np.uint16).tobytes() == bf16(left)[::-1].view(np.uint16).tobytes()])
    try:  # a message shorter than its receive buffer: the same error on every rank; the communicator survives
        short = bytearray(10)
        comm.exchange([(right, b"x" * (10 if r else 8))], [(left, short)], "exchange.short")
    except DistributedError as exc:
        out(comm, "SHORT", [str(exc), sorted(exc.failures)])
    out(comm, "AFTER", comm.allgather(r, "after"))


def agree_fail():
    comm = get_comm()
    try:
        comm.agree("plan", ValueError("no space on rank 2") if comm.rank == 2 else None)
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", [type(exc).__name__, str(exc), {str(k): v for k, v in exc.failures.items()}])
    out(comm, "AFTER", comm.allgather(comm.rank, "after"))


def early_fail():
    """A multi-phase protocol at default settings; rank 1 fails in the first phase, before any collective."""
    comm = get_comm()
    t0 = time.monotonic()

    def describe():
        if comm.rank == 1:
            raise ValueError("state holds an object() on rank 1")
        return {"rank": comm.rank}

    try:
        summary = comm.run("save.describe", describe)
        comm.broadcast("id-1", name="save.id")
        report = comm.run("save.write", lambda: summary, gather="root")
        comm.run_on_root("save.commit", lambda: len(report))
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", [str(exc), {str(k): v for k, v in exc.failures.items()}, time.monotonic() - t0])


def exchange_death():
    """Rank 1 leaves (sys.exit(7)) in the middle of an exchange, at default settings; the others must not wait."""
    comm = get_comm()
    comm.barrier("warmup", timeout=120)  # startup under load is not the fault under test
    if comm.rank == 1:
        comm._t_exchange = lambda *a, **k: sys.exit(7)
    t0 = time.monotonic()
    r = comm.rank
    try:
        comm.exchange([((r + 1) % 4, b"x" * 100)], [((r - 1) % 4, bytearray(100))], "load.share")
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", [str(exc), {str(k): v for k, v in exc.failures.items()}, time.monotonic() - t0])
        sys.exit(3)


def run_fail():
    comm = get_comm()

    def step():
        if comm.rank in (1, 3):
            raise ValueError(f"boom on {comm.rank}")
        return "fine"

    try:
        comm.run("save", step)
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", [type(exc).__name__, str(exc), {str(k): v for k, v in exc.failures.items()}])
    # the communicator is still usable after a failure inside run
    out(comm, "AFTER", comm.allgather(comm.rank, "after"))


def timeout():
    # rank 2 never reaches the barrier (sleeps far past the deadline)
    comm = MPIComm(timeout=float(os.environ.get("T", "3")))
    comm.barrier("warmup", timeout=120)  # startup under load is not the fault under test
    if comm.rank == 2:
        time.sleep(60)
    t0 = time.monotonic()
    try:
        comm.barrier("save.commit")
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", [str(exc), {str(k): v for k, v in exc.failures.items()}, time.monotonic() - t0])
    try:
        comm.barrier("later")
    except DistributedError as exc:
        out(comm, "BROKEN", str(exc))
    sys.stdout.flush()
    os._exit(0)  # rank 2 is still asleep; mpirun then tears it down


def uncaught():
    comm = get_comm()
    comm.barrier("warmup", timeout=120)  # startup under load is not the fault under test
    if comm.rank == 1:
        raise RuntimeError("rank 1 dies outside run()")
    comm.barrier("never completes")
    out(comm, "NOERROR", True)


def mismatch():
    comm = MPIComm(timeout=30)
    try:
        if comm.rank == 3:
            comm.barrier("phase.b")
        else:
            comm.barrier("phase.a")
        out(comm, "NOERROR", True)
    except DistributedError as exc:
        out(comm, "ERROR", str(exc))


if __name__ == "__main__":
    modes = {"collectives": collectives, "run_fail": run_fail, "timeout": timeout, "uncaught": uncaught,
             "mismatch": mismatch, "primitives": primitives, "agree_fail": agree_fail, "early_fail": early_fail,
             "exchange_death": exchange_death}
    modes[sys.argv[1]]()
