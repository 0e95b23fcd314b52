"""distckpt against the real MindFormers 1.9: a tiny LlamaForCausalLM both ways.

* a directory MindFormers' ``save_pretrained`` writes loads through distckpt identically
  (``distckpt.load``, ``load_pretrained`` into a fresh model, ``split`` for a strategy);
* a model "trained as 4 ranks" (each rank's Cell holds its tensor-parallel slices) is saved
  by all ranks at once with our ``save_pretrained``, loads into 2 ranks of another layout
  exactly, and merges into directories (one ``.ckpt`` + YAML; shards + index + ``config.json``)
  that MindFormers' ``from_pretrained`` loads with identical weights and identical logits;
* our single-process layouts are MindFormers' own and load in MindFormers.

MindFormers' CPU forward pass needs ``fused_rms_norm=False, use_rope_slice=True``, fp32 and
GRAPH_MODE (DESIGN §2.3); it writes ``./output/log`` into the working directory, so the
module runs in a temporary one.  MindFormers is imported once per module (slow).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mpi_scripts.pretrained_job import CFG, FP32  # one tiny Llama config for every test
from synth import make_strategy, np_slice

import distckpt
from distckpt.mindspore import cell_state, from_numpy, load_pretrained, save_pretrained
from distckpt.testing import run_ranks

IDS = (np.arange(8, dtype=np.int32).reshape(1, 8) * 7 + 3) % 64


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    """(mindspore, mindformers, the original model, its full weights), cwd in a temp dir."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("mfcwd"))
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    import mindformers

    ms.set_seed(0)
    model = mindformers.LlamaForCausalLM(mindformers.LlamaConfig(**CFG))
    model.set_train(False)
    yield ms, mindformers, model, cell_state(model)
    mp.undo()


def _fresh(mf):
    ms, mindformers, _, _ = mf
    return mindformers.LlamaForCausalLM(mindformers.LlamaConfig(**CFG))


def _logits(mf, model):
    ms = mf[0]
    model.set_train(False)
    out = model(ms.Tensor(IDS))
    return (out[0] if isinstance(out, (tuple, list)) else out).asnumpy()


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), k


def _strategies(full: dict):
    """A 4-rank TP layout (some weights split over both axes) and a 2-rank one of another shape."""
    src, dst = {}, {}
    for name, arr in full.items():
        if arr.ndim == 2:
            src[name] = ([2, 2], [1, 0] if "w2" in name or "wo" in name else [0, -1])
            dst[name] = ([2], [-1, 0])
        else:
            src[name] = ([2, 2], [-1])
            dst[name] = ([2], [-1], 1, 2)  # replicated, optimizer-sharded over the 2 ranks
    return make_strategy(src), make_strategy(dst)


def _rank_cell(mf, strategy, full, rank, *, fill=None):
    """A fresh model whose Parameters hold ``rank``'s slices (zeros when ``fill`` is 'zeros')."""
    cell = _fresh(mf)
    for name, p in cell.parameters_dict().items():
        piece = np_slice(full[name], strategy.params[name].layout, rank)
        if fill == "zeros":
            piece = np.zeros_like(piece)
        p.set_data(from_numpy(piece), slice_shape=True)
    return cell


def test_mindformers_save_loads_through_distckpt(mf, tmp_path):
    ms, mindformers, model, full = mf
    d = str(tmp_path / "mf_saved")
    model.save_pretrained(d)  # MindFormers' own writer
    assert sorted(os.listdir(d)) == ["mindspore_model.ckpt", "mindspore_model.yaml"]
    _assert_same(distckpt.load(d), full)

    fresh = _fresh(mf)
    assert not np.array_equal(cell_state(fresh)["lm_head.weight"], full["lm_head.weight"])
    missing, unexpected = load_pretrained(fresh, d, strict=True)
    assert (missing, unexpected) == ([], [])
    _assert_same(cell_state(fresh), full)

    # ... and it splits for any strategy: each rank gets exactly its np.split slice
    s4, _ = _strategies(full)
    out = str(tmp_path / "split")
    distckpt.split(d, out, dst_strategy=s4)
    for r in range(4):
        got = distckpt.load(out, strategy=s4, rank=r)
        _assert_same(got, {n: np_slice(a, s4.params[n].layout, r) for n, a in full.items()})

    # our single-process save is MindFormers' layout: same files, same YAML, same tensors
    ours = str(tmp_path / "ours")
    save_pretrained(model, ours)
    assert sorted(os.listdir(ours)) == ["mindspore_model.ckpt", "mindspore_model.yaml"]
    import yaml

    with open(os.path.join(d, "mindspore_model.yaml")) as a, open(os.path.join(ours, "mindspore_model.yaml")) as b:
        assert yaml.safe_load(a) == yaml.safe_load(b)
    theirs = ms.load_checkpoint(os.path.join(ours, "mindspore_model.ckpt"))
    _assert_same({k: v.asnumpy() for k, v in theirs.items()}, full)


