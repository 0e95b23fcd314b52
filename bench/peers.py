"""distckpt side by side with its strongest peers and the machine's limits (issue 13, DESIGN §4).

``bench/run.py`` calls :func:`run_peers`; it returns one JSON-able dict that
``bench/report.py`` turns into ``latest.md`` and ``latest.png``.  Rows, in the order run:

1. ``save4``  N ranks save the row-sharded model: distckpt under ``mpirun -n N --oversubscribe``
   vs PyTorch DCP under ``torchrun`` (gloo, DTensor ``Shard(0)``, ``FileSystemWriter(sync_files=True)``)
   vs the raw disk (same bytes, one file per rank, fsync).  Alternated run by run.
2. ``load2``  M ranks load it as column shards (a reshard): distckpt ``load(strategy=cols, rank=r)`` vs
   DCP ``dcp.load`` into DTensors ``Shard(1)``; every page touched; values checked by fingerprint.
3. ``cell_save`` one process saves a MindSpore Cell: ``distckpt.save(cell_state(cell))`` vs
   ``mindformers.checkpoint.checkpoint.save_checkpoint`` + ``os.sync()`` vs raw write + fsync.
4. ``cell_load`` one process loads it back, every page touched: distckpt (checksums verified; and
   ``verify=False``) vs ``mindformers.checkpoint.checkpoint.load_checkpoint`` into a Cell.
5. ``s3``  N ranks load from a counting moto S3 server as DP-N replicas and as DP2 x TP2:
   bytes served / bytes needed once (``cooperative=`` passed when ``distckpt.load`` accepts it).
6. limits: ``cat FILES > /dev/null`` of each checkpoint right after it was written (page-cache read),
   numpy memcpy of the same bytes (best of N), raw write + fsync (rows 1 and 3).
7. ``balance``  max / mean bytes written per rank, from the saved checkpoints' index.
8. ``async``  one process trains (a one-core numpy step) while ``CheckpointManager(async_save=True)``
   saves the row-3 state in the background: step time during a save / without, and the blocked
   time of ``save`` / a copy of the same arrays into touched buffers (the staging floor).

Timing of multi-rank rows happens inside the ranks (``bench/rankjob.py``): barrier, clock, work,
clock, barrier; the row's time is last leave - first enter.  Peak RSS is each process's
``ru_maxrss``; multi-rank rows report the max over ranks (the compared number) and the sum.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.model import MiB, block_data, fingerprint, peer_model, strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS = {
    "save_vs_dcp": 1.0,
    "load_vs_dcp": 1.0,
    "rss_vs_dcp": 1.0,
    "cell_save_vs_mf": 1.0,
    "cell_load_vs_mf": 1.5,
    "cell_load_noverify_vs_mf": 1.0,
    "cooperative": 1.05,
    "vs_limit": 2.0,
    "balance": 1.25,
    "async_step": 1.10,
    "async_blocked": 1.2,
}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOG_v", "3")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def _mpirun() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return cand if os.path.exists(cand) else (shutil.which("mpirun") or "mpirun")


def median(xs):
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------ launching
class LaunchFailed(RuntimeError):
    pass


def _wait(p: subprocess.Popen, timeout: float):
    deadline = time.perf_counter() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            return status, ru
        if time.perf_counter() > deadline:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            return status, ru
        time.sleep(0.01)


def launch(launcher: str, n: int, task: str, args: dict, *, logs: str, env: dict | None = None,
           timeout: float = 1800) -> dict:
    """Run ``bench.rankjob TASK`` on ``n`` ranks under ``mpirun`` or ``torchrun``; aggregate the ranks."""
    out = tempfile.mkdtemp(prefix=f"{task}-{args.get('tool', '')}-", dir=logs)
    job = [sys.executable, "-m", "bench.rankjob", task, json.dumps(args), out]
    if launcher == "mpirun":
        cmd = [_mpirun(), "-n", str(n), "--oversubscribe", *job]
    else:  # torchrun is torch.distributed.run's console script
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *job[1:]]
    log = out + ".log"
    load = os.getloadavg()[0]
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=lf, stderr=subprocess.STDOUT)
        status, ru = _wait(p, timeout)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    ranks = []
    for r in range(n):
        try:
            with open(os.path.join(out, f"rank-{r}.json")) as f:
                ranks.append(json.load(f))
        except OSError:
            pass
    if code != 0 or len(ranks) != n:
        with open(log, "rb") as lf:
            tail = lf.read()[-4000:].decode(errors="replace")
        raise LaunchFailed(f"{launcher} {task} {args.get('tool')} failed (exit {code}, {len(ranks)}/{n} ranks); log {log}:\n{tail}")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": max(r["leave"] for r in ranks) - min(r["enter"] for r in ranks),
        "wall_seconds": wall,
        "peak_rss_max": max(r["peak_rss"] for r in ranks),
        "peak_rss_sum": sum(r["peak_rss"] for r in ranks),
        "growth_max": max(r["peak_rss"] - r["rss_before"] for r in ranks),
        "launcher_maxrss": ru.ru_maxrss * 1024,
        "loadavg": load,
        "ranks": ranks,
    }


def run_child(task: str, args: dict, *, logs: str, cwd: str | None = None, env: dict | None = None,
              timeout: float = 1800) -> dict:
    """One ``bench.child`` task in a fresh interpreter; adds whole-process wall and peak RSS (wait4)."""
    fd, result = tempfile.mkstemp(prefix=f"{task}-", suffix=".json", dir=logs)
    os.close(fd)
    log = result[:-5] + ".log"
    cmd = [sys.executable, "-m", "bench.child", task, json.dumps(args), result]
    load = os.getloadavg()[0]
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd or ROOT, env=_env(env), stdout=lf, stderr=subprocess.STDOUT)
        status, ru = _wait(p, timeout)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log, "rb") as lf:
            tail = lf.read()[-4000:].decode(errors="replace")
        raise LaunchFailed(f"{task} {args.get('tool', '')} failed (exit {code}); log {log}:\n{tail}")
    with open(result) as f:
        out = json.load(f)
    os.unlink(result)
    os.unlink(log)
    out["wall_seconds"] = wall
    out["peak_rss"] = ru.ru_maxrss * 1024
    out["loadavg"] = load
    return out


def cat_seconds(path: str) -> dict:
    """Page-cache read limit: ``cat FILES > /dev/null`` of every file under ``path``."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return {"seconds": time.perf_counter() - t0, "bytes": sum(os.path.getsize(f) for f in files), "files": len(files)}


