"""A tiny run of the bench (8 MiB, no MindSpore): it still runs end to end and its numbers add up."""

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    out = tmp_path / "results"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "8MiB", "--dtype", "float32", "--no-mindspore",
         "--scaling", "4MiB", "--checksum-reps", "1", "--plan-ranks", "1000", "--plan-tensors", "100",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    res = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()
    case = res["cases"]["float32"]
    # every measured child has a wall time and a plausible peak RSS
    for run in (case["save"]["distckpt"], case["save"]["raw_disk"], case["ops"]["merge"]["distckpt"],
                case["ops"]["reshard_tp2"]["distckpt"]):
        assert run["wall_seconds"] > 0
        assert 10 << 20 < run["peak_rss"] < 2 << 30
    assert case["mindspore_skipped"] == "not requested"
    # save wrote each distinct byte once (DP replicas deduplicated) plus headers
    written = case["save"]["distckpt"]["runs"][0]["bytes_written"]
    assert case["model_bytes"] <= written < case["model_bytes"] * 1.1
    assert case["save"]["raw_disk"]["runs"][0]["bytes_written"] == case["model_bytes"]
    # merge read every byte once; reshard to TP2 reads whole chunks only
    assert case["ops"]["merge"]["distckpt"]["read"]["ratio"] == 1.0
    assert res["load"]["outer_tp2"]["ratio"] == 1.0
    assert res["load"]["outer_tp2, no verify"]["ratio"] == 1.0
    assert res["load"]["outer_rows_tp8, no verify"]["ratio"] == 1.0
    assert res["load"]["outer_rows_tp8"]["bytes_read"] >= res["load"]["outer_rows_tp8"]["bytes_needed"] > 0
    assert res["plan"]["write_items"] > 0 and res["plan"]["plan_save_seconds"] < 30
    assert [r["size"] for r in res["scaling"]] == [4 << 20]
    assert {c["target"].split(":")[0] for c in res["checks"]} >= {"merge float32", "checksums add <= 5% to save time"}
    assert "| merge → one .ckpt |" in md and "## DESIGN §4 targets" in md


def test_model_strategy_tiles():
    sys.path.insert(0, ROOT)
    from bench.model import make_model, rank_states, strategy

    m = make_model(1 << 20, "bfloat16", 64)
    st = strategy(m, 2, 4)
    states = rank_states(m, st)
    # DP replicas share arrays; TP ranks hold disjoint quarters
    name, shape, split = m.tensors[1]
    assert states[0][name] is states[4][name]
    assert states[0][name].shape[split] * 4 == shape[split]
    assert states[0][name].dtype.itemsize == 2
    full = np.concatenate([states[r][name] for r in range(4)], axis=split)
    assert full.shape == shape
