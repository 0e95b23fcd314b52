"""distckpt quickstart: tensor-parallel MindSpore training under mpirun, save, merge, reshard, resume.

Phases (``launch/quickstart.sh`` runs them in order):

``train``   mpirun -n 4: a two-layer MLP, Megatron-style tensor parallel over 4 ranks
            (w1 split by rows, w2 by columns; the partial outputs are summed with an MPI
            allreduce).  MindSpore computes the forward pass and the gradients of each rank's
            slices; each rank's Parameters have the sliced shapes.  After the last step every
            rank saves its slices at once with ``distckpt.save`` (replicas written once).
``merge``   one process: ``distckpt.merge`` into one MindSpore .ckpt, checked with
            ``mindspore.load_checkpoint`` against the full weights gathered during training;
            ``distckpt.reshard`` to a 2-rank layout.
``resume``  mpirun -n 2: every rank loads only its slice of the resharded checkpoint, checks it
            is bit for bit the 4-rank job's weights, and trains on (the next loss agrees with
            the 4-rank job's up to float32 rounding: the partial sums add in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import distckpt
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.strategy import save_strategy

D_IN, D_HID, D_OUT = 64, 256, 32
LR = 0.05


def strategy_for(tp: int) -> Strategy:
    """w1 [D_HID, D_IN] split by rows, b1 with it, w2 [D_OUT, D_HID] split by columns, b2 replicated."""
    return Strategy(
        {
            "w1": ParamSpec("w1", TensorLayout((tp,), (0, -1)), shape=(D_HID, D_IN)),
            "b1": ParamSpec("b1", TensorLayout((tp,), (0,)), shape=(D_HID,)),
            "w2": ParamSpec("w2", TensorLayout((tp,), (-1, 0)), shape=(D_OUT, D_HID)),
            "b2": ParamSpec("b2", TensorLayout((tp,), (-1,)), shape=(D_OUT,)),
        }
    )


def full_init(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((D_HID, D_IN)) / np.sqrt(D_IN)).astype(np.float32),
        "b1": np.zeros(D_HID, np.float32),
        "w2": (rng.standard_normal((D_OUT, D_HID)) / np.sqrt(D_HID)).astype(np.float32),
        "b2": np.zeros(D_OUT, np.float32),
    }


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((32, D_IN)).astype(np.float32)
    y = np.tanh(x[:, :D_OUT] * 2.0).astype(np.float32)
    return x, y


class TPTrainer:
    """One rank of a tensor-parallel MLP; MindSpore does the math, MPI sums partial outputs."""

    def __init__(self, params: dict[str, np.ndarray], comm):
        import mindspore as ms

        self.ms = ms
        self.comm = comm
        self.weights = {k: np.array(v, dtype=np.float32) for k, v in params.items()}

        def partial_out(w1, b1, w2, x):
            h = ms.ops.relu(ms.ops.matmul(x, w1.T) + b1)
            return ms.ops.matmul(h, w2.T)

        def weighted(w1, b1, w2, x, g):
            return (partial_out(w1, b1, w2, x) * g).sum()

        self._partial = partial_out
        self._grad = ms.grad(weighted, grad_position=(0, 1, 2))

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        from mpi4py import MPI

        ms = self.ms
        w = self.weights
        p = {k: ms.Tensor(v) for k, v in w.items()}
        xt = ms.Tensor(x)
        part = self._partial(p["w1"], p["b1"], p["w2"], xt).asnumpy()
        out = np.empty_like(part)
        self.comm.Allreduce(part, out, op=MPI.SUM)  # row-parallel w2: sum the partial outputs
        out += w["b2"]
        diff = out - y
        loss = float((diff**2).mean())
        g = (2.0 / diff.size) * diff  # dLoss/dOut, identical on every rank
        gw1, gb1, gw2 = self._grad(p["w1"], p["b1"], p["w2"], xt, ms.Tensor(g))
        updates = {"w1": gw1.asnumpy(), "b1": gb1.asnumpy(), "w2": gw2.asnumpy(), "b2": g.sum(axis=0)}
        for name, grad in updates.items():  # plain SGD
            w[name] = w[name] - LR * grad
        return loss

    def state(self) -> dict:
        """This rank's Parameters, with the sliced shapes semi-auto parallel would give them."""
        from mindspore import Parameter, Tensor

        return {k: Parameter(Tensor(v), name=k) for k, v in self.weights.items()}


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN): what "bit for bit" means here."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _local_slices(full: dict[str, np.ndarray], strat: Strategy, rank: int) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in full.items():
        box = strat.box(name, rank, arr.shape)
        out[name] = np.ascontiguousarray(arr[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
    return out


def _mpi():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def phase_train(args) -> None:
    import mindspore as ms

    ms.set_device("CPU")  # MindSpore's current API (set_context(device_target=...) is deprecated)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    comm = _mpi()
    rank, size = comm.Get_rank(), comm.Get_size()
    strat = strategy_for(size)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        save_strategy(strat, os.path.join(args.out, f"strategy_tp{size}.ckpt"))
    comm.Barrier()
    trainer = TPTrainer(_local_slices(full_init(), strat, rank), comm)
    losses = [trainer.step(*batch(s)) for s in range(args.steps)]
    next_loss_inputs = batch(args.steps)
    t0 = time.perf_counter()
    distckpt.save({**trainer.state(), "step": args.steps}, os.path.join(args.out, "ckpt"),
                  strategy=os.path.join(args.out, f"strategy_tp{size}.ckpt"))
    save_s = time.perf_counter() - t0
    # the loss the next step would see: the resumed 2-rank job must reproduce it exactly
    probe = TPTrainer({k: v.asnumpy() for k, v in trainer.state().items()}, comm)
    next_loss = probe.step(*next_loss_inputs)
    # gather the full weights for the merge check (a test oracle, not part of the save)
    gathered = comm.gather({k: v.asnumpy() for k, v in trainer.state().items()}, root=0)
    if rank == 0:
        full = {}
        for name in ("w1", "b1", "w2", "b2"):
            parts = [g[name] for g in gathered]
            if name in ("w1", "b1"):
                full[name] = np.concatenate(parts, axis=0)
            elif name == "w2":
                full[name] = np.concatenate(parts, axis=1)
            else:
                full[name] = parts[0]
        np.savez(os.path.join(args.out, "expected_full.npz"), **full)
        with open(os.path.join(args.out, "train.json"), "w") as f:
            json.dump({"losses": losses, "next_loss": next_loss, "save_seconds": save_s, "ranks": size}, f)
        print(f"[train] {size} ranks, {args.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
              f"saved in {save_s:.2f}s")


def phase_merge(args) -> None:
    out = args.out
    t0 = time.perf_counter()
    rep = distckpt.merge(os.path.join(out, "ckpt"), os.path.join(out, "merged.ckpt"), overwrite=True)
    merge_s = time.perf_counter() - t0
    import mindspore as ms

    loaded = ms.load_checkpoint(os.path.join(out, "merged.ckpt"))
    expected = np.load(os.path.join(out, "expected_full.npz"))
    for name in expected.files:
        got = loaded[name].asnumpy()
        if not _same_bits(got, expected[name]):
            sys.exit(f"[merge] FAILED: {name} in merged.ckpt differs from the trained weights")
    strat2 = strategy_for(2)
    save_strategy(strat2, os.path.join(out, "strategy_tp2.ckpt"))
    t0 = time.perf_counter()
    distckpt.reshard(os.path.join(out, "ckpt"), os.path.join(out, "ckpt_tp2"),
                     dst_strategy=os.path.join(out, "strategy_tp2.ckpt"), overwrite=True)
    reshard_s = time.perf_counter() - t0
    report = distckpt.verify(os.path.join(out, "ckpt_tp2"))
    with open(os.path.join(out, "merge.json"), "w") as f:
        json.dump({"merge_seconds": merge_s, "reshard_seconds": reshard_s, "bytes": rep["bytes"],
                   "verified_bytes": report["bytes_checked"]}, f)
    print(f"[merge] merged.ckpt: mindspore.load_checkpoint reads it and every tensor is bit for bit the trained "
          f"weights ({rep['bytes']} bytes, {merge_s:.2f}s); resharded to 2 ranks in {reshard_s:.2f}s, checksums verified")


def phase_resume(args) -> None:
    import mindspore as ms

    ms.set_device("CPU")  # MindSpore's current API (set_context(device_target=...) is deprecated)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    comm = _mpi()
    rank, size = comm.Get_rank(), comm.Get_size()
    strat_path = os.path.join(args.out, f"strategy_tp{size}.ckpt")
    stats = distckpt.ReadStats()
    state = distckpt.load(os.path.join(args.out, "ckpt_tp2"), strategy=strat_path, stats=stats)
    step = int(state.pop("step"))
    expected = dict(np.load(os.path.join(args.out, "expected_full.npz")))
    exact = all(_same_bits(state[k], v) for k, v in _local_slices(expected, strategy_for(size), rank).items())
    exact = all(comm.allgather(exact))
    trainer = TPTrainer(state, comm)
    losses = [trainer.step(*batch(s)) for s in range(step, step + args.steps)]
    ratios = comm.gather(stats.ratio, root=0)
    if rank == 0:
        with open(os.path.join(args.out, "train.json")) as f:
            before = json.load(f)
        with open(os.path.join(args.out, "merge.json")) as f:
            merged = json.load(f)
        names = ", ".join(sorted(state))
        print(f"[resume] {size} ranks from step {step}: every rank's slices of {names} are bit for bit the weights "
              f"the {before['ranks']}-rank job trained -> {'same weights' if exact else 'DIFFERENT WEIGHTS'}")
        # the loss is a float32 sum of partial products, added in another order on 2 ranks than on 4:
        # it agrees to rounding, which is why the check above compares the weights, not the loss
        close = abs(losses[0] - before["next_loss"]) <= 1e-4 * max(1.0, abs(before["next_loss"]))
        print(f"[resume] next loss {losses[0]:.6f} on {size} ranks, {before['next_loss']:.6f} on {before['ranks']} "
              f"ranks (equal up to float32 rounding{'' if close else ': NO, MISMATCH'})")
        print("\nsummary")
        print(f"  model          4 tensors, {merged['bytes']} bytes (fp32), TP{before['ranks']} -> TP{size}")
        print(f"  save           {before['save_seconds']:.2f}s from {before['ranks']} ranks at once")
        print(f"  merge          {merged['merge_seconds']:.2f}s -> merged.ckpt, read by mindspore.load_checkpoint: "
              "bit for bit the trained weights")
        print(f"  reshard        {merged['reshard_seconds']:.2f}s -> 2-rank layout, all checksums verified")
        print(f"  resume         each rank read only its slice (bytes read / needed: {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"weights {'bit for bit' if exact else 'NOT'} the 4-rank job's")
        print(f"  loss           {before['losses'][0]:.4f} -> {before['losses'][-1]:.4f} (4 ranks) -> "
              f"{losses[-1]:.4f} (2 ranks)")
        if not (close and exact):
            sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["train", "merge", "resume"])
    ap.add_argument("--out", default="output/quickstart")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    {"train": phase_train, "merge": phase_merge, "resume": phase_resume}[args.phase](args)


if __name__ == "__main__":
    main()
