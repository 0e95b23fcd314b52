"""Run under mpirun by tests/test_mpi_save.py.

  save PATH [--fail-rank R] [--kill-rank R --kill-after K] [--seed S]
  load PATH            (each rank loads its slice for a TP=world layout and checks it)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import ml_dtypes
import numpy as np

import distckpt
from distckpt.comm import get_comm
from distckpt.layout import ParamSpec, Strategy, TensorLayout

SHAPE = (12, 6)


def full_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal(SHAPE).astype(np.float32),
        "e": rng.standard_normal((6, 12)).astype(ml_dtypes.bfloat16),
        "b": np.arange(6, dtype=np.int32) + seed,
    }


def save_strategy(world: int) -> Strategy:
    # DP2 x TP(world/2): w rows over TP, e columns over TP, b replicated everywhere
    tp = world // 2
    return Strategy({
        "w": ParamSpec("w", TensorLayout((2, tp), (0, -1))),
        "e": ParamSpec("e", TensorLayout((2, tp), (-1, 0))),
        "b": ParamSpec("b", TensorLayout((2, tp), (-1,))),
    })


def load_strategy_for(world: int) -> Strategy:
    return Strategy({
        "w": ParamSpec("w", TensorLayout((world,), (0, -1))),
        "e": ParamSpec("e", TensorLayout((world,), (-1, 0))),
    })


def local(full: dict, strat: Strategy, rank: int) -> dict:
    out = {}
    for k, v in full.items():
        box = strat.box(k, rank, v.shape) if k in strat else distckpt.Box((0,) * v.ndim, v.shape)
        out[k] = np.ascontiguousarray(v[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fail-rank", type=int, default=-1)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-after", type=int, default=0, help="SIGKILL after this many storage writes")
    args = ap.parse_args()
    comm = get_comm()
    rank, world = comm.rank, comm.size
    full = full_state(args.seed)
    if args.mode == "save":
        strat = save_strategy(world)
        if rank == args.fail_rank:
            import distckpt.execute as dio

            real = dio._writev_all

            def boom(fd, path, bufs):
                real(fd, path, bufs)
                raise OSError(f"disk full on rank {rank}")

            dio._writev_all = boom
        if rank == args.kill_rank:
            from distckpt.storage import Storage

            count = {"n": 0}
            for meth in ("open_write", "put_atomic", "put", "remove", "close_durable"):
                real_m = getattr(Storage, meth)

                def wrapped(self, *a, _real=real_m, **kw):
                    count["n"] += 1
                    if count["n"] > args.kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return _real(self, *a, **kw)

                setattr(Storage, meth, wrapped)
            import distckpt.execute as dio

            real_w = dio._write_local

            def killing_write(*a, **kw):
                count["n"] += 1
                if count["n"] > args.kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_w(*a, **kw)

            dio._write_local = killing_write
        try:
            distckpt.save({**local(full, strat, rank), "step": args.seed}, args.path, strategy=strat)
        except distckpt.DistributedError as exc:
            print(f"RANK {rank} ERROR {exc}", flush=True)
            sys.exit(3)
        print(f"RANK {rank} SAVED", flush=True)
    else:
        strat = load_strategy_for(world)
        stats = distckpt.execute.ReadStats()
        got = distckpt.load(args.path, strategy=strat, stats=stats)
        want = local(full, strat, rank)
        ok = all(got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8), v.view(np.uint8)) for k, v in want.items())
        ok = ok and got["step"] == args.seed
        print(f"RANK {rank} LOAD {'OK' if ok else 'BAD'} ratio={stats.ratio:.3f}", flush=True)
        sys.exit(0 if ok else 4)


if __name__ == "__main__":
    main()
