"""Measure the columnar chunk table at scale (issue 15): bytes per chunk, build, open, plan, concat.

Run from the repository root::

    python -m bench.scale_chunktable                       # 512,000 and 10^7 chunks, 2-D and 3-D
    python -m bench.scale_chunktable --cases 512k-2d --json out.json

Every measurement runs in its own child process (``--child``), so its peak RSS (``ru_maxrss``) is
its own.  Cases:

* ``512k``: 1,000 tensors x 512 chunks (a 512-rank checkpoint, one chunk per rank and tensor);
* ``10m``: 10,000 tensors x 1,000 chunks (1,000 writer files).

Tensors are bf16 in four shape classes; each is cut into an uneven grid (``np.array_split``
boundaries: 32 x 16 or 40 x 25 in 2-D, 8 x 8 x 8 or 10 x 10 x 10 in 3-D); checksum blocks follow
``distckpt.io.chunk_block_size`` (a power of two near 1/256 of the chunk, at least 4 KiB).  "plan"
is one rank of a 256-rank (and a 128-rank) target layout: its box in every tensor, all overlapping
chunks with their intersections (``overlapping_many``), and the checksums of the bytes those
intersections cover (``blocks_for``).  "concat" is the commit: 512 per-rank tables of 1,000 chunks
(one per tensor), each shipped as bytes, opened, concatenated, fully checked and serialized.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from distckpt.chunktable import ChunkTable, TensorSpecs, concat  # noqa: E402

ITEM = 2  # bf16
CASES = {
    "512k-2d": {"tensors": 1000, "grid": (32, 16), "shapes": [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 1024)]},
    "512k-3d": {"tensors": 1000, "grid": (8, 8, 8), "shapes": [(64, 4096, 1408), (64, 1408, 4096), (32, 2048, 2048), (16, 4096, 4096)]},
    "10m-2d": {"tensors": 10000, "grid": (40, 25), "shapes": [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 1024)]},
    "10m-3d": {"tensors": 10000, "grid": (10, 10, 10), "shapes": [(16, 2048, 1408), (16, 1408, 2048), (32, 1024, 2048), (64, 1024, 1024)]},
}
TARGETS = {2: {256: (16, 16), 128: (8, 16)}, 3: {256: (4, 8, 8), 128: (2, 8, 8)}}


def _rss() -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def _block_log2(nbytes: np.ndarray) -> np.ndarray:
    want = np.maximum(-(-nbytes // 256), 4096)
    return np.minimum(np.ceil(np.log2(want)).astype(np.int64), 20)


def _fake_crcs(n: int, seed: int) -> np.ndarray:
    """Stand-in checksum values (their bytes only need to exist)."""
    return (np.arange(n, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(seed)).astype(np.uint32)


def _grid(shape, grid):
    """Offsets/sizes [G, D] of an uneven np.array_split grid, row-major."""
    bounds = [np.array([len(a) for a in np.array_split(np.arange(n), g)]) for n, g in zip(shape, grid)]
    starts = [np.cumsum(b) - b for b in bounds]
    mesh_o = np.meshgrid(*starts, indexing="ij")
    mesh_s = np.meshgrid(*bounds, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh_o], 1), np.stack([m.reshape(-1) for m in mesh_s], 1)


def generate(case: dict, seed: int = 0):
    """Per-chunk arrays of a whole checkpoint (chunk k of every tensor is in file k)."""
    T, grid, shapes = case["tensors"], case["grid"], case["shapes"]
    G = int(np.prod(grid))
    cls = np.arange(T) % len(shapes)
    co = np.stack([_grid(s, grid)[0] for s in shapes])  # [K, G, D]
    cs = np.stack([_grid(s, grid)[1] for s in shapes])
    offs = co[cls].reshape(T * G, -1)
    sizes = cs[cls].reshape(T * G, -1)
    lengths = (np.prod(cs, axis=2) * ITEM)[cls]  # [T, G]
    start = (np.cumsum(lengths, axis=0) - lengths).reshape(-1)
    file_sizes = lengths.sum(axis=0)
    lengths = lengths.reshape(-1)
    bl = _block_log2(lengths)
    nb = -(-lengths // (1 << bl))
    crcs = _fake_crcs(int(nb.sum()), seed)
    return dict(
        tensor_ids=np.repeat(np.arange(T), G),
        offsets=offs,
        sizes=sizes,
        file=np.tile(np.arange(G), T),
        start=start,
        block_log2=bl,
        crc_start=np.cumsum(nb) - nb,
        crcs=crcs,
        tensor_shapes=[shapes[c] for c in cls],
        tensor_itemsizes=[ITEM] * T,
        file_sizes=file_sizes.tolist(),
        file_rank=np.arange(G),
    )


def _write(path: str, parts) -> None:
    with open(path, "wb") as f:
        for p in parts:
            f.write(p)


# ------------------------------------------------------------------ child tasks
def task_build(a: dict) -> dict:
    case = CASES[a["case"]]
    t0 = time.perf_counter()
    arrays = generate(case)
    t_gen = time.perf_counter() - t0
    shuffle = a.get("shuffle", False)
    if shuffle:
        perm = np.random.default_rng(1).permutation(len(arrays["file"]))
        for k in ("tensor_ids", "offsets", "sizes", "file", "start", "block_log2", "crc_start"):
            arrays[k] = arrays[k][perm]
    c0, t0 = time.process_time(), time.perf_counter()
    table = ChunkTable.from_arrays(**arrays, where=a["case"], check=False)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    table.check()
    t_check = time.perf_counter() - t0
    t0 = time.perf_counter()
    tparts, cparts = table.to_parts()
    t_ser = time.perf_counter() - t0
    t0 = time.perf_counter()
    _write(a["table"], tparts)
    _write(a["crcs"], cparts)
    t_write = time.perf_counter() - t0
    C = table.n_chunks
    tsize, csize = os.path.getsize(a["table"]), os.path.getsize(a["crcs"])
    meta = {"tensor_shapes": arrays["tensor_shapes"], "file_sizes": arrays["file_sizes"]}
    with open(a["meta"], "w") as f:
        json.dump(meta, f)
    return {
        "chunks": C,
        "tensors": table.n_tensors,
        "ndim": table.ndim,
        "offsets_dtype": str(table.offsets.dtype),
        "table_bytes": tsize,
        "table_bytes_per_chunk": tsize / C,
        "crc_bytes": csize,
        "crcs_per_chunk": table.n_crcs / C,
        "generate_s": t_gen,
        "build_s": t_build,
        "build_cpu_s": c_build,
        "input_shuffled": shuffle,
        "check_all_s": t_check,
        "serialize_s": t_ser,
        "write_s": t_write,
        **_rss(),
    }


def _rank_boxes(shapes, ndims_split, rank):
    offs, sizes = [], []
    coords = np.unravel_index(rank, ndims_split)
    for s in shapes:
        sz = [n // k for n, k in zip(s, ndims_split)]
        offs.append([c * z for c, z in zip(coords, sz)])
        sizes.append(sz)
    return np.array(offs, np.int64), np.array(sizes, np.int64)


def _covering_bytes(hits):
    """First and last byte (exclusive) of each intersection inside its C-order chunk."""
    co, cs = hits.chunk_offsets, hits.chunk_sizes
    strides = np.ones_like(cs)
    for d in range(cs.shape[1] - 2, -1, -1):
        strides[:, d] = strides[:, d + 1] * cs[:, d + 1]
    first = ((hits.inter_offsets - co) * strides).sum(1)
    last = ((hits.inter_offsets + hits.inter_sizes - 1 - co) * strides).sum(1)
    return first * ITEM, (last + 1) * ITEM


def _open(a: dict, shapes, meta):
    fd = os.open(a["table"], os.O_RDONLY)
    mt = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    os.close(fd)
    return ChunkTable.from_buffer(
        mt, None, n_tensors=len(shapes), file_sizes=meta["file_sizes"], tensor_shapes=shapes,
        tensor_itemsizes=[ITEM] * len(shapes), where=a["table"],
    )


def task_plan(a: dict) -> dict:
    """One rank's load plan: open (mmap), lookups for its box in every tensor, checksums via pread."""
    with open(a["meta"]) as f:
        meta = json.load(f)
    shapes = [tuple(s) for s in meta["tensor_shapes"]]
    before = _rss()
    c0 = time.process_time()
    t0 = time.perf_counter()
    table = _open(a, shapes, meta)
    t_open, c_open = time.perf_counter() - t0, time.process_time() - c0
    fd_c = os.open(a["crcs"], os.O_RDONLY)

    def read(off: int, n: int) -> bytes:
        return os.pread(fd_c, n, off)

    out: dict = {"open_s": t_open, "open_cpu_s": c_open, "rss_before_open": before, "rss_after_open": _rss()}
    for world in (256, 128):
        split = TARGETS[len(shapes[0])][world]
        rank = 37 % world
        bo, bs = _rank_boxes(shapes, split, rank)
        c0, t0 = time.process_time(), time.perf_counter()
        hits = table.overlapping_many(np.arange(len(shapes)), bo, bs)
        t_look, c_look = time.perf_counter() - t0, time.process_time() - c0
        lo, hi = _covering_bytes(hits)
        c0, t0 = time.process_time(), time.perf_counter()
        blocks = table.fetch_crcs(hits.block_spans(lo, hi), read=read)
        t_blocks, c_blocks = time.perf_counter() - t0, time.process_time() - c0
        needed = int(np.prod(hits.inter_sizes, axis=1).sum())
        want = int(sum(int(np.prod(s)) for s in bs))
        out[f"world{world}"] = {
            "plan_s": t_open + t_look + t_blocks,
            "plan_cpu_s": c_open + c_look + c_blocks,
            "lookup_s": t_look,
            "lookup_cpu_s": c_look,
            "blocks_s": t_blocks,
            "blocks_cpu_s": c_blocks,
            "hits": len(hits.chunk_ids),
            "crcs_fetched": int(len(blocks.crcs)),
            "elements_covered_ok": needed == want,
        }
        del hits, blocks, lo, hi
    out.update(_rss())
    os.close(fd_c)
    return out


