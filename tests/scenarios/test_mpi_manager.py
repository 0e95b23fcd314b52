"""CheckpointManager under mpirun: async saves every N steps keep the last K; another world size
resumes exactly; a job killed mid-save loses only the in-flight save."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "mpi_scripts" / "manager_loop.py"


def mpirun(n: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "DISTCKPT_COMM_TIMEOUT": "120"}
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(n), "--oversubscribe", sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "distckpt.index.json").exists())


def test_async_loop_keeps_last_k_and_resumes_in_other_world_sizes(tmp_path):
    root = tmp_path / "run"
    res = mpirun(4, "train", root, "--steps", 10, "--interval", 2, "--keep", 2)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("STEPS [8, 10]") == 4, res.stdout
    assert _steps(root) == [8, 10]
    for n in (2, 3):
        res = mpirun(n, "resume", root)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count("RESUME 10 OK") == n


def test_kill_mid_save_loses_only_that_save(tmp_path):
    root = tmp_path / "run"
    res = mpirun(4, "train", root, "--steps", 10, "--interval", 2, "--keep", 3, "--kill-at-step", 6)
    assert res.returncode != 0
    # steps 2 and 4 committed before the kill; 6 was in flight and must not count
    assert _steps(root) == [2, 4]
    res = mpirun(2, "resume", root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("RESUME 4 OK") == 2
