"""Run by tests/test_comm.py via ``launch/mpirun.sh --ms-scheduler``: MindSpore's collectives under mpirun."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import mindspore as ms  # noqa: E402

ms.set_context(device_target="CPU")
from mindspore.communication import init  # noqa: E402

init()
from distckpt.comm import MindSporeComm, get_comm  # noqa: E402

mpi = get_comm()
c = MindSporeComm()
out = {
    "auto": type(mpi).__name__,
    "rank": c.rank,
    "size": c.size,
    "gather": c.allgather({"r": c.rank, "pad": "x" * c.rank}, "g"),
    "bcast": c.broadcast("from 1" if c.rank == 1 else None, root=1, name="b"),
}
c.barrier("end")
print("RESULT " + json.dumps(out, sort_keys=True), flush=True)
