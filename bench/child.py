"""One measured workload per process: ``python -m bench.child TASK ARGS_JSON RESULT_JSON``.

The parent (``bench/run.py``) times the whole process (interpreter start and
imports included) and takes its peak RSS from ``os.wait4``; this module only
does the work and writes what it learned (inner timings, byte counts) to
RESULT_JSON.  Heavy imports (MindSpore) happen inside the task that needs them,
so they count against that tool's wall time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from bench.model import make_model, rank_states, strategy, tensor_data
from bench.peertasks import TASKS as PEER_TASKS


def _model(a):
    return make_model(int(a["size"]), a["dtype"], a.get("hidden"))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ inputs
def build_native(a):
    """A MindSpore-native distributed checkpoint: rank_r/checkpoint_r.ckpt + strategy files."""
    from distckpt.codecs.ckpt import CkptWriter
    from distckpt.strategy import dump_strategy_proto

    m = _model(a)
    out = a["out"]
    src = strategy(m, a["dp"], a["tp"])
    world = src.world_size
    files, writers = [], []
    for r in range(world):
        d = os.path.join(out, "src", f"rank_{r}")
        os.makedirs(d, exist_ok=True)
        f = open(os.path.join(d, f"checkpoint_{r}.ckpt"), "wb")  # noqa: SIM115
        files.append(f)
        writers.append(CkptWriter(f))
    for name, shape, _ in m.tensors:
        full = tensor_data(m, name, shape)
        for r in range(world):
            box = src.box(name, r, shape)
            piece = np.ascontiguousarray(full[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))])
            writers[r].add_tensor(name, m.dtype, piece.shape, piece)
    for w, f in zip(writers, files):
        w.close()
        f.close()
    with open(os.path.join(out, "src_strategy.ckpt"), "wb") as f:
        f.write(dump_strategy_proto(src))
    for tag, strat in a.get("targets", {}).items():
        with open(os.path.join(out, f"{tag}_strategy.ckpt"), "wb") as f:
            f.write(dump_strategy_proto(strategy(m, strat[0], strat[1], dim=strat[2])))
    return {"bytes": m.nbytes, "largest": m.largest, "tensors": len(m.tensors), "layers": m.layers, "hidden": m.hidden}


# ------------------------------------------------------------------- saves
def _states(a):
    m = _model(a)
    strat = strategy(m, a["dp"], a["tp"])
    t0 = time.perf_counter()
    states = rank_states(m, strat)
    return m, strat, states, time.perf_counter() - t0


def _distinct(states):
    seen, out = set(), []
    for r in sorted(states):
        for arr in states[r].values():
            if id(arr) not in seen:
                seen.add(id(arr))
                out.append(arr)
    return out


def save_distckpt(a):
    """distckpt.save of every rank's slices (rank mode, one rank after another), then finalize."""
    import distckpt

    m, strat, states, gen = _states(a)
    runs = []
    modes = a.get("modes", [True])
    for i, checksums in enumerate(modes):
        path = os.path.join(a["out"], f"ckpt-{i}")
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        for r in range(strat.world_size):
            distckpt.save(states[r], path, strategy=strat, rank=r, checksums=checksums)
        distckpt.finalize(path)
        dt = time.perf_counter() - t0
        written = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        runs.append({"checksums": checksums, "seconds": dt, "bytes_written": written})
        if i < len(modes) - 1 or not a.get("keep"):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, os.path.join(a["out"], "distckpt"))
    return {"gen_seconds": gen, "model_bytes": m.nbytes, "runs": runs}


def save_async(a):
    """Training-blocked time: CheckpointManager.save with async_save off vs on (rank 0's slices, 3 steps)."""
    from distckpt import CheckpointManager

    m, strat, states, gen = _states(a)
    state = {k: np.ascontiguousarray(v) for k, v in states[0].items()}
    out = {}
    for mode in (False, True):
        root = os.path.join(a["out"], f"mgr-{'async' if mode else 'sync'}")
        shutil.rmtree(root, ignore_errors=True)
        mgr = CheckpointManager(root, async_save=mode, max_to_keep=1)
        blocked = []
        t0 = time.perf_counter()
        for step in range(3):
            t = time.perf_counter()
            mgr.save(step, state)
            blocked.append(time.perf_counter() - t)
            time.sleep(a.get("compute", 0.0))  # the training step the save overlaps with
        mgr.close()
        out["async" if mode else "sync"] = {"blocked": blocked, "total": time.perf_counter() - t0}
        shutil.rmtree(root, ignore_errors=True)
    out["bytes"] = int(sum(v.nbytes for v in state.values()))
    return out


