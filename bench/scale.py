"""Thousands of ranks, millions of chunks (issue 15): what one rank pays, what rank 0 pays.

Run from the repository root (``python -m bench.run --scale`` calls this)::

    python -m bench.scale                  # everything, ~15-25 minutes on a 2-core host
    python -m bench.scale --quick          # smaller worlds, no 10^7 case (a few minutes)

Writes ``bench/results/scale.md``, ``scale.json`` and ``scale.png`` (log-log: seconds against the
checkpoint's chunks).  Every measurement runs in its own child process (``--child``), so its peak
RSS (``ru_maxrss``, from ``os.wait4``) is its own; times are taken inside the child around the
measured call (wall and CPU; the host is shared, so CPU time is the steadier number), and exclude
the interpreter's start.  Nothing here is a test: targets are reported, not asserted.

Cases (tiny tensors: metadata, not bytes, is what is measured):

* ``rank_save``: rank 0's rank-mode ``save(..., rank=0)`` of the same 500 chunks (500 tensors,
  each split over the W ranks) at W in 128, 1024, 4096, 8192: the median of 7 saves;
* ``save_all`` + ``mpi_commit`` + ``finalize`` + ``load_rank``: W ranks x T tensors, every rank saved
  (two child processes, one per core); rank 0's commit of an mpirun save from the ranks' packed
  reports (what ``gather_bytes`` delivers; the transport itself is not measured); ``finalize``
  (timed, RSS); then one rank of a W/2-rank layout
  loading its slices (open, plan, read, verify; every value checked); at 64 x 1000, 128 x 1000,
  256 x 400 (the issue's own point, also with index version 1 for comparison) and 512 x 1000
  (512,000 chunks);
* ``build_big`` + ``plan_big``: a 10^7-chunk checkpoint (8,192 writer files of 1,221 tensors,
  sparse data files of zeros, the index built directly from arrays), then one rank of a 4,096-rank
  layout: the plan (open the index, look up every box, fetch the checksums of the blocks it
  touches) and the whole load of its slices.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "bench", "results")
MiB = 1 << 20

TARGETS = {
    "rank_save_ratio": 2.0,  # rank 0's save at 4096 ranks <= 2x at 128
    "finalize_s": 10.0,  # 512,000 chunks
    "index_bytes_per_chunk": 64,
    "load_s": 2.0,  # one rank of a 256-rank job, 512,000 chunks
    "load_rss_mib": 512,
    "plan_s": 2.0,  # one rank, 10^7 chunks
    "plan_rss_mib": 512,
}


# ------------------------------------------------------------------ the model
def _name(i: int) -> str:
    return f"layers.{i // 8:04d}.experts.{i % 8}.w"


def strategy(world: int, tensors: int) -> dict:
    """Every tensor split over dim 0 across ``world`` ranks (MindSpore strategy JSON)."""
    return {"parallel_layout_item": {_name(i): {"dev_matrix": [world], "tensor_map": [0, -1]} for i in range(tensors)}}


ROWS = 2  # rows per rank and tensor; tensors are (ROWS * world, 4) float32: a rank's chunk is 32 bytes


def rank_state(world: int, tensors: int, rank: int) -> dict:
    import numpy as np

    v = np.full((ROWS, 4), rank % 251, np.float32)
    return {_name(i): v for i in range(tensors)}


def _cpu() -> float:
    return time.process_time()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ child tasks
def task_rank_save(a: dict) -> dict:
    import distckpt

    W, T, reps = a["world"], a["tensors"], a["reps"]
    strat, state = strategy(W, T), rank_state(W, T, 0)
    walls, cpus = [], []
    for k in range(reps):
        path = os.path.join(a["dir"], f"rep{k}")
        c0, t0 = _cpu(), time.perf_counter()
        distckpt.save(state, path, strategy=strat, rank=0)
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
        shutil.rmtree(path)
    walls.sort()
    cpus.sort()
    return {"world": W, "chunks": T, "wall_s": walls[len(walls) // 2], "cpu_s": cpus[len(cpus) // 2],
            "wall_min_s": walls[0], "cpu_min_s": cpus[0], "reps": reps}


def task_save_ranks(a: dict) -> dict:
    import distckpt

    W, T = a["world"], a["tensors"]
    strat = strategy(W, T)
    if a.get("index_version"):
        os.environ["DISTCKPT_INDEX_VERSION"] = str(a["index_version"])
    cpus = []
    t0 = time.perf_counter()
    for r in range(a["lo"], a["hi"]):
        c0 = _cpu()
        distckpt.save(rank_state(W, T, r), a["path"], strategy=strat, rank=r)
        cpus.append(_cpu() - c0)
    cpus.sort()
    return {"ranks": a["hi"] - a["lo"], "wall_s": time.perf_counter() - t0, "cpu_median_s": cpus[len(cpus) // 2]}


def task_finalize(a: dict) -> dict:
    import distckpt

    if a.get("index_version"):
        os.environ["DISTCKPT_INDEX_VERSION"] = str(a["index_version"])
    before = _peak_mib()
    c0, t0 = _cpu(), time.perf_counter()
    distckpt.finalize(a["path"])
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"wall_s": wall, "cpu_s": cpu, "rss_before_mib": before, **index_sizes(a["path"])}


def task_mpi_commit(a: dict) -> dict:
    """Rank 0's commit of an mpirun save, without the transport: the ranks' packed reports (what
    ``gather_bytes`` hands rank 0; a rank-mode save writes exactly those as its manifest tables)
    unpacked, checked, merged and committed (into a scratch directory), as ``SaveJob.run`` does."""
    from distckpt import commit, naming
    from distckpt.storage import open_storage

    path = a["path"]
    heads = {}
    blobs = {}
    for n in os.listdir(path):
        if naming.is_manifest(n):
            with open(os.path.join(path, n)) as f:
                h = json.load(f)
            heads[h["rank"]] = h
            with open(os.path.join(path, h["report"]["name"]), "rb") as f:
                blobs[h["rank"]] = f.read()
    reports = [blobs[r] for r in range(len(blobs))]
    base = heads[0]
    before = _peak_mib()
    c0, t0 = _cpu(), time.perf_counter()
    where = os.path.join(a["out"], "distckpt.index.json")
    parts = [commit.unpack_report(b, where=f"{where} (report of rank {r})") for r, b in enumerate(reports)]
    builder = commit.IndexBuilder(((r, h.get("tensors"), f"rank {r}") for r, (h, _t, _c) in enumerate(parts)),
                                  where=where)
    for r, (h, tb, cb) in enumerate(parts):
        builder.add(r, h.get("files"), h.get("tensors"), tb, cb, where=f"rank {r}")
    parts.clear()
    index = builder.finish(save_id=base["save_id"], world_size=base["world_size"], checksum=base["checksum"],
                           block_size=base["block_size"], strategy=base["strategy"], metadata=base["metadata"],
                           values=base["values"])
    commit.commit(open_storage(a["out"]), index)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, "rss_before_mib": before,
            "report_bytes": sum(len(b) for b in reports)}


def index_sizes(path: str) -> dict:
    from distckpt.index import INDEX_NAME

    with open(os.path.join(path, INDEX_NAME), "rb") as f:
        root = f.read()
    doc = json.loads(root)
    if doc["version"] == 1:
        n = sum(len(t["chunks"]) for t in doc["tensors"].values())
        return {"version": 1, "chunks": n, "root_bytes": len(root), "table_bytes": 0, "crc_bytes": 0,
                "index_bytes_per_chunk": len(root) / n}
    n = doc["chunks"]["count"]
    tb, cb = doc["chunks"]["table"]["size"], doc["chunks"]["crcs"]["size"]
    return {"version": 2, "chunks": n, "root_bytes": len(root), "table_bytes": tb, "crc_bytes": cb,
            "index_bytes_per_chunk": (tb + len(root)) / n, "table_bytes_per_chunk": tb / n}


def task_load_rank(a: dict) -> dict:
    """One rank of a ``target``-rank layout loads its slices: plan (open + look up) and the whole load."""
    import numpy as np

    import distckpt
    from distckpt.plan import plan_load
    from distckpt.sources import open_source
    from distckpt.strategy import load_strategy

    W, T, Wt, r = a["world"], a["tensors"], a["target"], a["rank"]
    strat = load_strategy(strategy(Wt, T))
    before = _peak_mib()
    c0, t0 = _cpu(), time.perf_counter()
    src = open_source(a["path"])
    t_open = time.perf_counter() - t0
    items = plan_load({n: t.shape for n, t in src.tensors.items()}, strat, r)
    src.index.prefetch((it.name, it.box) for it in items)
    plan_wall, plan_cpu = time.perf_counter() - t0, _cpu() - c0
    del src, items
    c0, t0 = _cpu(), time.perf_counter()
    got = distckpt.load(a["path"], strategy=strategy(Wt, T), rank=r)
    load_wall, load_cpu = time.perf_counter() - t0, _cpu() - c0
    rows = ROWS * W // Wt
    want = (np.arange(r * rows, (r + 1) * rows) // ROWS % 251).astype(np.float32)[:, None] * np.ones(4, np.float32)
    bad = [n for n, v in got.items() if not np.array_equal(v, want)]
    if len(got) != T or bad:
        raise AssertionError(f"wrong data in {bad[:3]} ({len(got)} tensors)")
    return {"open_s": t_open, "plan_wall_s": plan_wall, "plan_cpu_s": plan_cpu, "load_wall_s": load_wall,
            "load_cpu_s": load_cpu, "rss_before_mib": before, "tensors": len(got)}


BIG_WORLD = 8192
BIG_TENSORS = 1221
BIG_ROWS = 8  # rows per writer chunk: (8, 1024) bf16 = 16 KiB, four 4-KiB checksum blocks


def task_build_big(a: dict) -> dict:
    """A 10^7-chunk checkpoint: sparse data files of zeros, the index committed from arrays."""
    import crc32c
    import numpy as np

    from distckpt import commit, naming
    from distckpt.chunktable import ChunkTable, TensorSpecs
    from distckpt.execute import chunk_block_size
    from distckpt.index import Index
    from distckpt.storage import open_storage

    W, T, R = a.get("world", BIG_WORLD), a.get("tensors", BIG_TENSORS), BIG_ROWS
    path = a["path"]
    os.makedirs(path, exist_ok=True)
    sid = naming.new_save_id()
    chunk_bytes = R * 1024 * 2
    bs = chunk_block_size(chunk_bytes)
    nb = -(-chunk_bytes // bs)
    c0, t0 = _cpu(), time.perf_counter()
    names = sorted(_name(i) for i in range(T))
    fnames = [naming.data_file(sid, k) for k in range(W)]
    fsize = 8 + T * chunk_bytes  # an 8-byte header of zeros, then the chunks: enough for the index to name
    for f in fnames:
        with open(os.path.join(path, f), "wb") as fh:
            fh.truncate(fsize)  # sparse
    C = W * T
    tid = np.repeat(np.arange(T, dtype=np.int64), W)
    k = np.tile(np.arange(W, dtype=np.int64), T)
    offs = np.zeros((C, 2), np.int64)
    offs[:, 0] = k * R
    sizes = np.empty((C, 2), np.int64)
    sizes[:, 0], sizes[:, 1] = R, 1024
    start = 8 + tid * chunk_bytes
    crcs = np.full(C * nb, crc32c.crc32c(bytes(bs)), np.uint32)
    specs = TensorSpecs.of([(R * W, 1024)] * T, [2] * T, names)
    table = ChunkTable.from_arrays(
        tensor_ids=tid, offsets=offs, sizes=sizes, file=k, start=start, block_log2=np.full(C, bs.bit_length() - 1),
        crc_start=np.arange(C, dtype=np.int64) * nb, crcs=crcs, file_rank=np.arange(W), tensor_shapes=specs,
        file_sizes=[fsize] * W, file_names=fnames, where="big", check=False,
    )
    del tid, k, offs, sizes, start, crcs
    index = Index.of_table(table, dtype_names=["bfloat16"] * T, file_names=fnames, save_id=sid, world_size=W,
                           strategy=None)
    commit.commit(open_storage(path), index)
    return {"chunks": C, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0, **index_sizes(path)}


def task_plan_big(a: dict) -> dict:
    import numpy as np

    import distckpt
    from distckpt.execute import ReadStats
    from distckpt.plan import plan_load
    from distckpt.sources import open_source
    from distckpt.strategy import load_strategy

    T, Wt, r = a.get("tensors", BIG_TENSORS), a["target"], a["rank"]
    strat_doc = strategy(Wt, T)
    strat = load_strategy(strat_doc)
    before = _peak_mib()
    c0, t0 = _cpu(), time.perf_counter()
    src = open_source(a["path"])
    t_open = time.perf_counter() - t0
    items = plan_load({n: t.shape for n, t in src.tensors.items()}, strat, r)
    src.index.prefetch((it.name, it.box) for it in items)
    # the checksums of every block the plan's reads touch, as a load fetches them (one read per chunk)
    nsum = 0
    for it in items:
        for _i, c, _inter in src.tensors[it.name].overlapping(it.box):
            crcs: Any = c.crcs  # a CrcSpan: the chunk's checksums, read from the column on demand
            nsum += len(crcs.span(0, len(crcs))) if crcs is not None else 0
    plan_wall, plan_cpu = time.perf_counter() - t0, _cpu() - c0
    plan_peak = _peak_mib()
    del src, items
    st = ReadStats()
    c0, t0 = _cpu(), time.perf_counter()
    got = distckpt.load(a["path"], strategy=strat_doc, rank=r, stats=st)
    load_wall, load_cpu = time.perf_counter() - t0, _cpu() - c0
    nbytes = sum(int(v.nbytes) for v in got.values())
    if len(got) != T or any(np.asarray(v).view(np.uint16).any() for v in got.values()):
        raise AssertionError("the sparse checkpoint should read as zeros")
    return {"open_s": t_open, "plan_wall_s": plan_wall, "plan_cpu_s": plan_cpu, "plan_peak_rss_mib": plan_peak,
            "checksums_fetched": nsum, "load_wall_s": load_wall, "load_cpu_s": load_cpu, "loaded_bytes": nbytes,
            "rss_before_mib": before, "tensors": len(got), "read": st.to_json()}


TASKS = {f.__name__[5:]: f for f in (task_rank_save, task_save_ranks, task_mpi_commit, task_finalize, task_load_rank,
                                      task_build_big, task_plan_big)}


# ------------------------------------------------------------------ runner
def run_child(task: str, args: dict, *, log_dir: str, timeout: float = 7200) -> dict:
    """``task`` in a fresh interpreter; its JSON result plus ``peak_rss_mib`` (the child's ru_maxrss)."""
    fd, out = tempfile.mkstemp(prefix=f"{task}-", suffix=".json", dir=log_dir)
    os.close(fd)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DISTCKPT_INDEX_VERSION", None)
    with open(os.path.join(log_dir, f"{task}.log"), "ab") as lf:
        p = subprocess.Popen([sys.executable, "-m", "bench.scale", "--child", task, json.dumps(args), out],
                             cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT)
        t0 = time.perf_counter()
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.02)
    if os.waitstatus_to_exitcode(status) != 0:
        with open(os.path.join(log_dir, f"{task}.log"), "rb") as lf:
            tail = lf.read()[-3000:].decode(errors="replace")
        raise RuntimeError(f"{task} {args} failed:\n{tail}")
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    res["peak_rss_mib"] = ru.ru_maxrss / 1024
    return res


