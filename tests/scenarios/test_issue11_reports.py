"""Issue 11, E (items 22-24) and F (item 30): what a user reads is true and complete.

22 reports about a single ``.ckpt`` / ``.safetensors`` name the file, not its folder;
23 ``inspect --plot`` labels who holds each piece truthfully (``all 4 ranks`` for a replicated
   tensor, never a fake ``dim 1`` for a 1-D tensor, "1 distinct piece");
24 ``distckpt.save(cell)`` saves a MindSpore ``nn.Cell``'s parameters;
30 ``verify`` reports every defect (every file, every chunk), then exits 1.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from issue11_util import assert_error, cli, native_tp

import distckpt
from distckpt.errors import ChecksumError, DistCkptError
from distckpt.index import INDEX_NAME
from distckpt.layout import ParamSpec, Strategy, TensorLayout


# ------------------------------------------------------------------ item 22
@pytest.mark.parametrize("suffix", ["ckpt", "safetensors"])
def test_reports_name_the_file_of_a_single_file_source(tmp_path, capsys, suffix):
    """inspect net.ckpt printed the folder, and --json gave the folder as "src"."""
    ck = tmp_path / "ck"
    distckpt.save({"w": np.ones((2, 3), np.float32), "step": 1}, ck)
    f = tmp_path / "models" / f"net.{suffix}"
    distckpt.merge(ck, f)
    rc, out, err = cli(capsys, "inspect", f)
    assert rc == 0, err
    assert out.splitlines()[0].startswith(f"{f}  (file,"), out
    rc, out, _ = cli(capsys, "inspect", f, "--json")
    assert json.loads(out)["src"] == str(f)
    assert distckpt.inspect(f)["src"] == str(f)
    rc, out, _ = cli(capsys, "verify", f)
    assert rc == 0 and f"in {f}" in out, out
    rep = distckpt.verify(f)
    assert rep["src"] == str(f) and rep["ok"]
    # and an error about the file names the file
    f.write_bytes(f.read_bytes()[:20])
    assert str(f) in assert_error(cli(capsys, "inspect", f))


# ------------------------------------------------------------------ item 23
@pytest.fixture
def tp4(tmp_path):
    """TP4 rank files: w [8, 8] split by rows, b [8] replicated on all 4 ranks, plus global_step."""
    return native_tp(tmp_path / "tp4", 4)


def _spec(src, name, **kw):
    from distckpt.plot import plot_spec

    return plot_spec(src, name, **kw)


def test_plot_of_a_replicated_1d_tensor(tp4):
    """A replicated tensor was labelled "rank 1" (it is on all 4), drawn with a fake dim 1, "1 distinct pieces"."""
    src, strategy, _ = tp4
    spec = _spec(src, "b", src_strategy=strategy)
    assert spec["world_size"] == 4 and len(spec["cells"]) == 1
    cell = spec["cells"][0]
    assert cell["ranks"] == [0, 1, 2, 3] and cell["label"].startswith("all 4 ranks"), cell
    assert spec["xlabel"] == "dim 0 (8)" and spec["ylabel"] == "" and "dim 1" not in json.dumps(spec)
    assert "1 distinct piece" in spec["title"] and "pieces" not in spec["title"]
    g = _spec(src, "global_step", src_strategy=strategy)  # not in the strategy: a full copy on every rank
    assert g["cells"][0]["label"].startswith("all 4 ranks")


def test_plot_of_a_split_2d_tensor(tp4):
    src, strategy, _ = tp4
    spec = _spec(src, "w", src_strategy=strategy)
    assert [c["label"].split("\n")[0] for c in spec["cells"]] == ["rank 0", "rank 1", "rank 2", "rank 3"]
    assert [(c["row"], c["height"], c["col"], c["width"]) for c in spec["cells"]] == [(2 * r, 2, 0, 8) for r in range(4)]
    assert spec["xlabel"] == "dim 1 (8)" and spec["ylabel"] == "dim 0 (8)" and "4 distinct pieces" in spec["title"]


def test_plot_of_a_tensor_held_by_one_pipeline_stage(tmp_path):
    """Held by stage 0's 4 ranks of 8: "ranks 0-3 (4 replicas)", never "all 4 ranks"."""
    from synth import write_native

    strat = Strategy({"w": ParamSpec("w", TensorLayout((4,), (0, -1)), (0,)),
                      "b": ParamSpec("b", TensorLayout((4,), (-1,)), (0,)),
                      "v": ParamSpec("v", TensorLayout((4,), (-1,)), (1,))}, num_stages=2)
    full = {"w": np.ones((8, 4), np.float32), "b": np.zeros(4, np.float32), "v": np.ones(4, np.float32)}
    write_native(tmp_path / "pp", strat, full, writer="distckpt")
    distckpt.save_strategy(strat, tmp_path / "pp.json")
    spec = _spec(tmp_path / "pp", "b", src_strategy=tmp_path / "pp.json")
    assert spec["world_size"] == 8
    label = spec["cells"][0]["label"]
    assert label.startswith("ranks 0-3") and "(4 replicas)" in label and "all" not in label, label
    v = _spec(tmp_path / "pp", "v", src_strategy=tmp_path / "pp.json")["cells"][0]["label"]
    assert v.startswith("ranks 4-7"), v