def task_verify(a: dict) -> dict:
    """Every rule on every chunk (what commit and verify pay), from the mmap'ed table."""
    with open(a["meta"]) as f:
        meta = json.load(f)
    shapes = [tuple(s) for s in meta["tensor_shapes"]]
    table = _open(a, shapes, meta)
    c0, t0 = time.process_time(), time.perf_counter()
    table.check()
    t_check, c_check = time.perf_counter() - t0, time.process_time() - c0
    after_check = _rss()
    c0, t0 = time.process_time(), time.perf_counter()
    table.check(files=True)
    t_files, c_files = time.perf_counter() - t0, time.process_time() - c0
    return {"check_all_s": t_check, "check_all_cpu_s": c_check, "rss_after_check": after_check,
            "check_files_s": t_files, "check_files_cpu_s": c_files, **_rss()}


def task_concat(a: dict) -> dict:
    """512 per-rank tables of 1,000 chunks (one per tensor), as the commit receives them."""
    ranks, T = a["ranks"], a["tensors"]
    shapes = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 1024)]
    tshapes = [shapes[t % 4] for t in range(T)]
    specs = TensorSpecs.of(tshapes, [ITEM] * T)  # the commit builds this once from the index root
    grid = (32, 16)
    blobs = []
    fsz = []
    t0 = time.perf_counter()
    cells = [_grid(s, grid) for s in shapes]
    for r in range(ranks):
        offs = np.stack([cells[t % 4][0][r] for t in range(T)])
        sizes = np.stack([cells[t % 4][1][r] for t in range(T)])
        lengths = np.prod(sizes, 1) * ITEM
        start = np.cumsum(lengths) - lengths
        bl = _block_log2(lengths)
        nb = -(-lengths // (1 << bl))
        crcs = _fake_crcs(int(nb.sum()), r)
        tb = ChunkTable.from_arrays(
            tensor_ids=np.arange(T), offsets=offs, sizes=sizes, file=np.zeros(T, np.int64), start=start,
            block_log2=bl, crc_start=np.cumsum(nb) - nb, crcs=crcs, file_rank=[r],
            tensor_shapes=specs, file_sizes=[int(lengths.sum())], where=f"rank {r}",
            partial=True,
        )
        blobs.append(tb.to_bytes())
        fsz.append(int(lengths.sum()))
    t_ranks = time.perf_counter() - t0
    c_start = time.process_time()
    t0 = time.perf_counter()
    # structural checks only: the merged table is checked in full below
    tables = [
        ChunkTable.from_buffer(tb, cb, n_tensors=T, file_sizes=[fsz[r]], tensor_shapes=specs,
                               where=f"rank {r} report", partial=True)
        for r, (tb, cb) in enumerate(blobs)
    ]
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = concat(tables, where="commit")
    t_concat = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged.check(files=True)
    t_check = time.perf_counter() - t0
    t0 = time.perf_counter()
    tb, cb = merged.to_bytes()
    t_ser = time.perf_counter() - t0
    c_commit = time.process_time() - c_start
    return {
        "commit_cpu_s": c_commit,
        "ranks": ranks,
        "chunks": merged.n_chunks,
        "per_rank_build_s": t_ranks,
        "open_reports_s": t_open,
        "concat_s": t_concat,
        "check_full_s": t_check,
        "serialize_s": t_ser,
        "commit_total_s": t_open + t_concat + t_check + t_ser,
        "table_bytes_per_chunk": len(tb) / merged.n_chunks,
        **_rss(),
    }


TASKS = {"build": task_build, "plan": task_plan, "verify": task_verify, "concat": task_concat}


def run_child(task: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-m", "bench.scale_chunktable", "--child", task, json.dumps(args)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )
    if res.returncode:
        raise RuntimeError(f"{task} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="512k-2d,512k-3d,10m-2d,10m-3d")
    p.add_argument("--no-concat", action="store_true")
    p.add_argument("--shuffle", action="store_true", help="build from rows in random order (measures the sort)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=2, metavar=("TASK", "ARGS"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        print(json.dumps(TASKS[ns.child[0]](json.loads(ns.child[1]))))
        return 0
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=ns.workdir) as tmp:
        for case in ns.cases.split(","):
            paths = {k: os.path.join(tmp, f"{case}.{k}") for k in ("table", "crcs", "meta")}
            b = run_child("build", {"case": case, "shuffle": ns.shuffle, **paths})
            pl = run_child("plan", {"case": case, **paths})
            ve = run_child("verify", {"case": case, **paths})
            results[case] = {"build": b, "plan": pl, "verify": ve}
            print(f"{case}: {json.dumps(results[case], indent=1)}", flush=True)
            for f in paths.values():
                os.unlink(f)
        if not ns.no_concat:
            results["concat-512x1000"] = run_child("concat", {"ranks": 512, "tensors": 1000})
            print(f"concat: {json.dumps(results['concat-512x1000'], indent=1)}", flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