def writer_bytes(path: str) -> list[int]:
    """Bytes written by each rank of a distckpt checkpoint: chunk lengths by their ``rank`` field from
    the v1 JSON index, else data-file sizes by the rank number that ends the file name."""
    root = None
    for name in os.listdir(path):
        if name.startswith("distckpt.index") and name.endswith(".json"):
            with open(os.path.join(path, name)) as f:
                root = json.load(f)
            break
    world = int(root.get("world_size", 1)) if isinstance(root, dict) else 1
    per = [0] * world
    tensors = root.get("tensors") if isinstance(root, dict) else None
    if (isinstance(tensors, dict) and all(isinstance(t, dict) for t in tensors.values())  # v1 (v2 lists no chunks)
            and all(isinstance(c.get("rank"), int) for t in tensors.values() for c in t.get("chunks", []))):
        for t in tensors.values():
            for c in t.get("chunks", []):
                per[c["rank"]] += int(c["length"])
        return per
    for name in os.listdir(path):
        stem = name.rsplit(".", 1)[0]
        tail = stem.rsplit("-", 1)[-1]
        if name.startswith("data") and tail.isdigit():
            r = int(tail)
            if r >= len(per):
                per += [0] * (r + 1 - len(per))
            per[r] += os.path.getsize(os.path.join(path, name))
    return per


def balance_of(per: list[int]) -> dict:
    mean = sum(per) / len(per) if per else 0
    return {"per_rank": per, "max_over_mean": (max(per) / mean) if mean else None}


def _rotate(tools: list[str], rep: int) -> list[str]:
    k = rep % len(tools)
    return tools[k:] + tools[:k]


# ----------------------------------------------------------------------- rows
def expected_cols(size: int, saved_ranks: int, load_ranks: int) -> list[dict]:
    """Fingerprints of what each rank of the column-sharded load must hold."""
    m = peer_model(size, head=True)
    out: list[dict] = [{} for _ in range(load_ranks)]
    for name, shape, _ in m.tensors:
        full = np.concatenate([block_data(name, shape, p, saved_ranks) for p in range(saved_ranks)]) if len(shape) > 1 \
            else block_data(name, shape, 0, 1)
        for r in range(load_ranks):
            if len(shape) == 1:
                out[r][name] = fingerprint(full)
            else:
                w = shape[1] // load_ranks
                out[r][name] = fingerprint(full[:, r * w : (r + 1) * w])
        del full
    return out


def _values_ok(run: dict, expected: list[dict]) -> bool:
    return all(r["fingerprints"] == expected[r["rank"]] for r in run["ranks"])


def _strip(run: dict) -> dict:
    """A launch result without the per-tensor fingerprints (kept small in latest.json)."""
    return {**run, "ranks": [{k: v for k, v in r.items() if k != "fingerprints"} for r in run["ranks"]]}


