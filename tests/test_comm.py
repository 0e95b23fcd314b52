"""Communicators and launch/mpirun.sh.

Single-process tests run everywhere.  The MPI tests run real ``mpirun -n 4
--oversubscribe`` (4 ranks on 2 cores is the point) through subprocess with a
timeout well below pytest's, parse each rank's ``RANK r KEY json`` lines, and
are skipped when mpirun or mpi4py is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distckpt import comm as comm_mod
from distckpt.comm import (
    Communicator,
    MPIComm,
    SingleComm,
    comm_timeout,
    format_ranks,
    get_comm,
    reset_comm,
)
from distckpt.errors import DistributedError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "mpi_scripts"
LAUNCH = ROOT / "launch" / "mpirun.sh"
PY = sys.executable
MPIRUN = str(Path(PY).parent / "mpirun") if (Path(PY).parent / "mpirun").exists() else shutil.which("mpirun")
HAVE_MPI = MPIRUN is not None and importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpirun or mpi4py not installed (pip install 'distckpt[mpi]')")
LIMIT = 120  # seconds per mpirun job: generous for a loaded 2-core machine, far below pytest's timeout


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_", "DISTCKPT_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def mpirun(mode: str, n: int = 4, **env: str) -> tuple[subprocess.CompletedProcess, dict[int, dict[str, object]], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [MPIRUN, "-n", str(n), "--oversubscribe", PY, str(SCRIPTS / "comm_ops.py"), mode],
        capture_output=True, text=True, timeout=LIMIT, env=_env(**env), cwd=ROOT,
    )
    return proc, parse(proc.stdout), time.monotonic() - t0


def parse(stdout: str) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for line in stdout.splitlines():
        if line.startswith("RANK "):
            _, rank, key, value = line.split(" ", 3)
            out.setdefault(int(rank), {})[key] = json.loads(value)
    return out


# ----------------------------------------------------------------------------------------
# single process


def test_single_comm_collectives_are_identity_through_json():
    c = SingleComm()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    c.barrier("b")
    assert c.allgather({"a": (1, 2), 3: "x"}, "g") == [{"a": [1, 2], "3": "x"}]
    assert c.broadcast([1, "two"], name="bc") == [1, "two"]
    assert c.run("work", lambda: 41 + 1) == 42
    assert c.run("work", lambda x, y=0: x + y, 1, y=2, gather=True) == [3]
    assert c.run_on_root("commit", lambda: {"ok": True}) == {"ok": True}
    assert c.gather_errors("g") == {}
    assert c.gather_errors("g", ValueError("bad")) == {0: "ValueError: bad"}


def test_single_comm_run_failure_names_rank_and_chains():
    c = SingleComm()

    def boom():
        raise ValueError("boom")

    with pytest.raises(DistributedError) as info:
        c.run("save", boom)
    assert str(info.value) == "save failed on rank(s) 0: rank 0: ValueError: boom"
    assert info.value.failures == {0: "ValueError: boom"}
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(DistributedError, match="commit failed on rank"):
        c.run_on_root("commit", boom)


def test_non_json_values_raise_distributed_error():
    c = SingleComm()
    with pytest.raises(DistributedError, match="not JSON-serializable"):
        c.allgather({1, 2}, "g")
    with pytest.raises(DistributedError, match="not JSON-serializable"):
        c.broadcast(object(), name="b")
    with pytest.raises(DistributedError, match="plan failed on rank"):
        c.run("plan", lambda: object(), gather=True)
    with pytest.raises(DistributedError, match="root 1 is not a rank"):
        c.broadcast(1, root=1, name="b")


def test_long_messages_are_truncated():
    c = SingleComm()
    with pytest.raises(DistributedError) as info:
        c.run("x", lambda: (_ for _ in ()).throw(RuntimeError("y" * 10000)))
    assert len(info.value.failures[0]) <= comm_mod._MAX_MESSAGE
    assert info.value.failures[0].endswith("(truncated)")


def test_format_ranks():
    assert format_ranks([1, 3]) == "1, 3"
    assert format_ranks([3, 1, 2, 7, 8, 10, 11, 12]) == "1-3, 7, 8, 10-12"
    assert format_ranks([]) == ""


def test_comm_timeout(monkeypatch):
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    assert comm_timeout() == 600.0
    assert comm_timeout(5) == 5.0
    assert comm_timeout(0) is None
    monkeypatch.setenv("DISTCKPT_COMM_TIMEOUT", "12.5")
    assert comm_timeout() == 12.5
    monkeypatch.setenv("DISTCKPT_COMM_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="DISTCKPT_COMM_TIMEOUT"):
        comm_timeout()


def test_get_comm_selection(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "DISTCKPT_COMM"):
        monkeypatch.delenv(var, raising=False)
    reset_comm()
    try:
        mine = SingleComm()
        assert get_comm(mine) is mine
        auto = get_comm()
        assert isinstance(auto, SingleComm) and get_comm() is auto  # cached
        reset_comm()
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")  # mpirun -n 1: no need for mpi4py
        assert isinstance(get_comm(), SingleComm)
        reset_comm()
        monkeypatch.setenv("DISTCKPT_COMM", "bogus")
        with pytest.raises(DistributedError, match="single, mpi or mindspore"):
            get_comm()
        with pytest.raises(DistributedError, match="Communicator or an mpi4py communicator"):
            get_comm(42)
    finally:
        reset_comm()


def test_core_import_does_not_import_mpi4py_or_mindspore():
    code = "import distckpt.comm, distckpt.jobconfig, sys; print('mpi4py' in sys.modules, 'mindspore' in sys.modules)"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=LIMIT)
    assert out.stdout.split() == ["False", "False"], out.stderr


@needs_mpi
def test_mpicomm_in_one_process(monkeypatch):
    monkeypatch.delenv("DISTCKPT_COMM_TIMEOUT", raising=False)
    from mpi4py import MPI

    c = get_comm(MPI.COMM_SELF)
    assert isinstance(c, MPIComm) and isinstance(c, Communicator) and (c.rank, c.size) == (0, 1)
    assert c.allgather({"a": 1}, "g") == [{"a": 1}]
    assert c.broadcast("x", name="b") == "x"
    c.barrier("b")
    with pytest.raises(DistributedError, match="step failed on rank"):
        c.run("step", lambda: 1 / 0)


# ----------------------------------------------------------------------------------------
# real mpirun, 4 ranks on 2 cores


@needs_mpi
def test_collectives_across_4_ranks():
    proc, ranks, _ = mpirun("collectives")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    expected = [{"rank": r, "sq": r * r, "t": [1, 2]} for r in range(4)]
    for r, got in ranks.items():
        assert got["TYPE"] == ["MPIComm", r, 4]
        assert got["ALLGATHER"] == expected
        assert got["UNEVEN"] == ["x" * (i * 3) for i in range(4)]
        assert got["BCAST0"] == {"plan": [1, 2, 3]}
        assert got["BCASTLAST"] == "from 3"
        assert got["RUN"] == [0, 10, 20, 30]
        assert got["ROOT"] == {"index": "written by 0"}
        msg, failures = got["BADJSON"]
        assert "rank(s) 1" in msg and list(failures) == ["1"]
        assert got["DONE"] is True


@needs_mpi
def test_failure_in_run_raises_same_error_on_every_rank():
    proc, ranks, _ = mpirun("run_fail")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    errors = {r: tuple(json.dumps(x, sort_keys=True) for x in got["ERROR"]) for r, got in ranks.items()}
    assert len(set(errors.values())) == 1, errors  # identical everywhere
    kind, message, failures = ranks[0]["ERROR"]
    assert kind == "DistributedError"
    assert message == "save failed on rank(s) 1, 3: rank 1: ValueError: boom on 1; rank 3: ValueError: boom on 3"
    assert failures == {"1": "ValueError: boom on 1", "3": "ValueError: boom on 3"}
    for got in ranks.values():  # the communicator stays usable after a failure inside run()
        assert got["AFTER"] == [0, 1, 2, 3]


@needs_mpi
def test_missing_rank_times_out_and_is_named():
    proc, ranks, elapsed = mpirun("timeout", T="3")
    assert elapsed < LIMIT - 30  # rank 2 sleeps 60 s; nobody waits for it
    assert sorted(ranks) == [0, 1, 3], proc.stdout + proc.stderr[-3000:]
    for r in (0, 1, 3):
        message, failures, waited = ranks[r]["ERROR"]
        assert "collective 'save.commit'" in message and "rank(s) 2 did not arrive" in message
        assert list(failures) == ["2"]
        assert waited < 30
        assert "unusable after an earlier failure" in ranks[r]["BROKEN"]


@needs_mpi
def test_uncaught_exception_aborts_the_job():
    proc, ranks, elapsed = mpirun("uncaught")
    assert proc.returncode != 0
    assert elapsed < 60
    assert "rank 1 dies outside run()" in proc.stderr
    assert "aborting the MPI job" in proc.stderr
    assert not any("NOERROR" in got for got in ranks.values())


@needs_mpi
def test_uncaught_exception_without_abort_hook_still_does_not_hang():
    proc, ranks, elapsed = mpirun("uncaught", DISTCKPT_NO_ABORT="1", DISTCKPT_COMM_TIMEOUT="4")
    assert proc.returncode != 0
    assert elapsed < LIMIT - 30
    assert "rank(s) 1 did not arrive" in proc.stderr


@needs_mpi
def test_collective_mismatch_is_reported_everywhere():
    proc, ranks, _ = mpirun("mismatch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ranks) == [0, 1, 2, 3]
    for got in ranks.values():
        assert "collective mismatch" in got["ERROR"] and "rank 3 is in barrier 'phase.b'" in got["ERROR"]


# ----------------------------------------------------------------------------------------
# launch/mpirun.sh


def launch(*args: str, env: dict | None = None, timeout: float = LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _env(), cwd=ROOT)


@needs_mpi
def test_launcher_exports_rank_env_and_writes_per_rank_logs(tmp_path):
    logs = tmp_path / "logs"
    proc = launch("-n", "4", "--device", "cpu", "--log-dir", str(logs), "--", PY, str(SCRIPTS / "env_dump.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ranks share the console, so one rank's line may land in the middle of another's
    seen = sorted(json.loads(m)["RANK_ID"] for m in re.findall(r"ENV (\{[^{}]*\})", proc.stdout))
    assert seen == ["0", "1", "2", "3"]  # console still shows every rank
    local = set()
    for r in range(4):
        text = (logs / f"rank_{r}.log").read_text()
        found = re.search(r"ENV (\{[^{}]*\})", text)  # stdout and stderr share the log file
        assert found, text
        env = json.loads(found.group(1))
        assert env["RANK_ID"] == str(r) and env["RANK_SIZE"] == "4"
        assert env["DEVICE_ID"] == env["LOCAL_RANK"]
        assert env["CUDA_VISIBLE_DEVICES"] is None and env["MS_ROLE"] is None
        assert f"stderr line from rank {r}" in text
        local.add(env["LOCAL_RANK"])
    assert local == {"0", "1", "2", "3"}


@needs_mpi
def test_launcher_exit_code_is_mpiruns():
    proc = launch("-n", "2", "--", PY, str(SCRIPTS / "env_dump.py"), env=_env(RC="3"))
    assert proc.returncode == 3, proc.stderr[-2000:]


@needs_mpi
def test_launcher_gpu_and_ascend_mapping(tmp_path):
    # No GPU/NPU here: the wrapper only sets variables, so a CPU process shows the mapping.
    proc = launch("-n", "2", "--device", "gpu", "--mpi-arg", "--oversubscribe", "--", PY, str(SCRIPTS / "env_dump.py"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    envs = sorted((json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ENV ")), key=lambda e: e["RANK_ID"])
    assert [(e["CUDA_VISIBLE_DEVICES"], e["DEVICE_ID"]) for e in sorted(envs, key=lambda e: e["LOCAL_RANK"])] == [("0", "0"), ("1", "0")]
    table = tmp_path / "rank_table.json"
    table.write_text("{}")
    proc = launch("-n", "2", "--device", "ascend", "--mpi-arg", "--oversubscribe", "--", PY, str(SCRIPTS / "env_dump.py"),
                  env=_env(RANK_TABLE_FILE=str(table)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    envs = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ENV ")]
    assert {e["RANK_TABLE_FILE"] for e in envs} == {str(table)}
    assert all(e["DEVICE_ID"] == e["LOCAL_RANK"] for e in envs)


def test_launcher_dry_run_flags(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = _env(MPIRUN=str(fake), DISTCKPT_SKIP_MPI4PY_CHECK="1")
    many = str((os.cpu_count() or 1) + 3)
    out = launch("-n", many, "--dry-run", "-x", "FOO", "--", "python", "train.py", env=env)
    assert out.returncode == 0, out.stderr
    assert f"-n {many}" in out.stdout and "--oversubscribe" in out.stdout and "-x FOO" in out.stdout
    assert "--rank-wrapper -- python train.py" in out.stdout
    if os.getuid() == 0:
        assert "--allow-run-as-root" in out.stdout
    out = launch("-n", many, "--hostfile", "/dev/null", "--dry-run", "--", "python", "x.py", env=env)
    assert "--hostfile /dev/null" in out.stdout and "--oversubscribe" not in out.stdout
    bad = launch("-n", "two", "--", "python", env=env)
    assert bad.returncode == 2 and "--np must be a positive integer" in bad.stderr
    bad = launch("--device", "tpu", "--", "python", env=env)
    assert bad.returncode == 2 and "ascend, gpu or cpu" in bad.stderr
    bad = launch("-n", "2", env=env)
    assert bad.returncode == 2 and "no command given" in bad.stderr


def test_launcher_reports_missing_mpirun(tmp_path):
    # PATH without any mpirun, and a python with no mpirun beside it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "basename", "id", "nproc", "cat", "sed", "mkdir"):
        src = shutil.which(tool)
        if src:
            (bindir / tool).symlink_to(src)
    env = {k: v for k, v in _env().items() if k not in ("MPIRUN", "VIRTUAL_ENV")}
    env["PATH"] = str(bindir)
    proc = subprocess.run(["/bin/bash", str(LAUNCH), "-n", "2", "--", "/nonexistent/python3", "x.py"],
                          capture_output=True, text=True, timeout=LIMIT, env=env, cwd=ROOT)
    assert proc.returncode == 127
    assert "mpirun not found" in proc.stderr
    assert "pip install 'distckpt[mpi]'" in proc.stderr


@needs_mpi
def test_launcher_reports_missing_mpi4py(tmp_path):
    pys = [p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if Path(p).exists()]
    bare = next((p for p in pys if subprocess.run([p, "-c", "import mpi4py"], capture_output=True).returncode != 0), None)
    if bare is None:
        pytest.skip("no python without mpi4py on this machine")
    proc = launch("-n", "2", "--", bare, "x.py", env=_env(MPIRUN=MPIRUN))
    assert proc.returncode == 127
    assert "mpi4py is not installed" in proc.stderr and "pip install 'distckpt[mpi]'" in proc.stderr


@pytest.mark.slow
@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("mindspore") is None, reason="mindspore not installed")
def test_launcher_ms_scheduler_runs_mindspore_collectives(tmp_path):
    proc = launch("-n", "2", "--ms-scheduler", "--log-dir", str(tmp_path), "--", PY, str(SCRIPTS / "ms_comm.py"),
                  timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["auto"] == "MPIComm" and r["size"] == 2
        assert r["gather"] == [{"r": 0, "pad": ""}, {"r": 1, "pad": "x"}]
        assert r["bcast"] == "from 1"
    assert (tmp_path / "scheduler.log").exists()
