"""distckpt.writers.parallel: ``merge`` with every rank of an mpirun job is byte-identical to a 1-rank merge."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt.writers.parallel import split_by_bytes

SCRIPT = Path(__file__).parents[1] / "mpi_scripts" / "merge_job.py"


def run(n: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "DISTCKPT_COMM_TIMEOUT": "120"}
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    if n > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(n), "--oversubscribe", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    rng = np.random.default_rng(3)
    state = {f"layer{i}.w": rng.standard_normal((64 + i, 48)).astype(np.float32) for i in range(7)}
    state["emb"] = rng.integers(0, 1 << 16, (33, 20), dtype=np.uint16).view(ml_dtypes.bfloat16)
    state["mask"] = rng.integers(0, 2, (9,)).astype(bool)
    state.update({"step": 12, "lr": 1e-300, "tag": "run-α"})
    path = tmp_path_factory.mktemp("pm") / "src"
    distckpt.save(state, path)
    return path


@pytest.mark.parametrize("dst, shard", [("m.ckpt", None), ("m.safetensors", None), ("dir", "20KB"), ("dir1", None)])
def test_two_ranks_write_what_one_rank_writes(src, tmp_path, dst, shard):
    extra = ["--shard", shard] if shard else []
    one = run(1, src, tmp_path / "one" / dst, *extra)
    assert one.returncode == 0, one.stdout + one.stderr
    two = run(2, src, tmp_path / "two" / dst, *extra)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("RANKS 2") == 2
    a, b = tmp_path / "one" / dst, tmp_path / "two" / dst
    if a.is_file():
        assert filecmp.cmp(a, b, shallow=False)
    else:
        cmp = filecmp.dircmp(a, b)
        assert sorted(os.listdir(a)) == sorted(os.listdir(b)) and not cmp.diff_files and not cmp.funny_files
        assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in os.listdir(a))
    assert sorted(os.listdir(tmp_path / "two")) == [dst]  # no staging debris


def test_two_ranks_write_a_distckpt_checkpoint(src, tmp_path):
    res = run(2, src, tmp_path / "out", "--format", "distckpt")
    assert res.returncode == 0, res.stdout + res.stderr
    files = [n for n in os.listdir(tmp_path / "out") if n.startswith("data-")]
    assert len(files) == 2  # each rank wrote its share
    want, got = distckpt.load(src), distckpt.load(tmp_path / "out")
    assert sorted(want) == sorted(got)
    for k, v in want.items():
        assert (v.tobytes() == got[k].tobytes() and v.dtype == got[k].dtype) if isinstance(v, np.ndarray) else v == got[k]
    assert distckpt.verify(tmp_path / "out")["ok"]


def test_a_failing_rank_fails_every_rank_and_leaves_nothing(src, tmp_path):
    res = run(2, src, tmp_path / "m.ckpt", "--fail-rank", 1)
    errors = [ln for ln in res.stdout.splitlines() if " ERROR " in ln]
    assert len(errors) == 2 and all("rank 1" in e and "disk trouble" in e for e in errors), res.stdout + res.stderr
    assert os.listdir(tmp_path) == []


def test_split_by_bytes_is_contiguous_and_balanced():
    sizes = [5, 1, 1, 1, 9, 2, 2, 2, 2]
    parts = split_by_bytes(sizes, 3)
    assert [i for r in parts for i in r] == list(range(len(sizes)))
    sums = [sum(sizes[i] for i in r) for r in parts]
    assert max(sums) - min(sums) <= max(sizes)
    assert split_by_bytes([], 2) == [range(0, 0), range(0, 0)]
    assert [len(r) for r in split_by_bytes([1, 1], 4)].count(0) == 2


def test_two_ranks_export_the_hf_shards_one_rank_exports(tmp_path):
    """issue 16: under mpirun the ranks write the HF shards in parallel, byte for byte as one rank does."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    mf = tmp_path / "mf"
    distckpt.merge(tmp_path / "hf", mf, format="distckpt", model="qwen3")  # MindFormers names, fused weights
    args = [mf, None, "--shard", "60KB", "--format", "hf", "--model", "qwen3", "--hf-config", tmp_path / "hf" / "config.json"]
    one = run(1, *[tmp_path / "one" if a is None else a for a in args])
    two = run(2, *[tmp_path / "two" if a is None else a for a in args])
    assert one.returncode == 0 and two.returncode == 0, one.stdout + one.stderr + two.stdout + two.stderr
    names = sorted(os.listdir(tmp_path / "one"))
    assert len([n for n in names if n.endswith(".safetensors")]) > 2 and "model.safetensors.index.json" in names
    assert names == sorted(os.listdir(tmp_path / "two"))
    assert all(filecmp.cmp(tmp_path / "one" / n, tmp_path / "two" / n, shallow=False) for n in names)
    back = distckpt.load(tmp_path / "two")
    want = distckpt.load(tmp_path / "hf")
    assert sorted(back) == sorted(want) and all(back[k].tobytes() == want[k].tobytes() for k in want)
