"""The ``distckpt`` command line: exit codes, one-line errors, outputs, and no partial output on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from synth import make_strategy, np_slice, random_tensor, read_ckpt_raw, write_native, write_strategy

import distckpt
from distckpt.cli import main
from distckpt.strategy import save_strategy

STRAT = {"wq": ([2, 2], [0, -1], 2, 2), "wo": ([2, 2], [-1, 0]), "norm": ([2, 2], [-1]), "emb": ([2, 2], [[1, 0], -1])}
SHAPES = {"wq": (8, 4), "wo": (4, 8), "norm": (4,), "emb": (8, 2)}
KINDS = {"wq": "bfloat16", "wo": "float16", "norm": "float32", "emb": "int32"}


@pytest.fixture
def native(tmp_path):
    """A 4-rank MindSpore-native checkpoint with its strategy file and model configs."""
    rng = np.random.default_rng(0)
    strat = make_strategy(STRAT)
    full = {n: random_tensor(rng, s, KINDS[n]) for n, s in SHAPES.items()}
    src = write_native(str(tmp_path / "native"), strat, full, writer="distckpt")
    with open(os.path.join(src, "llama_tiny.yaml"), "w") as f:
        f.write("model:\n  arch:\n    type: LlamaForCausalLM\n")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"hidden_size": 4}, f)
    sf = write_strategy(strat, str(tmp_path / "src_strategy.ckpt"))
    return {"src": src, "sf": sf, "full": full, "strat": strat, "tmp": tmp_path}


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def listing(path):
    out = []
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out.append((os.path.relpath(p, path), os.path.getsize(p)))
    return sorted(out)


def same(a, b):
    return str(a.dtype) == str(b.dtype) and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ exit codes
def test_exit_codes_real_process(native, tmp_path):
    env = dict(os.environ)
    ok = subprocess.run([sys.executable, "-m", "distckpt", "inspect", native["src"], "--src-strategy", native["sf"]],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "wq" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "distckpt", "merge", str(tmp_path / "nothing"), str(tmp_path / "o.ckpt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr and "nothing" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "distckpt", "merge"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    dbg = subprocess.run([sys.executable, "-m", "distckpt", "verify", str(tmp_path / "nothing"), "--debug"],
                         capture_output=True, text=True, timeout=120)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["bogus"], ["merge", "only-src"], ["split", "a", "b", "--format", "zip"], ["inspect", "x", "--nope"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 2, argv
        capsys.readouterr()


# ------------------------------------------------------------------ inspect / verify
def test_inspect_json_schema(native, capsys):
    code, out, err = cli(capsys, "inspect", native["src"], "--src-strategy", native["sf"], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["schema"] == "distckpt.inspect/1"
    assert {"src", "kind", "world_size", "strategy", "tensors", "values", "total_bytes", "files", "config_files"} <= set(info)
    assert info["kind"] == "native" and info["world_size"] == 4
    rows = {t["name"]: t for t in info["tensors"]}
    assert set(rows) == {*SHAPES, "global_step"}
    for name, shape in SHAPES.items():
        row = rows[name]
        assert {"name", "dtype", "shape", "chunks", "bytes", "layout", "replicas"} <= set(row)
        assert row["shape"] == list(shape) and row["dtype"] == KINDS[name]
        assert row["layout"]["dev_matrix"] == [2, 2]
    assert rows["wq"]["chunks"] == 4 and rows["wq"]["replicas"] == 1
    assert rows["wo"]["chunks"] == 2 and rows["wo"]["replicas"] == 2
    assert rows["norm"]["chunks"] == 1 and rows["norm"]["replicas"] == 4
    assert rows["emb"]["layout"]["tensor_map"] == [[1, 0], -1]
    assert rows["global_step"]["layout"] is None
    assert info["total_bytes"] == sum(r["bytes"] for r in info["tensors"])
    assert sorted(info["config_files"]) == ["config.json", "llama_tiny.yaml"]
    code, out, _ = cli(capsys, "inspect", native["src"], "--src-strategy", native["sf"])
    assert code == 0 and "wq" in out and "bfloat16" in out
    code, out, _ = cli(capsys, "verify", native["src"], "--src-strategy", native["sf"], "--json")
    assert code == 0 and json.loads(out)["ok"] is True


# ------------------------------------------------------------------ merge
def test_merge_outputs(native, capsys):
    tmp, src, sf, full = native["tmp"], native["src"], native["sf"], native["full"]
    # one .ckpt file
    code, _, err = cli(capsys, "merge", src, tmp / "m.ckpt", "--src-strategy", sf, "-q")
    assert code == 0, err
    raw = read_ckpt_raw(str(tmp / "m.ckpt"))
    for n, a in full.items():
        assert same(raw[n], a), n
    assert raw["global_step"].tolist() == [7]
    # one .safetensors file
    assert cli(capsys, "merge", src, tmp / "m.safetensors", "--src-strategy", sf)[0] == 0
    st = distckpt.load(tmp / "m.safetensors")
    for n, a in full.items():
        assert same(st[n], a), n
    # a MindFormers-ready directory named after the yaml stem, configs copied
    assert cli(capsys, "merge", src, tmp / "mf", "--src-strategy", sf)[0] == 0
    assert sorted(os.listdir(tmp / "mf")) == ["config.json", "llama_tiny.ckpt", "llama_tiny.yaml"]
    # sharded
    assert cli(capsys, "merge", src, tmp / "sh", "--src-strategy", sf, "--max-shard-size", "100B")[0] == 0
    names = sorted(os.listdir(tmp / "sh"))
    shards = [n for n in names if n.startswith("llama_tiny-") and n.endswith(".ckpt")]
    assert len(shards) >= 2
    total = len(shards)
    assert shards == [f"llama_tiny-{k:05d}-of-{total:05d}.ckpt" for k in range(1, total + 1)]
    # a sharded directory carries config.json, not the yaml (MindFormers would load only the first shard)
    assert "llama_tiny.ckpt.index.json" in names and "config.json" in names and "llama_tiny.yaml" not in names
    idx = json.load(open(tmp / "sh" / "llama_tiny.ckpt.index.json"))
    assert set(idx["weight_map"]) >= set(full) and set(idx["weight_map"].values()) == set(shards)
    back = distckpt.load(tmp / "sh")
    for n, a in full.items():
        assert same(back[n], a), n
    # distckpt format from the merge verb
    assert cli(capsys, "merge", src, tmp / "dc", "--src-strategy", sf, "--format", "distckpt")[0] == 0
    assert cli(capsys, "verify", tmp / "dc")[0] == 0
    # without a yaml the name is mindspore_model
    os.remove(os.path.join(src, "llama_tiny.yaml"))
    assert cli(capsys, "merge", src, tmp / "plain", "--src-strategy", sf)[0] == 0
    assert "mindspore_model.ckpt" in os.listdir(tmp / "plain")


def test_strategy_found_inside_src(native, capsys):
    shutil.copy(native["sf"], os.path.join(native["src"], "strategy.ckpt"))
    code, _, err = cli(capsys, "merge", native["src"], native["tmp"] / "m.ckpt")
    assert code == 0, err
    assert same(read_ckpt_raw(str(native["tmp"] / "m.ckpt"))["wq"], native["full"]["wq"])


# ------------------------------------------------------------------ split / reshard
@pytest.mark.parametrize("verb", ["split", "reshard"])
def test_split_reshard_ckpt_layout(native, capsys, verb):
    tmp, full = native["tmp"], native["full"]
    dst = make_strategy({"wq": ([2], [-1, 0]), "wo": ([2], [0, -1]), "norm": ([2], [0]), "emb": ([2], [-1, -1])})
    df = str(tmp / "dst.ckpt")
    save_strategy(dst, df)
    src = native["src"]
    extra = ["--src-strategy", native["sf"]]
    if verb == "split":
        assert cli(capsys, "merge", src, tmp / "one.ckpt", *extra)[0] == 0
        src, extra = tmp / "one.ckpt", []
    code, _, err = cli(capsys, verb, src, tmp / "out", "--dst-strategy", df, "--format", "ckpt", *extra)
    assert code == 0, err
    names = sorted(os.listdir(tmp / "out"))
    assert [n for n in names if n.startswith("rank_")] == ["rank_0", "rank_1"]
    assert any("strateg" in n for n in names)
    if verb == "reshard":
        assert "config.json" in names and "llama_tiny.yaml" in names
    for r in range(2):
        assert os.listdir(tmp / "out" / f"rank_{r}") == [f"checkpoint_{r}.ckpt"]
        got = read_ckpt_raw(str(tmp / "out" / f"rank_{r}" / f"checkpoint_{r}.ckpt"))
        assert got["global_step"].tolist() == [7]
        for n, a in full.items():
            assert same(got[n], np_slice(a, dst.params[n].layout, r)), (r, n)
    # the output describes itself: merge it back without --src-strategy
    assert cli(capsys, "merge", tmp / "out", tmp / "back.ckpt")[0] == 0
    back = read_ckpt_raw(str(tmp / "back.ckpt"))
    for n, a in full.items():
        assert same(back[n], a), n
    # --prefix and safetensors
    code, _, err = cli(capsys, verb, src, tmp / "pre", "--dst-strategy", df, "--format", "safetensors", "--prefix", "net_", *extra)
    assert code == 0, err
    assert os.listdir(tmp / "pre" / "rank_1") == ["net_1.safetensors"]
    # default format: one distckpt checkpoint
    assert cli(capsys, verb, src, tmp / "dc", "--dst-strategy", df, *extra)[0] == 0
    assert "distckpt.index.json" in os.listdir(tmp / "dc")
    for r in range(2):
        got = distckpt.load(tmp / "dc", strategy=df, rank=r)
        for n, a in full.items():
            assert same(got[n], np_slice(a, dst.params[n].layout, r))


def test_dst_exists_needs_overwrite(native, capsys):
    tmp = native["tmp"]
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("precious")
    (tmp / "taken.ckpt").write_bytes(b"old")
    before = listing(tmp / "taken")
    for dst in (tmp / "taken", tmp / "taken.ckpt"):
        code, _, err = cli(capsys, "merge", native["src"], dst, "--src-strategy", native["sf"])
        assert_one_line_error(code, err, str(dst), "--overwrite")
    assert listing(tmp / "taken") == before and (tmp / "taken.ckpt").read_bytes() == b"old"
    df = str(tmp / "dst.ckpt")
    save_strategy(make_strategy({n: ([1], [-1] * len(s)) for n, s in SHAPES.items()}), df)
    code, _, err = cli(capsys, "reshard", native["src"], tmp / "taken", "--dst-strategy", df, "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "already exists")
    assert listing(tmp / "taken") == before
    code, _, err = cli(capsys, "merge", native["src"], tmp / "taken.ckpt", "--src-strategy", native["sf"], "--overwrite")
    assert code == 0, err
    assert same(read_ckpt_raw(str(tmp / "taken.ckpt"))["wq"], native["full"]["wq"])
    code, _, err = cli(capsys, "merge", native["src"], tmp / "taken", "--src-strategy", native["sf"], "--overwrite")
    assert code == 0 and "keep.txt" not in os.listdir(tmp / "taken")


def _truncate_last_rank_file(src):
    p = os.path.join(src, "rank_3", "checkpoint_3.ckpt")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) - 40])
    return p


def test_failure_midway_leaves_no_partial_output(native, capsys):
    tmp = native["tmp"]
    before = set(os.listdir(tmp))
    # the truncated file is the last rank's: the first ranks' tensors are read before it fails
    _truncate_last_rank_file(native["src"])
    df = str(tmp / "dst.ckpt")
    save_strategy(make_strategy({n: ([4], [-1] * len(s)) for n, s in SHAPES.items()}), df)
    before = set(os.listdir(tmp))
    for argv in (
        ["merge", native["src"], tmp / "m.ckpt"],
        ["merge", native["src"], tmp / "mdir"],
        ["reshard", native["src"], tmp / "r", "--dst-strategy", df, "--format", "ckpt"],
        ["reshard", native["src"], tmp / "r2", "--dst-strategy", df],
    ):
        code, _, err = cli(capsys, *argv, "--src-strategy", native["sf"])
        assert_one_line_error(code, err, "checkpoint_3.ckpt")
        assert set(os.listdir(tmp)) == before, argv  # no output, no temp debris
    # a distckpt source: only the index is read up front, so the cut-short data file
    # fails half way through writing the output
    strat = make_strategy({f"t{i}": ([2], [0, -1]) for i in range(6)})
    ck = tmp / "dc"
    for r in range(2):
        distckpt.save({f"t{i}": np.full((64, 64), i, np.float32) for i in range(6)}, ck, strategy=strat, rank=r)
    distckpt.finalize(ck)
    last = sorted(n for n in os.listdir(ck) if n.startswith("data-"))[-1]
    raw = (ck / last).read_bytes()
    (ck / last).write_bytes(raw[: len(raw) // 2])
    save_strategy(make_strategy({f"t{i}": ([4], [-1, 0]) for i in range(6)}), str(tmp / "d4.ckpt"))
    before = set(os.listdir(tmp))
    for argv in (
        ["merge", ck, tmp / "m.ckpt"],
        ["merge", ck, tmp / "m.safetensors"],
        ["merge", ck, tmp / "mdir", "--max-shard-size", "20KB"],
        ["reshard", ck, tmp / "r", "--dst-strategy", tmp / "d4.ckpt", "--format", "ckpt"],
        ["split", ck, tmp / "r2", "--dst-strategy", tmp / "d4.ckpt"],
    ):
        code, _, err = cli(capsys, *argv, "--no-verify")
        assert_one_line_error(code, err, last)
        assert set(os.listdir(tmp)) == before, argv


# ------------------------------------------------------------------ bad input
def test_missing_rank_directories(native, capsys):
    big = {n: ([2, 4], tm, *rest) for n, (dm, tm, *rest) in STRAT.items()}
    big["wq"] = ([2, 4], [0, -1])
    big["emb"] = ([2, 4], [[1, 0], -1])
    sf8 = str(native["tmp"] / "s8.ckpt")
    save_strategy(make_strategy(big), sf8)
    code, _, err = cli(capsys, "merge", native["src"], native["tmp"] / "m.ckpt", "--src-strategy", sf8)
    assert_one_line_error(code, err, "strategy has 8 ranks but", "rank_0..rank_3", "missing rank_4")
    assert not os.path.exists(native["tmp"] / "m.ckpt")
    shutil.rmtree(os.path.join(native["src"], "rank_2"))
    code, _, err = cli(capsys, "merge", native["src"], native["tmp"] / "m.ckpt", "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "strategy has 4 ranks", "rank_2")


def test_strategy_does_not_match_shapes(native, capsys):
    tmp = native["tmp"]
    wrong = dict(STRAT)
    wrong["norm"] = ([2, 2], [-1, -1])  # 2 dims for a 1-d tensor
    sw = str(tmp / "wrong.ckpt")
    save_strategy(make_strategy(wrong), sw)
    code, _, err = cli(capsys, "merge", native["src"], tmp / "m.ckpt", "--src-strategy", sw)
    assert_one_line_error(code, err, "'norm'", "checkpoint_0.ckpt", "2 dims")
    # a destination that does not divide: norm (4,) over 3 devices
    d3 = str(tmp / "d3.ckpt")
    save_strategy(make_strategy({n: ([3], [0] + [-1] * (len(s) - 1)) for n, s in SHAPES.items()}), d3)
    code, _, err = cli(capsys, "reshard", native["src"], tmp / "r", "--dst-strategy", d3, "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "not divisible", "split count 3")
    # a destination naming a tensor the checkpoint lacks
    d4 = str(tmp / "d4.ckpt")
    save_strategy(make_strategy({"ghost": ([2], [0])}), d4)
    code, _, err = cli(capsys, "reshard", native["src"], tmp / "r", "--dst-strategy", d4, "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "'ghost'")
    assert not os.path.exists(tmp / "m.ckpt") and not os.path.exists(tmp / "r")


def test_source_shape_not_divisible(tmp_path, capsys):
    """A rank holds a slice whose implied global shape the layout cannot produce (uneven split)."""
    strat = make_strategy({"w": ([2], [0])})
    sf = str(tmp_path / "s.ckpt")
    save_strategy(strat, sf)
    from distckpt.codecs.ckpt import CkptWriter

    for r, rows in ((0, 3), (1, 2)):
        os.makedirs(tmp_path / "src" / f"rank_{r}")
        with open(tmp_path / "src" / f"rank_{r}" / f"checkpoint_{r}.ckpt", "wb") as f, CkptWriter(f) as w:
            w.add_tensor("w", "float32", (rows,), np.zeros(rows, np.float32))
    code, _, err = cli(capsys, "merge", tmp_path / "src", tmp_path / "m.ckpt", "--src-strategy", sf)
    assert_one_line_error(code, err, "'w'", "rank_1")
    assert not os.path.exists(tmp_path / "m.ckpt")


def test_unreadable_and_truncated_files(native, capsys):
    tmp = native["tmp"]
    p = os.path.join(native["src"], "rank_1", "checkpoint_1.ckpt")
    open(p, "wb").write(b"\x0a\xff\xff\xff\x0fgarbage")
    code, _, err = cli(capsys, "inspect", native["src"], "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "checkpoint_1.ckpt")
    code, _, err = cli(capsys, "merge", native["src"], tmp / "m.ckpt", "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "checkpoint_1.ckpt")
    assert not os.path.exists(tmp / "m.ckpt")
    # a single truncated file
    good = tmp / "one.ckpt"
    distckpt.save({"a": np.ones((64, 64), np.float32), "b": np.ones(8, np.int32)}, tmp / "dc")
    distckpt.merge(tmp / "dc", good)
    data = good.read_bytes()
    (tmp / "trunc.ckpt").write_bytes(data[: len(data) // 2])
    code, _, err = cli(capsys, "merge", tmp / "trunc.ckpt", tmp / "t.safetensors")
    assert_one_line_error(code, err, "trunc.ckpt")
    assert not os.path.exists(tmp / "t.safetensors")
    # a distckpt data file cut short: verify and merge name it
    data_file = next(n for n in os.listdir(tmp / "dc") if n.startswith("data-"))
    raw = (tmp / "dc" / data_file).read_bytes()
    (tmp / "dc" / data_file).write_bytes(raw[:-100])
    for argv in (["verify", tmp / "dc"], ["merge", tmp / "dc", tmp / "x.ckpt"]):
        code, _, err = cli(capsys, *argv)
        assert_one_line_error(code, err, data_file)
    assert not os.path.exists(tmp / "x.ckpt")
    # a flipped byte: checksum error names the tensor and file
    (tmp / "dc" / data_file).write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    code, _, err = cli(capsys, "verify", tmp / "dc")
    assert_one_line_error(code, err, "checksum", data_file)


def test_rank_file_missing_a_parameter(native, capsys):
    """remove_redundancy checkpoints (issue 11 F.29): a slice missing from one rank is taken from a replica;
    only a slice that no replica holds is an error, naming the parameter and the replica group."""
    from distckpt.codecs.ckpt import CkptWriter

    def drop(rank):
        p = os.path.join(native["src"], f"rank_{rank}", f"checkpoint_{rank}.ckpt")
        kept = {k: v for k, v in read_ckpt_raw(p).items() if k != "wo"}
        with open(p, "wb") as f, CkptWriter(f) as w:
            for k, v in kept.items():
                w.add_tensor(k, str(v.dtype), v.shape, v)

    drop(2)  # rank 2 holds the same slice of 'wo' as rank 0 (dim 1 split over the right axis only)
    code, _, err = cli(capsys, "merge", native["src"], native["tmp"] / "m.ckpt", "--src-strategy", native["sf"])
    assert code == 0, err
    assert same(read_ckpt_raw(str(native["tmp"] / "m.ckpt"))["wo"], native["full"]["wo"])
    drop(0)  # now no replica holds that slice
    code, _, err = cli(capsys, "merge", native["src"], native["tmp"] / "m2.ckpt", "--src-strategy", native["sf"])
    assert_one_line_error(code, err, "'wo'", "rank_0", "rank_2")
    assert not os.path.exists(native["tmp"] / "m2.ckpt")


def test_src_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    code, _, err = cli(capsys, "merge", tmp_path / "junk", tmp_path / "m.ckpt")
    assert_one_line_error(code, err, "not a checkpoint", "junk")
    code, _, err = cli(capsys, "inspect", tmp_path / "missing")
    assert_one_line_error(code, err, "missing")
    (tmp_path / "fake.ckpt").write_bytes(b"this is not protobuf at all")
    code, _, err = cli(capsys, "inspect", tmp_path / "fake.ckpt")
    assert_one_line_error(code, err, "fake.ckpt")
    assert not os.path.exists(tmp_path / "m.ckpt")


def test_src_with_data_files_but_no_index(tmp_path, capsys):
    distckpt.save({"a": np.ones(2, np.float32)}, tmp_path / "ck", strategy=make_strategy({"a": ([2], [0])}), rank=0)
    code, _, err = cli(capsys, "merge", tmp_path / "ck", tmp_path / "m.ckpt")
    assert_one_line_error(code, err, "not a committed checkpoint", "finalize")
    code, _, err = cli(capsys, "finalize", tmp_path / "ck")
    assert_one_line_error(code, err, "rank(s) [1]")
    distckpt.save({"a": np.full(2, 2.0, np.float32)}, tmp_path / "ck", strategy=make_strategy({"a": ([2], [0])}), rank=1)
    assert cli(capsys, "finalize", tmp_path / "ck")[0] == 0
    assert cli(capsys, "merge", tmp_path / "ck", tmp_path / "m.ckpt")[0] == 0
    assert read_ckpt_raw(str(tmp_path / "m.ckpt"))["a"].tolist() == [1, 1, 2, 2]
    # ranks that disagree on the global shape are refused at finalize, naming the tensor
    distckpt.save({"a": np.ones(3, np.float32)}, tmp_path / "bad", strategy=make_strategy({"a": ([2], [0])}), rank=0)
    distckpt.save({"a": np.ones(2, np.float32)}, tmp_path / "bad", strategy=make_strategy({"a": ([2], [0])}), rank=1)
    code, _, err = cli(capsys, "finalize", tmp_path / "bad")
    assert_one_line_error(code, err, "a:")
    assert "distckpt.index.json" not in os.listdir(tmp_path / "bad")
