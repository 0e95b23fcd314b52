"""Single-process workloads of the peer rows, run by ``bench/child.py`` (one task per process).

``bench/peers.py`` calls ``run_child("cell_save", ...)`` etc.; each function builds what it needs
(outside the timed region), times only the call being compared, and returns inner timings and
byte counts.  The parent adds whole-process wall time and peak RSS (``os.wait4``).

  cell_save  tool=distckpt     distckpt.save(cell_state(cell), path)      (checksums, fsync: its defaults)
             tool=mindformers  mindformers.checkpoint.checkpoint.save_checkpoint(...) + os.sync()
             tool=raw          the same bytes into one file + fsync (the disk's limit; no MindSpore)
  cell_load  tool=distckpt | distckpt_noverify | mindformers, every 4 KiB page of every array touched
  memcpy     numpy copy of preallocated arrays of the given sizes, best of N (the memory limit)
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from bench.model import block_data, fingerprint, peer_model, rank_states, strategy
from bench.rankjob import touch


def _arrays(a) -> dict[str, np.ndarray]:
    m = peer_model(int(a["size"]), head=False)
    return {name: block_data(name, shape, 0, 1) for name, shape, _ in m.tensors}


def _cell(arrays: dict[str, np.ndarray]):
    """A MindSpore Cell whose parameters are ``arrays`` (names kept as the parameter names)."""
    from mindspore import Parameter, Tensor, nn

    class BenchNet(nn.Cell):
        def __init__(self):
            super().__init__()
            for i, (name, arr) in enumerate(arrays.items()):
                setattr(self, f"p{i}", Parameter(Tensor(arr), name=name))

    return BenchNet()


def _du(path: str) -> int:
    total = 0
    for d, _, fs in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in fs)
    return total


def cell_save(a):
    tool, path = a["tool"], a["path"]
    shutil.rmtree(path, ignore_errors=True)
    arrays = _arrays(a)
    if tool == "raw":
        os.makedirs(path)
        t0 = time.perf_counter()
        fd = os.open(os.path.join(path, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for arr in arrays.values():
                mv = memoryview(arr.reshape(-1).view(np.uint8))
                while len(mv):
                    mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        dt = time.perf_counter() - t0
    else:
        cell = _cell(arrays)
        del arrays
        if tool == "distckpt":
            import distckpt
            from distckpt.mindspore import cell_state

            t0 = time.perf_counter()
            distckpt.save(cell_state(cell), path)
            dt = time.perf_counter() - t0
        elif tool == "mindformers":
            from mindformers.checkpoint.checkpoint import CommonInfo, save_checkpoint

            t0 = time.perf_counter()
            save_checkpoint(1, cell, common_info=CommonInfo(), save_checkpoint_path=path, keep_max_num=1000)
            os.sync()
            dt = time.perf_counter() - t0
        else:
            raise ValueError(f"unknown tool {tool!r}")
    return {"tool": tool, "seconds": dt, "bytes_written": _du(path)}


def cell_load(a):
    tool, path = a["tool"], a["path"]
    m = peer_model(int(a["size"]), head=False)
    if tool == "mindformers":
        from mindformers.checkpoint.checkpoint import load_checkpoint

        net = _cell({name: np.zeros(shape, np.float32) for name, shape, _ in m.tensors})
        t0 = time.perf_counter()
        load_checkpoint(path, net)
        got = {name: p.asnumpy() for name, p in net.parameters_dict().items()}
        for v in got.values():
            touch(v)
        dt = time.perf_counter() - t0
    else:
        import distckpt

        kw = {"verify": False} if tool == "distckpt_noverify" else {}
        t0 = time.perf_counter()
        got = distckpt.load(path, **kw)
        for v in got.values():
            if isinstance(v, np.ndarray):
                touch(v)
        dt = time.perf_counter() - t0
    arrays = {k: v for k, v in got.items() if isinstance(v, np.ndarray)}
    return {"tool": tool, "seconds": dt, "loaded_bytes": int(sum(v.nbytes for v in arrays.values())),
            "fingerprints": {k: fingerprint(v) for k, v in arrays.items()}}


def memcpy(a):
    """Best of ``reps`` numpy copies of ``size`` bytes into a preallocated, already touched array."""
    out = {}
    for size in a["sizes"]:
        src = np.ones(int(size) // 4, np.float32)
        dst = np.zeros_like(src)
        best = float("inf")
        for _ in range(int(a.get("reps", 5))):
            t0 = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - t0)
        out[str(size)] = best
        del src, dst
    return {"seconds": out}


def s3_save(a):
    """The row-sharded model saved to ``path`` (an s3:// URL) rank by rank in this process, then committed."""
    import distckpt
    from bench.rankjob import row_state

    m = peer_model(int(a["size"]), head=True)
    n = int(a["ranks"])
    strat = strategy(m, 1, n, dim=0)
    t0 = time.perf_counter()
    for r in range(n):
        distckpt.save(row_state(m, r, n), a["path"], strategy=strat, rank=r)
    distckpt.finalize(a["path"])
    return {"seconds": time.perf_counter() - t0, "model_bytes": m.nbytes}


def balance(a):
    """Bytes written per rank when the row-1 model is saved in DP x TP layouts with replicas (rank mode)."""
    import distckpt
    from bench.peers import balance_of, writer_bytes

    m = peer_model(int(a["size"]), head=True)
    out = {}
    for dp, tp in ((2, 2), (2, 4)):
        strat = strategy(m, dp, tp)
        states = rank_states(m, strat)
        path = os.path.join(a["dir"], f"dp{dp}tp{tp}")
        shutil.rmtree(path, ignore_errors=True)
        for r in range(strat.world_size):
            distckpt.save(states[r], path, strategy=strat, rank=r)
        distckpt.finalize(path)
        del states
        out[f"DP{dp}xTP{tp} (model's own split dims, replicas)"] = balance_of(writer_bytes(path))
        shutil.rmtree(path, ignore_errors=True)
    return {"layouts": out}


def _train_step(x: np.ndarray, w: np.ndarray, n: int) -> float:
    """One stand-in training step on one core: ``n`` fp32 matmuls (BLAS limited to one thread by the
    launcher's environment), the state untouched."""
    t0 = time.perf_counter()
    for _ in range(n):
        x = np.tanh(x @ w)
    return time.perf_counter() - t0


def async_train(a):
    """Training steps while ``CheckpointManager(async_save=True)`` saves the state in the background.

    Steps with no save in flight (the baseline) and steps that overlap a background save (a helper
    thread waits for it) alternate, save after save; the blocked time of each ``save`` call is
    compared with the staging copy's floor: ``np.copyto`` of the same arrays into buffers allocated
    and touched beforehand (best of 3).
    """
    import threading

    from distckpt import CheckpointManager

    state = _arrays(a)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 256), dtype=np.float32)
    w = rng.standard_normal((256, 256), dtype=np.float32) / 16
    n = int(a.get("matmuls", 40))
    copies = []
    staged = {k: np.zeros_like(v) for k, v in state.items()}
    for _ in range(3):
        t0 = time.perf_counter()
        for k, v in state.items():
            np.copyto(staged[k], v)
        copies.append(time.perf_counter() - t0)
    del staged
    root = a["path"]
    shutil.rmtree(root, ignore_errors=True)
    mgr = CheckpointManager(root, async_save=True, max_to_keep=1)
    base, during, blocked = [], [], []
    try:
        mgr.save(0, state)  # the writer process starts once per job: not a training step's cost
        mgr.wait()
        for step in range(1, int(a.get("saves", 4)) + 1):
            base += [_train_step(x, w, n) for _ in range(int(a.get("base_steps", 5)))]
            done = threading.Event()
            errors: list[BaseException] = []

            def waiter(done: threading.Event = done, errors: list[BaseException] = errors) -> None:
                try:
                    mgr.wait()
                except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
                    errors.append(exc)
                finally:
                    done.set()

            t0 = time.perf_counter()
            mgr.save(step, state)
            blocked.append(time.perf_counter() - t0)
            threading.Thread(target=waiter, daemon=True).start()
            while not done.is_set():
                during.append(_train_step(x, w, n))
            if errors:
                raise errors[0]
    finally:
        mgr.close()
    written = mgr.latest_step()
    shutil.rmtree(root, ignore_errors=True)
    return {"bytes": int(sum(v.nbytes for v in state.values())), "copy_seconds": copies, "blocked": blocked,
            "base_steps": base, "steps_during_save": during, "latest_step": written}


TASKS = {f.__name__: f for f in (cell_save, cell_load, memcpy, s3_save, balance, async_train)}
