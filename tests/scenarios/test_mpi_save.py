"""mpirun jobs: 4 ranks save at once, 2 and 3 ranks load exactly; a failing or killed rank never
commits an index, never hangs, and never damages the previous checkpoint."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distckpt
from distckpt.index import INDEX_NAME

SCRIPT = Path(__file__).parents[1] / "mpi_scripts" / "save_load.py"
sys.path.insert(0, str(SCRIPT.parent))
import save_load  # noqa: E402


def mpirun(n: int, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "DISTCKPT_COMM_TIMEOUT": "120"}
    mpirun_bin = str(Path(sys.executable).parent / "mpirun")
    cmd = [mpirun_bin, "-n", str(n), "--oversubscribe", sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _lines(res, word):
    return [ln for ln in res.stdout.splitlines() if ln.startswith("RANK") and word in ln]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpi") / "ck"
    res = mpirun(4, "save", path, "--seed", 7)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(_lines(res, "SAVED")) == 4
    return path


def test_four_ranks_save_replicas_once(saved):
    index = distckpt.sources.open_source(saved).index.to_json()  # every chunk listed (version 1's JSON)
    assert index["world_size"] == 4
    w = index["tensors"]["w"]["chunks"]
    assert len(w) == 2  # TP2 boxes written once each, not once per DP replica
    b = index["tensors"]["b"]["chunks"]
    assert len(b) == 1
    writers = {c["rank"] for t in index["tensors"].values() for c in t["chunks"]}
    assert len(writers) >= 3  # writes spread over replicas
    full = save_load.full_state(7)
    got = distckpt.load(saved)
    for k, v in full.items():
        assert np.array_equal(got[k].view(np.uint8), v.view(np.uint8)), k
    assert got["step"] == 7


@pytest.mark.parametrize("n", [2, 3])
def test_load_into_other_world_sizes(saved, n):
    res = mpirun(n, "load", saved, "--seed", 7)
    assert res.returncode == 0, res.stdout + res.stderr
    oks = _lines(res, "LOAD OK")
    assert len(oks) == n
    for ln in oks:  # outer-dim reshard: each rank reads about what it needs
        assert float(ln.split("ratio=")[1]) <= 1.05 or n == 3


def test_failing_rank_fails_every_rank_and_commits_nothing(tmp_path):
    path = tmp_path / "ck"
    res = mpirun(4, "save", path, "--fail-rank", 2)
    errors = _lines(res, "ERROR")
    assert len(errors) == 4, res.stdout + res.stderr
    msgs = {ln.split("ERROR", 1)[1] for ln in errors}
    assert len(msgs) == 1  # the same error everywhere
    assert "rank 2" in msgs.pop() and "disk full" in res.stdout
    assert not (path / INDEX_NAME).exists()
    with pytest.raises(distckpt.NotCommittedError):
        distckpt.load(path)


def test_random_kills_never_lose_or_corrupt(tmp_path):
    path = tmp_path / "ck"
    res = mpirun(4, "save", path, "--seed", 1)
    assert res.returncode == 0, res.stderr
    rng = random.Random(1234)
    last = 1
    for trial in range(4):  # bounded loop of random kill points
        seed = 10 + trial
        kill_rank, kill_after = rng.randrange(4), rng.randrange(0, 4)
        res = mpirun(4, "save", path, "--seed", seed, "--kill-rank", kill_rank, "--kill-after", kill_after)
        got = distckpt.load(path)
        # either the new save committed whole, or the previous one is intact: never a mix
        committed = got["step"]
        assert committed in (seed, last), (committed, res.stdout)
        full = save_load.full_state(committed)
        for k, v in full.items():
            assert np.array_equal(got[k].view(np.uint8), v.view(np.uint8)), (trial, k)
        distckpt.verify(path)
        last = committed
    distckpt.gc(path)
    assert distckpt.load(path)["step"] == last