def multi_rank_rows(a, work: str, logs: str, use_dcp: bool) -> dict:
    m = peer_model(a.save_size, head=True)
    n, nl = a.save_ranks, a.load_ranks
    base = {"size": a.save_size, "head": True}
    tools = ["distckpt", "dcp", "raw"] if use_dcp else ["distckpt", "raw"]
    runs: dict[str, list] = {t: [] for t in tools}
    cats: dict[str, list] = {"distckpt": [], "dcp": []}
    kept: dict[str, str] = {}
    say(f"row 1: {n} ranks save {m.nbytes / MiB:.0f} MiB ({', '.join(tools)}), {a.reps} alternated repetitions")
    for rep in range(a.reps):
        for tool in _rotate(tools, rep):
            path = os.path.join(work, f"save-{tool}-{rep}")
            shutil.rmtree(path, ignore_errors=True)
            launcher = "torchrun" if tool == "dcp" else "mpirun"
            r = launch(launcher, n, "save", {**base, "tool": tool, "path": path}, logs=logs)
            runs[tool].append(_strip(r))
            if tool in cats:
                cats[tool].append(cat_seconds(path))
            if tool in kept:
                shutil.rmtree(kept[tool], ignore_errors=True)
            if tool == "raw":
                shutil.rmtree(path, ignore_errors=True)
            else:
                kept[tool] = path
    out: dict = {"model_bytes": m.nbytes, "tensors": len(m.tensors), "ranks": n, "save": runs, "cat_after_save": cats}
    out["balance"] = {"row shards (the row-1 save)": balance_of(writer_bytes(kept["distckpt"]))}

    say(f"row 2: {nl} ranks load it as column shards ({'distckpt, dcp' if use_dcp else 'distckpt'})")
    expected = expected_cols(a.save_size, n, nl)
    ltools = ["distckpt", "dcp"] if use_dcp else ["distckpt"]
    lruns: dict[str, list] = {t: [] for t in ltools}
    lcat: list = []
    for rep in range(a.reps):
        for tool in _rotate(ltools, rep):
            launcher = "torchrun" if tool == "dcp" else "mpirun"
            r = launch(launcher, nl, "load", {**base, "tool": tool, "path": kept[tool], "dim": 1}, logs=logs)
            r["values_ok"] = _values_ok(r, expected)
            lruns[tool].append(_strip(r))
        lcat.append(cat_seconds(kept["distckpt"]))
    out["load"] = lruns
    out["cat_before_load"] = lcat
    out["load_ranks"] = nl
    for p in kept.values():
        shutil.rmtree(p, ignore_errors=True)
    return out


def cell_rows(a, work: str, logs: str, use_mf: bool) -> dict:
    m = peer_model(a.cell_size, head=False)
    base = {"size": a.cell_size}
    cwd = os.path.join(work, "cwd")  # MindFormers writes ./output/log
    os.makedirs(cwd, exist_ok=True)
    tools = ["distckpt", "mindformers", "raw"] if use_mf else ["distckpt", "raw"]
    say(f"row 3: one process saves a {m.nbytes / MiB:.0f} MiB Cell ({', '.join(tools)}), {a.reps} alternated repetitions")
    runs: dict[str, list] = {t: [] for t in tools}
    cats: dict[str, list] = {"distckpt": [], "mindformers": []}
    for rep in range(a.reps):
        for tool in _rotate(tools, rep):
            path = os.path.join(work, f"cell-{tool}")
            r = run_child("cell_save", {**base, "tool": tool, "path": path}, logs=logs, cwd=cwd)
            runs[tool].append(r)
            if tool in cats:
                cats[tool].append(cat_seconds(path))
    shutil.rmtree(os.path.join(work, "cell-raw"), ignore_errors=True)
    expected = {name: fingerprint(block_data(name, shape, 0, 1)) for name, shape, _ in m.tensors}
    ltools = ["distckpt", "distckpt_noverify", "mindformers"] if use_mf else ["distckpt", "distckpt_noverify"]
    say(f"row 4: one process loads it, every page touched ({', '.join(ltools)})")
    lruns: dict[str, list] = {t: [] for t in ltools}
    lcat: list = []
    for rep in range(a.reps):
        for tool in _rotate(ltools, rep):
            src = "mindformers" if tool == "mindformers" else "distckpt"
            r = run_child("cell_load", {**base, "tool": tool, "path": os.path.join(work, f"cell-{src}")}, logs=logs, cwd=cwd)
            r["values_ok"] = r.pop("fingerprints") == expected
            lruns[tool].append(r)
        lcat.append(cat_seconds(os.path.join(work, "cell-distckpt")))
    for t in ("distckpt", "mindformers"):
        shutil.rmtree(os.path.join(work, f"cell-{t}"), ignore_errors=True)
    return {"model_bytes": m.nbytes, "tensors": len(m.tensors), "save": runs, "cat_after_save": cats, "load": lruns,
            "cat_before_load": lcat}


