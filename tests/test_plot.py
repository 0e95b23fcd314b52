"""inspect --plot: a PNG of how a tensor is cut across ranks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import distckpt
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.plot import tensor_cells


def _saved(tmp_path):
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2, 2, 2), (2, 0)))})  # rows over axis 2, cols over axis 0
    full = np.arange(64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "ck"
    for r in range(8):
        box = strat.box("w", r, full.shape)
        distckpt.save({"w": full[box.relative_to(distckpt.Box((0, 0), (8, 8)))]}, path, strategy=strat, rank=r)
    distckpt.finalize(path)
    return path


def test_cells_name_the_replica_ranks(tmp_path):
    shape, cells, dtype = tensor_cells(_saved(tmp_path), "w")
    assert shape == [8, 8] and dtype == "float32"
    got = {(b.offsets, b.sizes): list(r) for b, r in cells}
    assert got == {
        ((0, 0), (4, 4)): [0, 2],
        ((0, 4), (4, 4)): [1, 3],
        ((4, 0), (4, 4)): [4, 6],
        ((4, 4), (4, 4)): [5, 7],
    }


def test_cli_writes_png(tmp_path):
    path = _saved(tmp_path)
    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "distckpt", "inspect", str(path), "--plot", "w", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    res = subprocess.run([sys.executable, "-m", "distckpt", "inspect", str(path), "--plot", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "nope" in res.stderr
