"""Cooperative load under mpirun: replicas read each byte once from storage and share it (issue 13 item 3)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import distckpt
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.plan import plan_shared_reads

SCRIPT = Path(__file__).parents[1] / "mpi_scripts" / "coop_load.py"
sys.path.insert(0, str(SCRIPT.parent))
import coop_load  # noqa: E402


def mpirun(n: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "DISTCKPT_COMM_TIMEOUT": "120"}
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(n), "--oversubscribe", sys.executable, str(SCRIPT),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _save(url: str) -> int:
    state = coop_load.full_state()
    distckpt.save({**state, "step": 5}, url)
    return sum(a.nbytes for a in state.values())


@pytest.mark.parametrize("layout", ["dp4", "dp2tp2"])
def test_every_rank_gets_its_exact_slices_and_storage_serves_each_byte_once(s3_server, layout):
    url = s3_server.url(f"coop-{uuid.uuid4().hex[:8]}")
    needed_once = _save(url)
    prefix = url.split("/", 3)[3]
    s3_server.reset()
    res = mpirun(4, url, layout)
    assert res.returncode == 0 and res.stdout.count(" OK ") == 4, res.stdout + res.stderr
    served, _ = s3_server.get_bytes(prefix + "/data-")
    assert served <= 1.05 * needed_once, (served, needed_once)
    # the same job without cooperation pulls the replicated bytes once per replica
    s3_server.reset()
    res = mpirun(4, url, layout, "--no-coop")
    assert res.returncode == 0 and res.stdout.count(" OK ") == 4, res.stdout + res.stderr
    alone, _ = s3_server.get_bytes(prefix + "/data-")
    assert alone >= (3.9 if layout == "dp4" else 1.9) * needed_once * 0.9, (alone, needed_once)


def test_local_cooperative_load_is_exact(tmp_path):
    _save(str(tmp_path / "ck"))
    res = mpirun(4, tmp_path / "ck", "dp2tp2")
    assert res.returncode == 0 and res.stdout.count(" OK ") == 4, res.stdout + res.stderr


def test_a_rank_that_cannot_read_fails_every_rank(tmp_path):
    _save(str(tmp_path / "ck"))
    for f in os.listdir(tmp_path / "ck"):
        if f.startswith("data-"):
            data = bytearray((tmp_path / "ck" / f).read_bytes())
            data[-20] ^= 0xFF  # corrupt a block: whoever reads it fails the checksum
            (tmp_path / "ck" / f).write_bytes(bytes(data))
    res = mpirun(4, tmp_path / "ck", "dp4")
    errors = [ln for ln in res.stdout.splitlines() if " ERROR " in ln]
    assert len(errors) == 4 and len({e.split(" ERROR ", 1)[1] for e in errors}) == 1, res.stdout + res.stderr
    assert "checksum" in errors[0]


def test_readers_are_spread_by_bytes_and_every_box_has_one():
    shapes = {f"t{i}": ("float32", (64 * (i + 1), 16)) for i in range(12)}
    strat = Strategy({n: ParamSpec(n, TensorLayout((4, 2), (0, -1))) for n in shapes})
    per_rank = {}
    plans = {r: plan_shared_reads(shapes, strat, 8, r) for r in range(8)}
    for r, plan in plans.items():
        for it in plan:
            assert r in it.members
            for m in it.members:  # every member computes the same reader for the same box
                other = next(x for x in plans[m] if x.name == it.name)
                assert other.reader == it.reader and other.box == it.box
            if it.reader == r:
                per_rank[r] = per_rank.get(r, 0) + it.box.numel * 4
    loads = np.array([per_rank.get(r, 0) for r in range(8)])
    assert loads.sum() == sum(64 * (i + 1) * 16 * 4 for i in range(12))  # each byte read once by the job
    assert loads.max() / loads.mean() <= 1.25, loads