def s3_rows(a, work: str, logs: str) -> dict:
    import distckpt
    from bench.s3server import CountingS3

    m = peer_model(a.s3_size, head=True)
    n = a.save_ranks
    coop = "cooperative" in inspect.signature(distckpt.load).parameters
    variants: list[tuple[str, bool | None]] = [("default", None)]
    if coop:
        variants += [("cooperative=False", False), ("cooperative=True", True)]
    layouts = [(f"DP{n}", n, 1), (f"DP{n // 2}xTP2", n // 2, 2)] if n % 2 == 0 and n > 2 else [(f"DP{n}", n, 1)]
    say(f"row 5: {n} ranks load {m.nbytes / MiB:.0f} MiB from S3 (moto, counted) as {', '.join(x[0] for x in layouts)}")
    out: dict = {"model_bytes": m.nbytes, "ranks": n, "load_accepts_cooperative": coop, "layouts": {}}
    with CountingS3() as s3:
        url = s3.url("ckpt")
        out["save"] = run_child("s3_save", {"size": a.s3_size, "ranks": n, "path": url}, logs=logs, env=s3.env)
        for tag, dp, tp in layouts:
            for vname, flag in variants:
                s3.reset()
                args = {"size": a.s3_size, "head": True, "tool": "distckpt", "path": url, "dp": dp, "tp": tp, "dim": 0}
                if flag is not None:
                    args["cooperative"] = flag
                try:
                    r = launch("mpirun", n, "s3load", args, logs=logs, env=s3.env)
                except LaunchFailed as exc:  # one variant failing leaves the others measured
                    out["layouts"].setdefault(tag, {})[vname] = {"error": _tail(exc)}
                    say(f"row 5 {tag} {vname} failed: {_tail(exc, 1)}")
                    continue
                served, gets = s3.get_bytes("ckpt/")
                out["layouts"].setdefault(tag, {})[vname] = {
                    "served_bytes": served, "gets": gets, "needed_once": m.nbytes, "ratio": served / m.nbytes,
                    "seconds": r["seconds"], "wall_seconds": r["wall_seconds"], "peak_rss_max": r["peak_rss_max"],
                }
    return out


def _tail(exc: BaseException, lines: int = 12) -> str:
    """The last printable lines of a failure (the launch log's tail holds the traceback), the first
    line naming an error (``...Error: ...``) last, so one line says what went wrong."""
    text = [ln for ln in str(exc).splitlines() if ln.strip() and ln.isprintable()]
    errors = [ln.strip() for ln in text if "Error" in ln and ":" in ln and not ln.startswith(" ")]
    return "\n".join(text[-lines:] + errors[:1])


def run_peers(a, work: str, logs: str) -> dict:
    """Every row; a row whose tool fails is recorded under ``failed`` with its log's tail, and the rest run."""
    use_dcp, use_mf, use_ms = have("torch"), have("mindformers"), have("mindspore")
    res: dict = {"targets": TARGETS, "skipped": {}, "failed": {}}
    if not use_dcp:
        res["skipped"]["dcp"] = "torch not installed (pip install 'distckpt[bench]')"
    if not use_mf:
        res["skipped"]["mindformers"] = "mindformers not installed"

    def row(key: str, fn, *args):
        try:
            res[key] = fn(*args)
        except LaunchFailed as exc:
            res["failed"][key] = _tail(exc)
            say(f"{key} failed: {_tail(exc, 1)}")

    row("multi", multi_rank_rows, a, work, logs, use_dcp)
    if use_ms:
        row("cell", cell_rows, a, work, logs, use_mf)
    else:
        res["skipped"]["cell"] = "mindspore not installed: no Cell to save"
    if have("moto") and have("s3fs"):
        row("s3", s3_rows, a, work, logs)
    else:
        res["skipped"]["s3"] = "moto or s3fs not installed"
    say("limits: memcpy of the same bytes (best of N)")
    sizes = [peer_model(a.save_size, head=True).nbytes, peer_model(a.cell_size, head=False).nbytes]
    row("memcpy", lambda: run_child("memcpy", {"sizes": sizes, "reps": max(5, a.reps)}, logs=logs)["seconds"])
    say("row 7: writers' balance of other layouts")
    row("balance", lambda: run_child("balance", {"size": a.save_size, "dir": os.path.join(work, "balance")},
                                     logs=logs)["layouts"])
    say(f"row 8: training steps during asynchronous saves ({a.reps} saves)")
    one_core = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    row("async", lambda: run_child("async_train", {"size": a.cell_size, "path": os.path.join(work, "async"),
                                                   "saves": max(3, a.reps)}, logs=logs, env=one_core))
    if "multi" in res and "balance" in res:
        res["multi"]["balance"].update(res.pop("balance"))
    return res


__all__ = ["run_peers", "launch", "run_child", "cat_seconds", "writer_bytes", "TARGETS", "strategy"]
