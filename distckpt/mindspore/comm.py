"""``MindSporeComm``: distckpt's collectives over ``mindspore.communication`` (msrun jobs).

The core never imports this module statically: :func:`distckpt.comm.get_comm`
loads it through ``distckpt.comm.COMM_REGISTRY["mindspore"]`` only when
``DISTCKPT_COMM=mindspore`` or ``mindspore.communication`` is initialised, and
``from distckpt.comm import MindSporeComm`` still works (a lazy module attribute).
Importing this module does not import MindSpore either; constructing the class does.
"""

from __future__ import annotations

import logging
from typing import Any

from ..comm import Communicator, _mindspore_initialised
from ..errors import DistributedError, require

__all__ = ["MindSporeComm"]

log = logging.getLogger("distckpt.comm")


class MindSporeComm(Communicator):
    """Collectives over ``mindspore.communication`` (msrun jobs, or mpirun with ``launch/mpirun.sh --ms-scheduler``).

    Requires ``mindspore.communication.init()`` to have been called.  Bytes travel
    as ``int32`` tensors (padded to the longest payload) through the
    ``ops.AllGather`` primitive, which has kernels on CPU (mccl, dynamic
    cluster), GPU (nccl) and Ascend (hccl); every other collective of
    :class:`~distckpt.comm.Communicator` (header rounds, gather, broadcast) is
    built on it, so a gather carries O(total) bytes per rank here.  (The newer
    ``comm_func`` / ``ops.communication`` functions have no CPU kernel in
    mindspore 2.9: "InnerCommAllGather unregistered".)
    Limits: no deadline of ours — MindSpore's collectives block until their own
    timeouts (e.g. ``HCCL_EXEC_TIMEOUT``) — no abort or exit hook, and no
    :meth:`~distckpt.comm.Communicator.exchange`; prefer
    :class:`~distckpt.comm.MPIComm` when the job runs under mpirun.
    """

    can_exchange = False

    def __init__(self, group: str | None = None) -> None:
        super().__init__()
        require("mindspore", "mindspore")
        from mindspore.communication import GlobalComm, get_group_size, get_rank

        if not _mindspore_initialised():
            raise DistributedError(
                "mindspore.communication is not initialised: call mindspore.communication.init() first "
                "(under msrun, or mpirun with launch/mpirun.sh --ms-scheduler)"
            )
        self._group = group or GlobalComm.WORLD_COMM_GROUP
        self.rank = int(get_rank(self._group))
        self.size = int(get_group_size(self._group))
        self._op: Any = None

    def _timeout_value(self) -> float | None:
        return None

    def _gather_int32(self, arr):
        """AllGather a 1-D int32 array of equal length on every rank → (size, n) numpy array."""
        import numpy as np
        from mindspore import Tensor, ops

        if self._op is None:
            self._op = ops.AllGather(group=self._group)
        out = self._op(Tensor(np.ascontiguousarray(arr, dtype=np.int32)))
        return np.asarray(out.asnumpy()).reshape(self.size, -1)

    def _t_allgather(self, data, op, maxsize: int) -> list[bytes]:
        import numpy as np

        log.debug("rank %d: mindspore allgather %r", self.rank, op.name)
        if self.size == 1:
            return [bytes(data)]
        lengths = self._gather_int32(np.array([len(data)], dtype=np.int32))[:, 0]
        width = max(4, -(-int(lengths.max()) // 4) * 4)
        padded = np.zeros(width, dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = self._gather_int32(padded.view(np.int32)).view(np.uint8)
        return [rows[r, : int(lengths[r])].tobytes() for r in range(self.size)]
