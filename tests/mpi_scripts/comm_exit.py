"""Exit statuses after a failure, under mpirun: ``python comm_exit.py MODE OUTDIR`` (run by tests/test_comm.py).

Rank 1 never reaches the collective ``save.commit`` in time: in ``sleep`` it sleeps far
past the deadline (in ``mixed`` 20 s, then meets the broken communicator and exits 3), in ``exit5`` it exits at once with status 5.  The other ranks
catch the DistributedError and leave with their own status: ``sys.exit(3)``, or
in ``mixed`` rank 0 ``raise SystemExit(4)`` from the top level, rank 2 returns
normally (0) and rank 3 ``sys.exit(3)``.  Before leaving, each rank writes
``intent_<rank>.json`` = {"code", "t", "error"} so the test can compare it with
the status the process really ended with (see comm_exitwrap.py).  In ``clean``
no rank fails and every rank returns normally.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from distckpt.comm import MPIComm  # noqa: E402
from distckpt.errors import DistributedError  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
comm = MPIComm()
rank = comm.rank


def intent(code, error=""):
    with open(os.path.join(OUT, f"intent_{rank}.json"), "w") as f:
        json.dump({"code": code, "t": time.time(), "error": error}, f)


def main():
    comm.barrier("warmup", timeout=120)  # startup under load is not the fault under test
    if rank == 1 and MODE in ("sleep", "mixed"):
        time.sleep(120 if MODE == "sleep" else 20)  # mixed: over once the test's checks are due
    if rank == 1 and MODE == "exit5":
        intent(5)
        sys.exit(5)
    try:
        comm.barrier("save.commit")
    except DistributedError as exc:
        code = {0: 4, 2: 0}.get(rank, 3) if MODE == "mixed" else 3
        intent(code, str(exc))
        return code
    intent(0)
    return 0


code = main()
if MODE == "mixed" and rank == 0:
    raise SystemExit(code)
if code:
    sys.exit(code)
