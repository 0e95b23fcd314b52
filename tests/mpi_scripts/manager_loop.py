"""Run under mpirun by tests/test_mpi_manager.py: a training loop with CheckpointManager.

  train ROOT --steps N --interval K --keep M [--kill-at-step S]
  resume ROOT        (any world size: restore the latest step, check the weights exactly)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np

from distckpt import CheckpointManager
from distckpt.comm import get_comm
from distckpt.layout import ParamSpec, Strategy, TensorLayout

SHAPE = (24, 8)


def weights(step: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1000 * step)


def strategy(world: int) -> Strategy:
    return Strategy({"w": ParamSpec("w", TensorLayout((world,), (0, -1)))})


def my_slice(full: np.ndarray, world: int, rank: int) -> np.ndarray:
    rows = SHAPE[0] // world
    return np.ascontiguousarray(full[rank * rows : (rank + 1) * rows])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "resume"])
    ap.add_argument("root")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--kill-at-step", type=int, default=-1)
    args = ap.parse_args()
    comm = get_comm()
    rank, world = comm.rank, comm.size
    if args.mode == "train":
        mgr = CheckpointManager(args.root, max_to_keep=args.keep, save_interval_steps=args.interval, async_save=True)
        for step in range(1, args.steps + 1):
            w = my_slice(weights(step), world, rank)
            if step == args.kill_at_step and rank == world - 1:
                # die while this step's save is in flight: its data file is written (by the writer
                # process), the commit has not happened
                from distckpt.asyncsave import AsyncWriter

                real = AsyncWriter.write

                def die(self, *a, _real=real, **kw):
                    _real(self, *a, **kw)
                    os.kill(os.getpid(), signal.SIGKILL)

                AsyncWriter.write = die
            mgr.save(step, {"w": w, "step": step}, strategy=strategy(world))
            w[:] = -1  # training reuses its buffers at once
        mgr.close()
        print(f"RANK {rank} STEPS {mgr.all_steps()}", flush=True)
    else:
        mgr = CheckpointManager(args.root)
        step = mgr.latest_step()
        got = mgr.restore(strategy=strategy(world))
        ok = got["step"] == step and np.array_equal(got["w"], my_slice(weights(step), world, rank))
        print(f"RANK {rank} RESUME {step} {'OK' if ok else 'BAD'}", flush=True)
        sys.exit(0 if ok else 4)


if __name__ == "__main__":
    main()
