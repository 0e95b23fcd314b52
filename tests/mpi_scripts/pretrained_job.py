"""Run under mpirun by tests/test_mpi_pretrained.py: a tiny MindFormers LlamaForCausalLM per rank.

  save DIR STRATEGY [--seed S]   every rank builds the model, replaces each Parameter by its
                                 slice of the same full weights per STRATEGY, and calls
                                 ``distckpt.mindspore.save_pretrained(model, DIR, strategy=STRATEGY)``
                                 (no comm: mpirun is auto-detected)
  load DIR STRATEGY [--seed S]   every rank builds the model with STRATEGY's sliced shapes (zeros),
                                 calls ``load_pretrained(model, DIR, strategy=STRATEGY)`` and checks
                                 its Parameters against ``np.split`` slices of the full weights;
                                 then measures the bytes ``distckpt.load`` reads for its slices

Each rank prints ``RANK r SAVED`` / ``RANK r LOAD OK needed=N read=M`` or ``RANK r ... BAD <why>``
and exits non-zero on a mismatch.  MindFormers writes ``./output/log``: run with cwd in a temp dir.
The module also serves the test process: :data:`CFG`, :data:`FP32`, :func:`full_weights`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

FP32 = dict(
    compute_dtype="float32",
    layernorm_compute_type="float32",
    softmax_compute_type="float32",
    rotary_dtype="float32",
    param_init_type="float32",
)
# MindFormers' CPU forward pass needs fused_rms_norm=False, use_rope_slice=True and fp32 (DESIGN §2.3)
CFG = dict(
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    vocab_size=64,
    seq_length=8,
    batch_size=1,
    fused_rms_norm=False,
    use_rope_slice=True,
    use_past=False,
    use_flash_attention=False,
    **FP32,
)


# Megatron tensor parallelism: these weights split their input dim (columns), the others their rows
ROW_PARALLEL = ("attention.wo.", "feed_forward.w2.")


def full_weights(shapes: dict, seed: int) -> dict:
    """The model's full weights, the same in every process: numpy's generator, names in sorted order."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        x = rng.standard_normal(shape).astype(np.float32)
        out[name] = (1.0 + 0.1 * x) if len(shape) == 1 else (0.08 * x)  # norms near 1
        out[name] = out[name].astype(np.float32)
    return out


def build_model():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")  # no forward pass here: nothing to compile
    import mindformers

    return mindformers.LlamaForCausalLM(mindformers.LlamaConfig(**CFG))


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k]).tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["save", "load"])
    ap.add_argument("path")
    ap.add_argument("strategy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: synth.np_slice
    from synth import np_slice

    import distckpt
    from distckpt.comm import get_comm
    from distckpt.mindspore import cell_state, from_numpy, load_pretrained, save_pretrained
    from distckpt.strategy import load_strategy

    comm = get_comm()
    rank, world = comm.rank, comm.size
    strat = load_strategy(args.strategy)
    if strat.world_size != world:
        print(f"RANK {rank} BAD strategy has {strat.world_size} ranks, mpirun {world}", flush=True)
        sys.exit(5)

    model = build_model()
    params = model.parameters_dict()
    full = full_weights({n: tuple(p.shape) for n, p in params.items()}, args.seed)
    # the same full weights on every rank, before anyone slices them
    digests = comm.allgather(_digest(full), "pretrained_job.digest")
    if len(set(digests)) != 1:
        print(f"RANK {rank} BAD full weights differ between ranks", flush=True)
        sys.exit(6)
    want = {n: np_slice(a, strat.params[n].layout, rank) for n, a in full.items()}

    if args.mode == "save":
        for name, p in params.items():  # this rank holds only its tensor-parallel slices
            p.set_data(from_numpy(want[name], name=name), slice_shape=True)
        held = cell_state(model)
        if any(held[n].shape != want[n].shape or not np.array_equal(held[n], want[n]) for n in want):
            print(f"RANK {rank} BAD the cell does not hold its slices", flush=True)
            sys.exit(7)
        save_pretrained(model, args.path, strategy=args.strategy)
        print(f"RANK {rank} SAVED", flush=True)
        return

    for name, p in params.items():  # the sliced shapes, zero-filled: the load has to fill them
        p.set_data(from_numpy(np.zeros_like(want[name]), name=name), slice_shape=True)
    missing, unexpected = load_pretrained(model, args.path, strategy=args.strategy, strict=True)
    got = cell_state(model)
    bad = [n for n in want if got[n].dtype != want[n].dtype or got[n].shape != want[n].shape or not np.array_equal(got[n], want[n])]
    if missing or unexpected or bad:
        print(f"RANK {rank} LOAD BAD missing={missing} unexpected={unexpected} differ={bad[:5]}", flush=True)
        sys.exit(4)
    # bytes read for this rank's slices: verified (whole checksum blocks), unverified (the read plan
    # alone), and verified for the tensors saved split on their outer dim only
    stats, raw, outer = distckpt.execute.ReadStats(), distckpt.execute.ReadStats(), distckpt.execute.ReadStats()
    state = distckpt.load(args.path, strategy=args.strategy, stats=stats)
    state_raw = distckpt.load(args.path, strategy=args.strategy, stats=raw, verify=False)
    outer_names = [n for n in want if full[n].ndim == 2 and not any(k in n for k in ROW_PARALLEL)]
    distckpt.load(args.path, strategy=args.strategy, stats=outer, names=outer_names)
    needed = sum(int(a.nbytes) for a in want.values())
    same = all(np.array_equal(state[n], want[n]) and np.array_equal(state_raw[n], want[n]) for n in want)
    print(
        f"RANK {rank} LOAD {'OK' if same else 'BAD'} needed={needed} stats_needed={stats.bytes_needed} "
        f"read={stats.bytes_read} raw_read={raw.bytes_read} outer_needed={outer.bytes_needed} "
        f"outer_read={outer.bytes_read}",
        flush=True,
    )
    sys.exit(0 if same else 4)


if __name__ == "__main__":
    main()