def save_raw(a):
    """The disk's own speed: the same distinct bytes, written sequentially into world files, each fsynced."""
    m, strat, states, gen = _states(a)
    arrays = _distinct(states)
    world = strat.world_size
    os.makedirs(a["out"], exist_ok=True)
    t0 = time.perf_counter()
    fds = []
    for r in range(world):
        p = os.path.join(a["out"], f"raw-{r}.bin")
        with open(p, "wb", buffering=0) as f:
            for arr in arrays[r::world]:
                mv = memoryview(arr.reshape(-1).view(np.uint8))
                for i in range(0, len(mv), 8 << 20):
                    f.write(mv[i : i + (8 << 20)])
            os.fsync(f.fileno())
        fds.append(p)
    _fsync_dir(a["out"])
    dt = time.perf_counter() - t0
    written = sum(os.path.getsize(p) for p in fds)
    shutil.rmtree(a["out"], ignore_errors=True)
    return {"gen_seconds": gen, "model_bytes": m.nbytes, "runs": [{"seconds": dt, "bytes_written": written}]}


def save_mindspore(a):
    """mindspore.save_checkpoint of every rank's slices, one file per rank (replicas saved by each rank)."""
    import mindspore as ms

    m, strat, states, gen = _states(a)
    os.makedirs(a["out"], exist_ok=True)
    total, written = 0.0, 0
    conv = 0.0
    for r in range(strat.world_size):
        c0 = time.perf_counter()
        objs = []
        for name, arr in states[r].items():
            if m.dtype == "bfloat16":
                t = ms.Tensor(arr.astype(np.float32)).astype(ms.bfloat16)
            else:
                t = ms.Tensor(arr)
            objs.append({"name": name, "data": t})
        conv += time.perf_counter() - c0
        p = os.path.join(a["out"], f"rank_{r}", f"checkpoint_{r}.ckpt")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        t0 = time.perf_counter()
        ms.save_checkpoint(objs, p)
        total += time.perf_counter() - t0
        written += os.path.getsize(p)
        del objs
    shutil.rmtree(a["out"], ignore_errors=True)
    return {"gen_seconds": gen + conv, "model_bytes": m.nbytes, "runs": [{"seconds": total, "bytes_written": written}]}


# ----------------------------------------------------- merge and reshard
def merge_distckpt(a):
    import distckpt

    shutil.rmtree(a["dst"], ignore_errors=True)
    os.makedirs(a["dst"])
    res = distckpt.merge(a["src"], os.path.join(a["dst"], "merged.ckpt"), src_strategy=a["src_strategy"])
    out = {"seconds": res["seconds"], "read": res["read"], "bytes_written": _du(a["dst"])}
    shutil.rmtree(a["dst"], ignore_errors=True)
    return out


def reshard_distckpt(a):
    import distckpt

    shutil.rmtree(a["dst"], ignore_errors=True)
    res = distckpt.reshard(
        a["src"], a["dst"], dst_strategy=a["dst_strategy"], src_strategy=a["src_strategy"], format="ckpt"
    )
    out = {"seconds": res["seconds"], "read": res["read"], "bytes_written": _du(a["dst"])}
    shutil.rmtree(a["dst"], ignore_errors=True)
    return out


def _transform(a, dst_strategy):
    import mindspore as ms

    shutil.rmtree(a["dst"], ignore_errors=True)
    t0 = time.perf_counter()
    ms.transform_checkpoints(a["src"], a["dst"], "checkpoint_", a["src_strategy"], dst_strategy)
    dt = time.perf_counter() - t0
    out = {"seconds": dt, "bytes_written": _du(a["dst"])}
    shutil.rmtree(a["dst"], ignore_errors=True)
    return out


def merge_mindspore(a):
    return _transform(a, None)


def reshard_mindspore(a):
    return _transform(a, a["dst_strategy"])


def _du(path):
    total = 0
    for d, _, fs in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in fs)
    return total


