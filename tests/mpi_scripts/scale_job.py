"""Run under mpirun by tests/scenarios/test_scale.py.

  save PATH --tensors T   every rank saves its slices (DP2 x TP(world/2) for the 2-D tensors, one
                          replicated tensor); prints its communicator's bytes sent
  load PATH --tensors T   every rank loads its slices of a TP=world layout and checks them
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import distckpt
from distckpt.comm import get_comm
from distckpt.layout import Box, ParamSpec, Strategy, TensorLayout


def full_state(tensors: int) -> dict:
    rng = np.random.default_rng(3)
    out = {f"t{i:03d}": rng.standard_normal((24, 8)).astype(np.float32) for i in range(tensors)}
    out["norm"] = np.arange(8, dtype=np.float16)
    return out


def save_strategy(world: int, tensors: int) -> Strategy:
    tp = max(world // 2, 1)
    dm = (2, tp) if world > 1 else (1,)
    return Strategy({f"t{i:03d}": ParamSpec(f"t{i:03d}", TensorLayout(dm, (0, -1) if i % 2 else (-1, 0)))
                     for i in range(tensors)})


def load_strategy(world: int, tensors: int) -> Strategy:
    return Strategy({f"t{i:03d}": ParamSpec(f"t{i:03d}", TensorLayout((world,), (0, -1))) for i in range(tensors)})


def local(full: dict, strat: Strategy, rank: int) -> dict:
    out = {}
    for k, v in full.items():
        box = strat.box(k, rank, v.shape) if k in strat else Box((0,) * v.ndim, v.shape)
        out[k] = np.ascontiguousarray(v[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("path")
    ap.add_argument("--tensors", type=int, default=16)
    a = ap.parse_args()
    comm = get_comm()
    rank, world = comm.rank, comm.size
    full = full_state(a.tensors)
    if a.mode == "save":
        strat = save_strategy(world, a.tensors)
        before = comm.stats["bytes_sent"]
        distckpt.save({**local(full, strat, rank), "step": 9}, a.path, strategy=strat, comm=comm)
        print(f"RANK {rank} SAVED sent={comm.stats['bytes_sent'] - before}", flush=True)
    else:
        strat = load_strategy(world, a.tensors)
        got = distckpt.load(a.path, strategy=strat, rank=rank)
        want = local(full, strat, rank)
        ok = all(got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes() for k, v in want.items()) and got["step"] == 9
        print(f"RANK {rank} LOAD {'OK' if ok else 'BAD'}", flush=True)
        sys.exit(0 if ok else 4)


if __name__ == "__main__":
    main()
