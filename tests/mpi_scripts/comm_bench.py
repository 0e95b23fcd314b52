"""Latency and CPU-share measurements of communicators: ``mpirun -n 4 python comm_bench.py [CASE ...]``.

Not a test (the numbers are measurements, never assertions).  Rank 0 prints one
``BENCH <json>`` line per case.  Every case runs several implementations in the
*same* job, interleaved in blocks, so that the load of a shared machine hits them
alike: the new ``MPIComm`` in each wait mode (``block``, ``hybrid``, ``poll``)
and, if ``COMM_BENCH_OLD`` names a module with another ``MPIComm`` (e.g. the
previous implementation, importable from ``PYTHONPATH``), that one as ``old``.

Cases:
  latency  one ``run`` round (all ranks ready): median and p90 over 8 blocks of 50 rounds
  gb       one gather (``allgather`` where there is no gather) + one small broadcast, likewise
  loop     a 100-round ``run`` loop, 5 times per implementation
  steal    ranks 1..N-1 do ~1 s of CPU and disk work while rank 0 (a) sleeps, (b) waits in a
           barrier: ``ratio`` = workers' time in (b) / in (a) (what a waiting rank costs them),
           ``wake_ms`` = how long after the last worker arrived rank 0 returned
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from distckpt.comm import MPIComm  # noqa: E402


def implementations() -> dict:
    comms = {}
    for mode in os.environ.get("COMM_BENCH_MODES", "block,hybrid,poll").split(","):
        c = MPIComm(timeout=600)
        c._mode, _, spin = mode.partition(":")
        if spin:
            c.SPIN = float(spin)
        comms[mode] = c
    old = os.environ.get("COMM_BENCH_OLD")
    if old:
        comms["old"] = importlib.import_module(old).MPIComm(timeout=600)
    return comms


def timed(n, step) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_us": round(statistics.median(times) * 1e6, 1), "p90_us": round(times[int(0.9 * len(times))] * 1e6, 1)}


def interleaved(comms: dict, make_step, blocks: int = 8, n: int = 50) -> dict:
    got: dict[str, list[float]] = {k: [] for k in comms}
    for c in comms.values():
        timed(20, make_step(c))  # warm up (and make the private communicators)
    for _ in range(blocks):
        for k, c in comms.items():
            got[k] += timed(n, make_step(c))
    return {k: summary(v) for k, v in got.items()}


def latency(comms):
    return interleaved(comms, lambda c: lambda i: c.run("bench.run", lambda: None))


def gather_bcast(comms):
    def make(c):
        report = {"rank": c.rank, "chunks": [[c.rank, i, 4096] for i in range(8)]}
        gather = getattr(c, "gather", None) or (lambda obj, name: c.allgather(obj, name))

        def step(i):
            gather(report, "bench.gather")
            c.broadcast({"ok": i} if c.rank == 0 else None, name="bench.bcast")

        return step

    return interleaved(comms, make)


def loop(comms):
    got: dict[str, list[float]] = {k: [] for k in comms}
    for _ in range(5):
        for k, c in comms.items():
            c.barrier("bench.loop.start")
            t0 = time.perf_counter()
            for _ in range(100):
                c.run("bench.loop", lambda: None)
            got[k].append(time.perf_counter() - t0)
    return {k: {"median_s": round(statistics.median(v), 4), "all_s": [round(x, 4) for x in v]} for k, v in got.items()}


def work(seconds_of_cpu: float, mib: int, path: str) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(int(seconds_of_cpu * 6_000_000)):
        x ^= i * 2654435761 & 0xFFFF
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(path)
    return time.perf_counter() - t0


def steal(comms, reps: int = 3):
    path = os.path.join(tempfile.gettempdir(), f"comm_bench_{os.getpid()}.bin")
    got = {k: {"sleeping": [], "waiting": [], "wake_ms": []} for k in comms}
    for _ in range(reps):
        for k, c in comms.items():
            for phase in ("sleeping", "waiting"):
                c.barrier("bench.steal.start")
                if c.rank == 0:
                    if phase == "sleeping":
                        time.sleep(2.5)
                    c.barrier("bench.steal.end")
                    back = time.time()
                    arrived = c.allgather(None, "bench.steal.t")
                    took = c.allgather(None, "bench.steal.w")
                    got[k][phase].append(statistics.mean(took[1:]))
                    if phase == "waiting":
                        got[k]["wake_ms"].append((back - max(arrived[1:])) * 1e3)
                else:
                    took = work(0.6, 48, path)
                    arrived = time.time()
                    c.barrier("bench.steal.end")
                    c.allgather(arrived, "bench.steal.t")
                    c.allgather(took, "bench.steal.w")
    out = {}
    for k, v in got.items():
        if comms[k].rank == 0:
            s, w = statistics.median(v["sleeping"]), statistics.median(v["waiting"])
            out[k] = {"workers_s_rank0_sleeping": round(s, 3), "workers_s_rank0_waiting": round(w, 3),
                      "ratio": round(w / s, 3), "wake_ms_median": round(statistics.median(v["wake_ms"]), 2)}
    return out


if __name__ == "__main__":
    comms = implementations()
    cases = {"latency": latency, "gb": gather_bcast, "loop": loop, "steal": steal}
    for case in sys.argv[1:] or list(cases):
        result = cases[case](comms)
        if next(iter(comms.values())).rank == 0:
            print("BENCH " + json.dumps({"case": case, "size": next(iter(comms.values())).size, **result}), flush=True)
    for c in comms.values():
        c.barrier("bench.end")