# ------------------------------------------------------------ load ratio
def load_ratio(a):
    """Each rank of a new layout loads its slices; bytes read / bytes needed."""
    import distckpt
    from distckpt.execute import ReadStats

    m = _model(a)
    out = {}
    srcs = [(a["src"], True, "")]
    if a.get("variants"):
        # where the extra bytes come from: checksum blocks read whole (1 MiB by
        # default) -- the same checkpoint without verification, and one saved
        # with 64 KiB blocks
        srcs.append((a["src"], False, ", no verify"))
        small = os.path.join(os.path.dirname(a["src"]), "blocks64k")
        shutil.rmtree(small, ignore_errors=True)
        strat0 = strategy(m, a["dp"], a["tp"])
        states = rank_states(m, strat0)
        for r in range(strat0.world_size):
            distckpt.save(states[r], small, strategy=strat0, rank=r, block_size=64 << 10)
        distckpt.finalize(small)
        del states
        srcs.append((small, True, ", 64 KiB blocks"))
    for tag, (dp, tp, dim) in a["targets"].items():
        strat = strategy(m, dp, tp, dim=dim)
        for src, verify, suffix in srcs:
            st = ReadStats()
            t0 = time.perf_counter()
            for r in range(strat.world_size):
                got = distckpt.load(src, strategy=strat, rank=r, stats=st, verify=verify)
                del got
            out[tag + suffix] = {**st.to_json(), "seconds": time.perf_counter() - t0, "ranks": strat.world_size,
                                 "verify": verify, "block_size": 64 << 10 if "64" in suffix else 1 << 20}
    return out


# -------------------------------------------------------------- planning
def plan(a):
    """plan_save for R ranks x T tensors (DP x TP), and one rank's load plan into another layout."""
    from distckpt.index import Chunk, TensorInfo
    from distckpt.layout import ParamSpec, Strategy, TensorLayout, box_of
    from distckpt.plan import ChunkLookup, plan_box_reads, plan_save

    ranks, ntensors, tp = int(a["ranks"]), int(a["tensors"]), int(a.get("tp", 8))
    dp = ranks // tp
    t0 = time.perf_counter()
    params, shapes = {}, {}
    for i in range(ntensors):
        shape = (4096, 1024) if i % 3 else (1024,)
        tm = ((0, -1) if i % 2 else (-1, 0)) if len(shape) == 2 else (-1,)
        name = f"layer.{i}.weight"
        params[name] = ParamSpec(name, TensorLayout((dp, tp), tm))
        shapes[name] = ("bfloat16", shape)
    strat = Strategy(params)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    items = plan_save(shapes, strat, ranks)
    t_save = time.perf_counter() - t0
    # one rank of a new job (TP4, DP ranks/4) plans its reads
    chunks: dict[str, list] = {}
    for it in items:
        chunks.setdefault(it.name, []).append(Chunk(it.box, "f", ((0, it.box.numel * 2),), None, 1 << 20, it.writer))
    infos = {n: TensorInfo(n, dt, s, tuple(chunks[n])) for n, (dt, s) in shapes.items()}
    new = Strategy(
        {n: ParamSpec(n, TensorLayout((ranks // 4, 4), p.layout.tensor_map)) for n, p in params.items()}
    )
    t0 = time.perf_counter()
    nreq = 0
    for t in infos.values():
        box = box_of(new, t.name, t.shape, ranks - 1)
        lk = ChunkLookup([c.box for c in t.chunks])
        for ci, inter in lk.overlapping(box):
            nreq += len(plan_box_reads(t.chunks[ci].box, inter, 2).requests)
    t_load = time.perf_counter() - t0
    return {
        "ranks": ranks,
        "tensors": ntensors,
        "write_items": len(items),
        "build_seconds": t_build,
        "plan_save_seconds": t_save,
        "load_plan_seconds": t_load,
        "load_requests": nreq,
    }


TASKS = {
    **PEER_TASKS,
    **{f.__name__: f
    for f in (
        build_native,
        save_distckpt,
        save_async,
        save_raw,
        save_mindspore,
        merge_distckpt,
        reshard_distckpt,
        merge_mindspore,
        reshard_mindspore,
        load_ratio,
        plan,
    )},
}


def main(argv):
    task, args, result = argv
    out = TASKS[task](json.loads(args))
    with open(result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
