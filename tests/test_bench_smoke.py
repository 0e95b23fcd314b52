"""A tiny run of each bench suite: every row still runs end to end and its results have the right shape.

Structure only: a bench result is a measurement, never a test assertion, so no timing is checked.
The values that are checked are exact ones: the loaded arrays' fingerprints against an
independent generator, bytes served >= bytes needed, bytes per rank adding up.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.model import MiB, block_data, fingerprint, make_model, peer_model, rank_states, strategy  # noqa: E402


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_peer_rows_smoke(tmp_path):
    out = tmp_path / "results"
    _run(["--reps", "1", "--save-size", "4MiB", "--cell-size", "4MiB", "--s3-size", "4MiB",
          "--workdir", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    res = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = res["peers"]
    torch, mf = _have("torch"), _have("mindformers")

    mu = p["multi"]
    assert mu["ranks"] == 4 and mu["load_ranks"] == 2
    assert set(mu["save"]) == ({"distckpt", "raw", "dcp"} if torch else {"distckpt", "raw"})
    for runs in [*mu["save"].values(), *mu["load"].values()]:
        (run,) = runs
        assert len(run["ranks"]) in (2, 4)
        assert run["seconds"] > 0 and run["wall_seconds"] >= run["seconds"]
        assert run["peak_rss_sum"] >= run["peak_rss_max"] > 10 * MiB
    # the column reshard-load returned exactly the values the saving ranks generated, in every tool
    assert set(mu["load"]) == ({"distckpt", "dcp"} if torch else {"distckpt"})
    assert all(r["values_ok"] for runs in mu["load"].values() for r in runs)
    assert len(mu["cat_after_save"]["distckpt"]) == 1 and len(mu["cat_before_load"]) == 1
    assert mu["cat_before_load"][0]["bytes"] >= mu["model_bytes"]

    ce = p["cell"]
    assert set(ce["save"]) == ({"distckpt", "mindformers", "raw"} if mf else {"distckpt", "raw"})
    assert ce["save"]["raw"][0]["bytes_written"] == ce["model_bytes"]
    assert ce["save"]["distckpt"][0]["bytes_written"] >= ce["model_bytes"]
    assert all(r["values_ok"] for runs in ce["load"].values() for r in runs)
    assert {"distckpt", "distckpt_noverify"} <= set(ce["load"])

    s3 = p["s3"]
    assert set(s3["layouts"]) == {"DP4", "DP2xTP2"}
    for variants in s3["layouts"].values():
        assert "default" in variants
        for v in variants.values():
            assert v["served_bytes"] >= v["needed_once"] == s3["model_bytes"]
            assert v["ratio"] == v["served_bytes"] / v["needed_once"]

    assert set(p["memcpy"]) == {str(mu["model_bytes"]), str(ce["model_bytes"])}
    bal = mu["balance"]
    assert len(bal) == 3
    for b in bal.values():
        assert b["max_over_mean"] >= 1.0 and len(b["per_rank"]) in (4, 8)
    assert sum(bal["row shards (the row-1 save)"]["per_rank"]) >= mu["model_bytes"]

    asy = p["async"]
    assert asy["latest_step"] == 3 and asy["bytes"] == ce["model_bytes"]  # three async saves committed (+ the warm-up)
    assert len(asy["blocked"]) == 3 and len(asy["base_steps"]) == 15 and len(asy["copy_seconds"]) == 3
    assert all(x > 0 for x in [*asy["blocked"], *asy["base_steps"], *asy["steps_during_save"]])

    groups = {r["group"] for r in res["ratios"]}
    assert {"vs machine limit", "cooperative load (S3)", "writers' balance"} <= groups
    assert ("async save" in groups) == bool(asy["steps_during_save"])
    assert ("vs PyTorch DCP" in groups) == torch and ("vs mindformers.checkpoint" in groups) == mf
    if not torch:
        assert "torch not installed" in p["skipped"]["dcp"] and "torch not installed" in md
    assert "## Ratios" in md and "Row 5" in md and "| writers' balance |" in md


def test_mindspore_suite_smoke(tmp_path):
    """The older suite (``--mindspore``, here without MindSpore's own tools) still runs."""
    out = tmp_path / "results"
    _run(["--mindspore", "--size", "8MiB", "--dtype", "float32", "--no-mindspore", "--scaling", "4MiB",
          "--checksum-reps", "1", "--plan-ranks", "200", "--plan-tensors", "50",
          "--workdir", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    res = json.loads((out / "mindspore.json").read_text())
    md = (out / "mindspore.md").read_text()
    case = res["cases"]["float32"]
    for run in (case["save"]["distckpt"], case["save"]["raw_disk"], case["ops"]["merge"]["distckpt"],
                case["ops"]["reshard_tp2"]["distckpt"]):
        assert run["wall_seconds"] > 0
        assert 10 << 20 < run["peak_rss"] < 2 << 30
    assert case["mindspore_skipped"] == "not requested"
    written = case["save"]["distckpt"]["runs"][0]["bytes_written"]
    assert case["model_bytes"] <= written < case["model_bytes"] * 1.1
    assert case["save"]["raw_disk"]["runs"][0]["bytes_written"] == case["model_bytes"]
    assert case["ops"]["merge"]["distckpt"]["read"]["ratio"] == 1.0
    assert res["load"]["outer_tp2"]["ratio"] == 1.0
    # a mapped local file's bytes count once however many ranks need them (ReadStats on main since c9c9970)
    assert res["load"]["outer_rows_tp8"]["bytes_read"] > 0 and res["load"]["outer_rows_tp8"]["bytes_needed"] > 0
    assert res["plan"]["write_items"] > 0
    assert [r["size"] for r in res["scaling"]] == [4 << 20]
    assert "| merge → one .ckpt |" in md and "## DESIGN §4 targets" in md


def test_model_strategy_tiles():
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


def test_peer_models_have_the_issue_sizes():
    big, cell = peer_model(512 * MiB, head=True), peer_model(256 * MiB, head=False)
    norms = lambda m: sum(s[0] * 4 for _, s, _ in m.tensors if len(s) == 1)  # noqa: E731
    assert big.nbytes - norms(big) == 512 * MiB and cell.nbytes - norms(cell) == 256 * MiB
    # every matrix splits 4 ways by rows and 2 ways by columns
    assert all(s[0] % 4 == 0 and s[1] % 2 == 0 for _, s, _ in big.tensors if len(s) == 2)


def test_row_blocks_define_the_tensor():
    a = block_data("w", (8, 6), 1, 4)
    assert a.shape == (2, 6) and a.dtype == np.float32
    assert np.array_equal(a, block_data("w", (8, 6), 1, 4))
    assert not np.array_equal(a, block_data("w", (8, 6), 2, 4))
    assert np.array_equal(block_data("b", (6,), 3, 4), block_data("b", (6,), 0, 1))  # vectors are whole
    x = np.arange(6, dtype=np.float32)
    assert fingerprint(x) == int(x.view(np.uint8).sum()) and fingerprint(x[::2]) != fingerprint(x[1::2])


def test_writer_bytes_from_a_real_save(tmp_path):
    import distckpt
    from bench.peers import balance_of, writer_bytes
    from bench.rankjob import row_state

    m = peer_model(1 * MiB, head=True)
    st = strategy(m, 1, 4, dim=0)
    path = str(tmp_path / "c")
    for r in range(4):
        distckpt.save(row_state(m, r, 4), path, strategy=st, rank=r)
    distckpt.finalize(path)
    per = writer_bytes(path)
    # chunk bytes from the index (exact), or data-file sizes (headers included) when the index has no ranks
    assert len(per) == 4 and m.nbytes <= sum(per) < 1.1 * m.nbytes
    assert min(per) > 0
    b = balance_of(per)
    assert b["max_over_mean"] == max(per) / (sum(per) / 4) >= 1.0