def save_all(path: str, world: int, tensors: int, log_dir: str, *, index_version: int | None = None) -> dict:
    """Every rank's rank-mode save, the ranks split over two child processes (one per core)."""
    half = world // 2
    jobs = [dict(path=path, world=world, tensors=tensors, lo=lo, hi=hi, index_version=index_version)
            for lo, hi in ((0, half), (half, world))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        parts = list(ex.map(lambda j: run_child("save_ranks", j, log_dir=log_dir), jobs))
    return {"wall_s": time.perf_counter() - t0, "rank_cpu_median_s": max(p["cpu_median_s"] for p in parts)}


def measure(work: str, quick: bool, log: Callable[[str], None]) -> dict:
    out: dict = {"rank_save": [], "checkpoints": [], "big": None}
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    for W in ((128, 1024) if quick else (128, 1024, 4096, 8192)):
        d = os.path.join(work, f"rs{W}")
        os.makedirs(d, exist_ok=True)
        r = run_child("rank_save", {"world": W, "tensors": 500, "reps": 7, "dir": d}, log_dir=logs)
        out["rank_save"].append(r)
        log(f"rank 0's save, W={W}: {r['cpu_s']:.3f} s CPU, {r['wall_s']:.3f} s wall, {r['peak_rss_mib']:.0f} MiB")
        shutil.rmtree(d)
    cases = [(64, 200, 1), (64, 200, 2)] if quick else [(256, 400, 1), (256, 400, 2), (64, 1000, 2), (128, 1000, 2),
                                                         (512, 1000, 2)]
    for W, T, ver in cases:
        path = os.path.join(work, f"ck{W}x{T}v{ver}")
        s = save_all(path, W, T, logs, index_version=ver)
        mc = None
        if ver == 2:
            os.makedirs(path + ".commit")
            mc = run_child("mpi_commit", {"path": path, "out": path + ".commit"}, log_dir=logs)
            shutil.rmtree(path + ".commit")
        f = run_child("finalize", {"path": path, "index_version": ver}, log_dir=logs)
        ld = run_child("load_rank", {"path": path, "world": W, "tensors": T, "target": W // 2, "rank": W // 4 + 1},
                       log_dir=logs)
        row = {"world": W, "tensors": T, "version": ver, "chunks": W * T, "save_all": s, "mpi_commit": mc, "finalize": f,
               "load": ld}
        out["checkpoints"].append(row)
        log(f"{W} x {T} v{ver}: all saves {s['wall_s']:.1f} s; mpirun commit {mc['wall_s'] if mc else 0:.2f} s; "
            f"finalize {f['wall_s']:.2f} s ({f['cpu_s']:.2f} CPU), "
            f"{f['peak_rss_mib']:.0f} MiB; index {f['index_bytes_per_chunk']:.1f} B/chunk; one rank of {W // 2}: "
            f"plan {ld['plan_wall_s']:.2f} s, load {ld['load_wall_s']:.2f} s, {ld['peak_rss_mib']:.0f} MiB")
        shutil.rmtree(path)
    if not quick:
        path = os.path.join(work, "big")
        b = run_child("build_big", {"path": path}, log_dir=logs)
        log(f"10^7 checkpoint built: {b['chunks']} chunks in {b['wall_s']:.1f} s, table {b['table_bytes'] / MiB:.0f} MiB, "
            f"checksums {b['crc_bytes'] / MiB:.0f} MiB, {b['peak_rss_mib']:.0f} MiB peak")
        p = run_child("plan_big", {"path": path, "target": 4096, "rank": 1234}, log_dir=logs)
        log(f"10^7: plan {p['plan_wall_s']:.2f} s ({p['plan_cpu_s']:.2f} CPU), plan peak {p['plan_peak_rss_mib']:.0f} MiB; "
            f"load {p['load_wall_s']:.2f} s, peak {p['peak_rss_mib']:.0f} MiB")
        out["big"] = {"build": b, "plan": p}
        shutil.rmtree(path)
    return out


# ------------------------------------------------------------------ report
def _ok(good: bool) -> str:
    return "yes" if good else "**no**"


def _mc_col(c: dict) -> str:
    mc = c.get("mpi_commit")
    return f"{mc['wall_s']:.2f} ({mc['peak_rss_mib']:.0f})" if mc else "—"


def _crc_col(c: dict) -> str:
    return f"{c['finalize']['crc_bytes'] / c['chunks']:.1f}" if c["version"] == 2 else "(in the JSON)"


def report(res: dict) -> str:
    rs = {r["world"]: r for r in res["rank_save"]}
    lines = ["# Scale: thousands of ranks, millions of chunks (issue 15)", "",
             f"Host: {res['host']}; {res['date']}.  Every number is measured inside its own child process "
             "(peak RSS = the child's ru_maxrss, interpreter included).  CPU seconds are the steadier number on "
             "this shared 2-core host; wall seconds are what a user waits.", "",
             "## Rank 0's rank-mode save of the same 500 chunks", "",
             "| ranks W | chunks in the job | CPU s (median of 7) | wall s (median) | peak RSS MiB |",
             "|---:|---:|---:|---:|---:|"]
    for W, r in sorted(rs.items()):
        lines.append(f"| {W:,} | {500 * W:,} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | {r['peak_rss_mib']:.0f} |")
    if 128 in rs and 4096 in rs:
        ratio = rs[4096]["cpu_s"] / rs[128]["cpu_s"]
        lines += ["", f"4,096 ranks vs 128: {ratio:.2f}x CPU (target <= {TARGETS['rank_save_ratio']}x: "
                      f"{_ok(ratio <= TARGETS['rank_save_ratio'])}); wall {rs[4096]['wall_s'] / rs[128]['wall_s']:.2f}x."]
    lines += ["", "## Whole checkpoints: every rank saved (rank mode), finalize, one rank loads its slices", "",
              "| ranks x tensors | chunks | index | all saves s (2 procs) | one rank's save CPU s | finalize s (CPU) "
              "| finalize RSS MiB | mpirun commit on rank 0 s (RSS MiB) | index B/chunk (table + root) | checksums B/chunk "
              "| one rank of W/2: plan s | load s | load RSS MiB |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["checkpoints"]:
        f, ld, s = c["finalize"], c["load"], c["save_all"]
        lines.append(
            f"| {c['world']} x {c['tensors']} | {c['chunks']:,} | v{c['version']} | {s['wall_s']:.1f} | "
            f"{s['rank_cpu_median_s']:.3f} | {f['wall_s']:.2f} ({f['cpu_s']:.2f}) | {f['peak_rss_mib']:.0f} | "
            f"{_mc_col(c)} | "
            f"{f['index_bytes_per_chunk']:.1f} | {_crc_col(c)} | "
            f"{ld['plan_wall_s']:.2f} | "
            f"{ld['load_wall_s']:.2f} | {ld['peak_rss_mib']:.0f} |")
    big = next((c for c in res["checkpoints"] if c["chunks"] == 512_000 and c["version"] == 2), None)
    if big:
        f, ld = big["finalize"], big["load"]
        mc = big.get("mpi_commit") or {"wall_s": float("nan")}
        lines += ["", "Targets at 512,000 chunks: "
                  f"finalize {f['wall_s']:.2f} s <= {TARGETS['finalize_s']} s: {_ok(f['wall_s'] <= TARGETS['finalize_s'])}; "
                  f"the mpirun commit on rank 0 {mc['wall_s']:.2f} s: {_ok(mc['wall_s'] <= TARGETS['finalize_s'])}; "
                  f"index {f['index_bytes_per_chunk']:.1f} B/chunk <= {TARGETS['index_bytes_per_chunk']}: "
                  f"{_ok(f['index_bytes_per_chunk'] <= TARGETS['index_bytes_per_chunk'])}; "
                  f"one rank of 256 loads in {ld['load_wall_s']:.2f} s <= {TARGETS['load_s']} s: "
                  f"{_ok(ld['load_wall_s'] <= TARGETS['load_s'])}, peak RSS {ld['peak_rss_mib']:.0f} MiB <= "
                  f"{TARGETS['load_rss_mib']}: {_ok(ld['peak_rss_mib'] <= TARGETS['load_rss_mib'])}."]
    if res.get("big"):
        b, p = res["big"]["build"], res["big"]["plan"]
        lines += ["", "## 10^7 chunks: one rank's load plan", "",
                  f"{b['chunks']:,} chunks ({BIG_WORLD:,} writer files x {BIG_TENSORS:,} tensors of bf16, sparse data "
                  f"files); table {b['table_bytes'] / MiB:.0f} MiB ({b['table_bytes_per_chunk']:.1f} B/chunk), checksum "
                  f"column {b['crc_bytes'] / MiB:.0f} MiB, root {b['root_bytes'] / 1024:.0f} KiB; built and committed "
                  f"in {b['wall_s']:.1f} s ({b['peak_rss_mib']:.0f} MiB).", "",
                  "| one rank of 4,096 | seconds (CPU) | peak RSS MiB |", "|---|---:|---:|",
                  f"| open the index | {p['open_s']:.3f} | |",
                  f"| plan: open + look up {p['tensors']:,} boxes + fetch their {p['checksums_fetched']:,} checksums | "
                  f"{p['plan_wall_s']:.2f} ({p['plan_cpu_s']:.2f}) | {p['plan_peak_rss_mib']:.0f} |",
                  f"| whole load ({p['loaded_bytes'] / MiB:.0f} MiB read and verified) | {p['load_wall_s']:.2f} "
                  f"({p['load_cpu_s']:.2f}) | {p['peak_rss_mib']:.0f} |", "",
                  f"Target: plan <= {TARGETS['plan_s']} s: {_ok(p['plan_wall_s'] <= TARGETS['plan_s'])}; RSS <= "
                  f"{TARGETS['plan_rss_mib']} MiB: {_ok(p['plan_peak_rss_mib'] <= TARGETS['plan_rss_mib'])}."]
    lines += ["", "![time against chunks](scale.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    rs = sorted(res["rank_save"], key=lambda r: r["world"])
    ax.plot([500 * r["world"] for r in rs], [r["cpu_s"] for r in rs], "o-", label="rank 0's save of 500 chunks (CPU)")
    big = res.get("big")
    for ver, mk in ((2, "s-"), (1, "x")):
        cs = sorted((c for c in res["checkpoints"] if c["version"] == ver), key=lambda c: c["chunks"])
        if cs:
            ax.plot([c["chunks"] for c in cs], [c["finalize"]["wall_s"] for c in cs], mk,
                    label=f"finalize, index v{ver}")
            loads = [(c["chunks"], c["load"]["load_wall_s"]) for c in cs]
            if ver == 2 and big:
                loads.append((big["build"]["chunks"], big["plan"]["load_wall_s"]))
            ax.plot([x for x, _ in loads], [y for _, y in loads], mk.replace("s", "^"),
                    label=f"one rank of a W/2-rank layout loads its slices, v{ver}")
    pts = [(c["chunks"], c["load"]["plan_wall_s"]) for c in res["checkpoints"] if c["version"] == 2]
    if res.get("big"):
        pts.append((res["big"]["build"]["chunks"], res["big"]["plan"]["plan_wall_s"]))
    pts.sort()
    ax.plot([x for x, _ in pts], [y for _, y in pts], "d-", label="one rank's load plan (open + lookups), v2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("chunks in the checkpoint")
    ax.set_ylabel("seconds")
    ax.set_title("distckpt at scale: per-rank cost flat, rank 0 linear")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller worlds, no 10^7 case")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--out", default=RESULTS, help="where scale.md / scale.json / scale.png go")
    ap.add_argument("--render", action="store_true", help="only re-render scale.md / scale.png from scale.json in --out")
    ap.add_argument("--child", nargs=3, metavar=("TASK", "ARGS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        task, args, out = a.child
        res = TASKS[task](json.loads(args))
        with open(out, "w") as f:
            json.dump(res, f)
        return 0
    if a.render:
        with open(os.path.join(a.out, "scale.json")) as f:
            res = json.load(f)
        with open(os.path.join(a.out, "scale.md"), "w") as f:
            f.write(report(res))
        plot(res, os.path.join(a.out, "scale.png"))
        return 0
    work = a.workdir or tempfile.mkdtemp(prefix="distckpt-scale-")
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    try:
        res = measure(work, a.quick, log)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    import platform

    res.update(host=f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               date=time.strftime("%Y-%m-%d %H:%M"), quick=a.quick, targets=TARGETS)
    with open(os.path.join(a.out, "scale.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "scale.md"), "w") as f:
        f.write(report(res))
    plot(res, os.path.join(a.out, "scale.png"))
    log(f"wrote {os.path.join(a.out, 'scale.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