def test_distributed_save_reshard_merge_loads_in_mindformers(mf, tmp_path):
    ms, mindformers, model, full = mf
    s4, s2 = _strategies(full)
    cells = [_rank_cell(mf, s4, full, r) for r in range(4)]
    for c in cells:  # each rank really holds only its slice
        assert cell_state(c)["model.layers.0.feed_forward.w2.weight"].shape == (16, 128)
    ckpt = str(tmp_path / "dist")

    run_ranks(4, lambda r, comm: save_pretrained(cells[r], ckpt, strategy=s4, comm=comm))
    names = sorted(os.listdir(ckpt))
    assert "distckpt.index.json" in names and "mindspore_model.yaml" in names and "config.json" in names
    assert len([n for n in names if n.startswith("data-")]) == 4  # every rank wrote its part
    assert distckpt.verify(ckpt)["ok"]

    # load into 2 ranks of another layout: exact slices, loaded into sliced Parameters
    for r in range(2):
        target = _rank_cell(mf, s2, full, r, fill="zeros")
        assert load_pretrained(target, ckpt, strategy=s2, rank=r, strict=True) == ([], [])
        _assert_same(cell_state(target), {n: np_slice(a, s2.params[n].layout, r) for n, a in full.items()})
    stats = distckpt.execute.ReadStats()
    distckpt.load(ckpt, strategy=s2, rank=1, stats=stats)
    need = sum(np_slice(a, s2.params[n].layout, 1).nbytes for n, a in full.items())
    assert stats.bytes_needed == need
    # the rank reads a part of the checkpoint, never all of it (column slices of row-split
    # chunks are strided, so coalesced reads pick up some bytes in between)
    assert stats.bytes_read < sum(a.nbytes for a in full.values())

    # merge: one .ckpt + YAML (MindFormers' origin mode) -> identical weights and logits
    merged = str(tmp_path / "merged")
    distckpt.merge(ckpt, merged)
    assert "mindspore_model.ckpt" in os.listdir(merged) and "mindspore_model.yaml" in os.listdir(merged)
    loaded = mindformers.LlamaForCausalLM.from_pretrained(merged, **FP32)
    _assert_same(cell_state(loaded), full)
    want = _logits(mf, model)
    np.testing.assert_array_equal(_logits(mf, loaded), want)

    # merge sharded: shards + mindspore_model.ckpt.index.json + config.json (no YAML) -> MindFormers loads it
    sharded = str(tmp_path / "merged_sharded")
    distckpt.merge(ckpt, sharded, max_shard_size="24KB")
    files = sorted(os.listdir(sharded))
    shards = [f for f in files if f.startswith("mindspore_model-")]
    assert len(shards) > 1 and "mindspore_model.ckpt.index.json" in files and "config.json" in files
    assert not any(f.endswith(".yaml") for f in files)
    loaded2 = mindformers.LlamaForCausalLM.from_pretrained(sharded)
    _assert_same(cell_state(loaded2), full)


def test_sharded_save_loads_in_mindformers(mf, tmp_path):
    ms, mindformers, model, full = mf
    d = str(tmp_path / "sharded")
    save_pretrained(model, d, max_shard_size="20KB")
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.startswith("mindspore_model-")]
    assert shards == [f"mindspore_model-{k:05d}-of-{len(shards):05d}.ckpt" for k in range(1, len(shards) + 1)]
    assert len(shards) > 2 and "config.json" in files and not any(f.endswith(".yaml") for f in files)
    with open(os.path.join(d, "mindspore_model.ckpt.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(full)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in full.values())
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    loaded = mindformers.LlamaForCausalLM.from_pretrained(d)
    _assert_same(cell_state(loaded), full)
    _assert_same(distckpt.load(d), full)
