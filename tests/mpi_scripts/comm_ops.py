"""Run under mpirun by tests/test_comm.py: ``python comm_ops.py MODE``.

Every rank prints ``RANK <r> <KEY> <json>`` lines the test parses.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

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
    comm.barrier("warmup")
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
    comm.barrier("warmup")
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
    {"collectives": collectives, "run_fail": run_fail, "timeout": timeout, "uncaught": uncaught, "mismatch": mismatch}[
        sys.argv[1]
    ]()
