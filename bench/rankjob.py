"""One rank of a multi-process bench row: ``python -m bench.rankjob TASK ARGS_JSON OUT_DIR``.

Launched by ``bench/peers.py`` under ``mpirun -n N --oversubscribe`` (distckpt, raw disk) or
``torchrun --nproc-per-node N`` (PyTorch DCP).  Every rank builds its own piece of the model
(``bench.model.block_data``: rank r of a row-sharded save makes only its rows), waits on a
barrier, records the clock (``time.monotonic``, one clock for every process of the host), does
the work, records the clock again, waits on a second barrier, and writes
``OUT_DIR/rank-{r}.json``: enter/leave times, its peak RSS (``ru_maxrss`` of this process:
the counter ``os.wait4`` returns to a parent), its RSS just before the work, and an exact
fingerprint of what it loaded.  The parent takes save time = last leave - first enter.

Tasks (``tool`` in ARGS_JSON picks the implementation):
  save  distckpt | dcp | raw   4 ranks write the row-sharded model (raw: the same bytes, one file
                              per rank, fsynced: the disk's limit)
  load  distckpt | dcp         N ranks load it as column shards (dim 1 split N ways), every page touched
  s3load distckpt              N ranks load from S3 in a DP x TP layout, no rank= (bytes counted by the server)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import sys
import time

import numpy as np

from bench.model import block_data, fingerprint, peer_model, strategy

PAGE = 4096


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def touch(a: np.ndarray) -> int:
    """Read one byte of every 4 KiB page of ``a`` (forces lazily mapped or copied data in)."""
    if a.flags.c_contiguous and a.size:
        flat = a.reshape(-1).view(np.uint8)
        return int(flat[::PAGE].sum(dtype=np.uint64))
    return int(np.asarray(a).size)


def row_state(m, rank: int, world: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s rows of every matrix (1/world of each), and every vector whole."""
    return {name: block_data(name, shape, rank, world) for name, shape, _ in m.tensors}


def _model(a):
    return peer_model(int(a["size"]), head=bool(a.get("head", True)))


# ------------------------------------------------------------------ distckpt and raw under mpirun
class _MPI:
    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()

    def barrier(self):
        self.comm.Barrier()


class _Torch:
    def __init__(self):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh("cpu", (self.world,))

    def barrier(self):
        self.dist.barrier()


def _save_distckpt(state, a, ctx):
    import distckpt

    strat = strategy(_model(a), 1, ctx.world, dim=0)
    return lambda: distckpt.save(state, a["path"], strategy=strat)


def _save_raw(state, a, ctx):
    """The same bytes as the save: this rank's rows in one file, fsynced (vectors by rank 0 only)."""
    arrays = [v for v in state.values() if v.ndim > 1 or ctx.rank == 0]

    def run():
        os.makedirs(a["path"], exist_ok=True)
        p = os.path.join(a["path"], f"raw-{ctx.rank:05d}.bin")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for arr in arrays:
                mv = memoryview(arr.reshape(-1).view(np.uint8))
                while len(mv):
                    n = os.write(fd, mv)
                    mv = mv[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if ctx.rank == 0:
            dfd = os.open(a["path"], os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

    return run


def _dtensors(state: dict, mesh, dim: int):
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard

    out = {}
    for name, (local, shape) in state.items():
        t = torch.from_numpy(local)
        place = [Replicate()] if len(shape) == 1 else [Shard(dim)]
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        out[name] = DTensor.from_local(t, mesh, place, run_check=False, shape=torch.Size(shape), stride=stride)
    return out


def _save_dcp(state, a, ctx):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    shapes = {name: shape for name, shape, _ in _model(a).tensors}
    sd = _dtensors({k: (v, shapes[k]) for k, v in state.items()}, ctx.mesh, 0)
    return lambda: dcp.save(sd, storage_writer=FileSystemWriter(a["path"], sync_files=True))


def save(a):
    """Imports, the state and the DTensors are made before the first barrier; only the save is timed."""
    tool = a["tool"]
    ctx = _Torch() if tool == "dcp" else _MPI()
    m = _model(a)
    state = row_state(m, ctx.rank, ctx.world)
    run = {"distckpt": _save_distckpt, "dcp": _save_dcp, "raw": _save_raw}[tool](state, a, ctx)
    ctx.barrier()
    base = _rss_now()
    t0 = time.monotonic()
    run()
    t1 = time.monotonic()
    peak = _peak_rss()
    ctx.barrier()
    return ctx, {"enter": t0, "leave": t1, "peak_rss": peak, "rss_before": base,
                 "state_bytes": int(sum(v.nbytes for v in state.values()))}


# ------------------------------------------------------------------ loads
def _col_shapes(m, world: int):
    """Each tensor's local shape when every matrix is split by columns ``world`` ways."""
    return {name: (shape if len(shape) == 1 else (shape[0], shape[1] // world), shape) for name, shape, _ in m.tensors}


def _load_distckpt(a, ctx):
    import distckpt

    kw = {}
    if a.get("cooperative") is not None:
        kw["cooperative"] = a["cooperative"]
    if a.get("verify") is False:
        kw["verify"] = False
    if a.get("pass_rank", True):
        kw["rank"] = ctx.rank  # row 2: load(path, strategy=cols, rank=r); row 5 lets the communicator say
    strat = strategy(_model(a), a.get("dp", 1), a.get("tp", ctx.world), dim=a.get("dim", 1))
    return lambda: distckpt.load(a["path"], strategy=strat, **kw)


def _load_dcp(a, ctx):
    """The destination DTensors (column shards) exist before the barrier, as a job's model does."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    state = {name: (torch.empty(local).numpy(), shape) for name, (local, shape) in _col_shapes(_model(a), ctx.world).items()}
    sd = _dtensors(state, ctx.mesh, 1)

    def run():
        dcp.load(sd, storage_reader=FileSystemReader(a["path"]))
        return {k: v.to_local().numpy() for k, v in sd.items()}

    return run


def load(a):
    tool = a["tool"]
    ctx = _Torch() if tool == "dcp" else _MPI()
    run = {"distckpt": _load_distckpt, "dcp": _load_dcp}[tool](a, ctx)
    ctx.barrier()
    base = _rss_now()
    t0 = time.monotonic()
    got = run()
    for v in got.values():
        if isinstance(v, np.ndarray):
            touch(v)
    t1 = time.monotonic()
    peak = _peak_rss()
    ctx.barrier()
    arrays = {k: v for k, v in got.items() if isinstance(v, np.ndarray)}
    return ctx, {"enter": t0, "leave": t1, "peak_rss": peak, "rss_before": base,
                 "loaded_bytes": int(sum(v.nbytes for v in arrays.values())),
                 "fingerprints": {k: fingerprint(v) for k, v in arrays.items()}}


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def s3load(a):
    """Every rank of the job calls ``load(url, strategy=...)`` without ``rank=``: the collective form,
    the one a cooperative load can share bytes in."""
    return load({**a, "tool": "distckpt", "pass_rank": False})


TASKS = {"save": save, "load": load, "s3load": s3load}


def main(argv: list[str]) -> None:
    task, args, out_dir = argv
    ctx, res = TASKS[task](json.loads(args))
    res["rank"], res["world"] = ctx.rank, ctx.world
    with open(os.path.join(out_dir, f"rank-{ctx.rank}.json"), "w") as f:
        json.dump(res, f)
    if isinstance(ctx, _Torch):
        ctx.dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