def test_the_png_shows_exactly_the_spec(tp4, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from distckpt.plot import plot_tensor

    src, strategy, _ = tp4
    drawn = []
    real = matplotlib.figure.Figure.savefig

    def capture(self, *a, **k):
        ax = self.axes[0]
        drawn.append(([t.get_text() for t in ax.texts], ax.get_xlabel(), ax.get_ylabel(), ax.get_title()))
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    out = plot_tensor(src, "b", out=str(tmp_path / "b.png"), src_strategy=strategy)
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    spec = _spec(src, "b", src_strategy=strategy)
    assert drawn == [([c["label"] for c in spec["cells"]], spec["xlabel"], spec["ylabel"], spec["title"])]


# ------------------------------------------------------------------ item 24
def _net():
    import mindspore as ms

    class Net(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = ms.nn.Dense(4, 3)
            self.head = ms.nn.SequentialCell([ms.nn.ReLU(), ms.nn.Dense(3, 2)])
            self.scale = ms.Parameter(ms.Tensor(np.array([1.5, -2.25, 3e-3]), ms.bfloat16), name="scale")

    return Net()


def test_save_accepts_a_mindspore_cell(tmp_path, capsys):
    """distckpt.save(cell, ...) failed with AttributeError: 'Dense' object has no attribute 'items'."""
    import mindspore as ms

    from distckpt.mindspore import to_numpy

    net = _net()
    want = {name: to_numpy(p) for name, p in net.parameters_dict().items()}
    assert set(want) == {"dense.weight", "dense.bias", "head.1.weight", "head.1.bias", "scale"}
    distckpt.save(net, tmp_path / "ck")
    got = distckpt.load(tmp_path / "ck")
    assert set(got) == set(want)
    for name, exp in want.items():  # bf16 included, bit for bit
        assert got[name].dtype == exp.dtype and got[name].tobytes() == exp.tobytes(), name
    assert str(got["scale"].dtype) == "bfloat16"
    # and MindSpore takes it back: merge -> load_checkpoint -> load_param_into_net into a fresh Cell
    assert cli(capsys, "merge", tmp_path / "ck", tmp_path / "net.ckpt", "-q")[0] == 0
    fresh = _net()
    not_loaded, _ = ms.load_param_into_net(fresh, ms.load_checkpoint(str(tmp_path / "net.ckpt")))
    assert not not_loaded
    for name, p in fresh.parameters_dict().items():
        assert to_numpy(p).tobytes() == want[name].tobytes(), name


def test_save_refuses_a_non_model_object_clearly(tmp_path):
    with pytest.raises(DistCkptError, match="state must be a mapping"):
        distckpt.save(object(), tmp_path / "x")
    assert not (tmp_path / "x" / INDEX_NAME).exists()


# ------------------------------------------------------------------ item 30
@pytest.fixture
def damaged(tmp_path):
    """A 4-rank checkpoint with four defects in four files: two flipped chunks in one file, one in
    another, a truncated file, and a deleted file."""
    strat = Strategy({"w": ParamSpec("w", TensorLayout((4,), (0, -1))), "v": ParamSpec("v", TensorLayout((4,), (0, -1)))})
    path = tmp_path / "ck"
    w, v = np.arange(64, dtype=np.float32).reshape(8, 8), -np.arange(64, dtype=np.float32).reshape(8, 8)
    for r in range(4):
        distckpt.save({"w": w[2 * r:2 * r + 2], "v": v[2 * r:2 * r + 2]}, path, strategy=strat, rank=r)
    distckpt.finalize(path)
    idx = distckpt.sources.open_source(path).index.to_json()  # every chunk listed (version 1's JSON)
    by_rank = {c["rank"]: c["file"] for t in idx["tensors"].values() for c in t["chunks"]}
    chunks = {(t, i): c for t, td in idx["tensors"].items() for i, c in enumerate(td["chunks"])}

    def flip(tensor, i):
        c = chunks[(tensor, i)]
        with open(path / c["file"], "r+b") as f:
            f.seek(c["start"] + 5)
            b = f.read(1)
            f.seek(c["start"] + 5)
            f.write(bytes([b[0] ^ 0x40]))
        return path / c["file"], tensor, i

    bad_chunks = [flip("w", 0), flip("v", 0), flip("w", 1)]
    assert {c["file"] for (t, i), c in chunks.items() if i == 0} == {by_rank[0]}
    truncated = path / by_rank[2]
    os.truncate(truncated, 40)
    deleted = path / by_rank[3]
    deleted.unlink()
    return path, bad_chunks, truncated, deleted


def test_verify_reports_every_defect(capsys, damaged):
    """verify stopped at the first defect."""
    path, bad_chunks, truncated, deleted = damaged
    rep = distckpt.verify(path, raise_errors=False)
    assert rep["ok"] is False
    probs = rep["problems"]
    assert len(probs) == 5, probs
    assert all(set(p) == {"file", "tensor", "chunk", "what"} for p in probs)
    got_chunks = {(p["file"], p["tensor"], p["chunk"]) for p in probs if p["tensor"] is not None}
    assert got_chunks == {(str(f), t, i) for f, t, i in bad_chunks}
    assert all("checksum mismatch" in p["what"] and f"chunk {p['chunk']}" in p["what"] for p in probs if p["tensor"])
    whole = {p["file"]: p["what"] for p in probs if p["tensor"] is None}
    assert set(whole) == {str(truncated), str(deleted)}
    assert "40 bytes" in whole[str(truncated)] and "missing" in whole[str(deleted)]
    # the CLI: one error line per problem, exit 1
    rc, out, err = cli(capsys, "verify", path)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 5 and all(ln.startswith("error: ") for ln in lines), err
    assert "Traceback" not in err and "ok:" not in out
    # --json: the whole report, strict JSON, still exit 1
    rc, out, err = cli(capsys, "verify", path, "--json")
    assert rc == 1
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(c))
    assert doc["ok"] is False and doc["problems"] == probs
    # the library's default raises the first problem, counting the others, with the report attached
    with pytest.raises(DistCkptError) as ei:
        distckpt.verify(path)
    assert "4 more problem(s)" in str(ei.value) and ei.value.report["problems"] == probs  # type: ignore[attr-defined]


def test_verify_of_a_healthy_checkpoint(capsys, tmp_path):
    src, strategy, _ = native_tp(tmp_path / "n", 2)
    rep = distckpt.verify(src, src_strategy=strategy, raise_errors=False)
    assert rep["ok"] and rep["problems"] == [] and rep["tensors"] == 3
    ck = tmp_path / "ck"
    distckpt.save({"w": np.ones(4, np.float32)}, ck)
    data = next(ck.glob("data-*"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        distckpt.verify(ck)
