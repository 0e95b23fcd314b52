"""PreTrainedModel / PretrainedConfig / AutoModel and save_pretrained / load_pretrained on a tiny Cell.

Distributed saves run N ranks as threads with a real communicator (every rank calls
``save_pretrained`` at once); model names resolve over a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil

import mindspore as ms
import numpy as np
import pytest
import yaml
from httpserver import FileServer
from mindspore import nn
from synth import make_strategy, np_slice

import distckpt
from distckpt.errors import ConfigError, DistributedError, DownloadError
from distckpt.mindspore import (
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
    cell_state,
    from_numpy,
    load_pretrained,
    save_pretrained,
)
from distckpt.testing import run_ranks


class TinyConfig(PretrainedConfig):
    model_type = "tiny_lm"

    def __init__(self, vocab_size=16, hidden_size=8, num_heads=2, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads


class TinyLM(PreTrainedModel):
    """Embedding + projection; ``shard=(strategy, rank)`` builds the rank's sliced Parameters."""

    config_class = TinyConfig

    def __init__(self, config, shard=None):
        super().__init__(config)
        shapes = {"emb": (config.vocab_size, config.hidden_size), "proj": (config.hidden_size, config.vocab_size)}
        if shard is not None:
            strategy, rank = shard
            shapes = {n: strategy.box(n, rank, s).sizes for n, s in shapes.items()}
        rng = np.random.default_rng()
        self.emb = ms.Parameter(ms.Tensor(rng.standard_normal(shapes["emb"]).astype(np.float32)), name="emb")
        self.proj = ms.Parameter(ms.Tensor(rng.standard_normal(shapes["proj"]).astype(np.float32)), name="proj")
        self.pruned = {}
        self.post_init()

    def construct(self, ids):
        return ms.ops.matmul(ms.ops.gather(self.emb, ids, 0), self.proj)

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def get_output_embeddings(self):
        return None

    def _prune_heads(self, heads):
        for layer, hs in heads.items():
            self.pruned.setdefault(layer, []).extend(hs)

    def prepare_inputs_for_generation(self, ids, **kwargs):
        return {"ids": ids}


class Plain(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 2)


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _rank_cells(full: dict, strategy) -> list:
    """One TinyLM per rank whose Parameters hold that rank's slices (as semi-auto parallel gives them)."""
    cells = []
    for r in range(strategy.world_size):
        c = TinyLM(TinyConfig(), shard=(strategy, r))
        for n, p in c.parameters_dict().items():
            p.set_data(from_numpy(np_slice(full[n], strategy.params[n].layout, r)))
        cells.append(c)
    return cells


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for var in ("DISTCKPT_HUB_URL", "DISTCKPT_CACHE", "RANK_ID", "DISTCKPT_CHECKPOINT_SAVE_FOLDER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def test_save_and_from_pretrained_local_dir(tmp_path):
    model = TinyLM(TinyConfig(vocab_size=12))
    d = str(tmp_path / "m")
    model.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["mindspore_model.ckpt", "mindspore_model.yaml"]
    with open(os.path.join(d, "mindspore_model.yaml")) as f:
        doc = yaml.safe_load(f)
    assert doc["model"]["arch"]["type"] == "TinyLM"
    assert doc["model"]["model_config"]["type"] == "TinyConfig" and doc["model"]["model_config"]["vocab_size"] == 12
    _same({k: v.asnumpy() for k, v in ms.load_checkpoint(os.path.join(d, "mindspore_model.ckpt")).items()}, cell_state(model))

    loaded = TinyLM.from_pretrained("ignored", pretrained_model_name_or_path=d)  # the kwarg overrides
    assert isinstance(loaded.config, TinyConfig) and loaded.config.vocab_size == 12
    _same(cell_state(loaded), cell_state(model))
    auto = AutoModel.from_pretrained(d)
    assert type(auto) is TinyLM
    _same(cell_state(auto), cell_state(model))
    cfg = AutoConfig.from_pretrained(d)
    assert type(cfg) is TinyConfig and cfg.architectures == ["TinyLM"]
    # config fields given as kwargs override the saved ones
    assert TinyLM.from_pretrained(d, num_heads=4).config.num_heads == 4


def test_sharded_layout_and_config_json(tmp_path):
    model = TinyLM(TinyConfig())
    d = str(tmp_path / "s")
    model.save_pretrained(d, save_json=True, max_shard_size=600)  # 512 bytes per tensor -> 2 shards
    files = sorted(os.listdir(d))
    assert files == ["config.json", "mindspore_model-00001-of-00002.ckpt", "mindspore_model-00002-of-00002.ckpt",
                     "mindspore_model.ckpt.index.json"]
    with open(os.path.join(d, "config.json")) as f:
        cj = json.load(f)
    assert cj["architectures"] == ["TinyLM"] and cj["model_type"] == "tiny_lm"
    assert type(AutoModel.from_pretrained(d)) is TinyLM
    _same(cell_state(AutoModel.from_pretrained(d)), cell_state(model))
    # a later single-file save into the same directory replaces the shards
    model.save_pretrained(d)
    assert "mindspore_model-00001-of-00002.ckpt" not in os.listdir(d)
    _same(distckpt.load(d), cell_state(model))


def test_fsspec_url_round_trip():
    model = TinyLM(TinyConfig())
    url = "memory://distckpt-pretrained/tiny"
    model.save_pretrained(url)
    _same(cell_state(TinyLM.from_pretrained(url)), cell_state(model))
    _same(cell_state(AutoModel.from_pretrained(url)), cell_state(model))


def test_model_name_downloads_once_then_cache(tmp_path):
    model = TinyLM(TinyConfig(vocab_size=10))
    hub_root = tmp_path / "hub"
    model.save_pretrained(str(hub_root / "tiny-10"), max_shard_size=300)
    (hub_root / "models.json").write_text(json.dumps(["tiny-10"]))
    cache = str(tmp_path / "cache")
    with FileServer(hub_root) as srv:
        loaded = AutoModel.from_pretrained("tiny-10", hub_url=srv.url, cache_dir=cache)
        _same(cell_state(loaded), cell_state(model))
        assert any(p.endswith("mindspore_model.ckpt.index.json") for _, p, _ in srv.gets())
        srv.clear_log()
        again = TinyLM.from_pretrained("tiny-10", hub_url=srv.url, cache_dir=cache)
        _same(cell_state(again), cell_state(model))
        assert srv.requests == []  # served from the cache
        assert TinyLM.get_model_support_list(hub_url=srv.url) == ["tiny-10"]
        with pytest.raises(DownloadError, match="nope"):
            TinyLM.from_pretrained("nope", hub_url=srv.url, cache_dir=cache)
        url = srv.url
    # the server is gone: the cache alone serves it
    off = TinyLM.from_pretrained("tiny-10", hub_url=url, cache_dir=cache, local_files_only=True)
    _same(cell_state(off), cell_state(model))
    _same(cell_state(AutoModel.from_pretrained("tiny-10", cache_dir=cache, local_files_only=True)), cell_state(model))


def test_distributed_save_then_load_in_another_layout(tmp_path):
    full_model = TinyLM(TinyConfig())
    full = cell_state(full_model)
    s4 = make_strategy({"emb": ([2, 2], [1, 0]), "proj": ([2, 2], [-1, 0])})  # proj replicated over axis 1
    s2 = make_strategy({"emb": ([2], [-1, 0]), "proj": ([2], [0, -1])})
    cells = _rank_cells(full, s4)
    d = str(tmp_path / "dist")
    run_ranks(4, lambda r, comm: cells[r].save_pretrained(d, strategy=s4, comm=comm))
    names = os.listdir(d)
    assert {"distckpt.index.json", "mindspore_model.yaml", "config.json"} <= set(names)
    assert distckpt.verify(d)["ok"]
    _same(distckpt.load(d), full)
    for r in range(2):
        m = TinyLM.from_pretrained(d, strategy=s2, rank=r, shard=(s2, r))
        _same(cell_state(m), {n: np_slice(a, s2.params[n].layout, r) for n, a in full.items()})
    # merged: MindFormers' single-process layout, loadable by from_pretrained
    out = str(tmp_path / "merged")
    distckpt.merge(d, out)
    assert {"mindspore_model.ckpt", "mindspore_model.yaml"} <= set(os.listdir(out))
    _same(cell_state(AutoModel.from_pretrained(out)), full)
    # a full model loads the distributed save directly, too
    fresh = TinyLM(TinyConfig())
    assert load_pretrained(fresh, d, strict=True) == ([], [])
    _same(cell_state(fresh), full)


def test_rank_mode_save_needs_finalize(tmp_path, monkeypatch):
    full_model = TinyLM(TinyConfig())
    full = cell_state(full_model)
    s2 = make_strategy({"emb": ([2], [0, -1]), "proj": ([2], [-1, 0])})
    d = str(tmp_path / "rk")
    with pytest.raises(DistributedError, match="RANK_ID"):
        save_pretrained(TinyLM(TinyConfig(), shard=(s2, 0)), d, strategy=s2)
    for r in range(2):
        c = TinyLM(TinyConfig(), shard=(s2, r))
        for n, p in c.parameters_dict().items():
            p.set_data(from_numpy(np_slice(full[n], s2.params[n].layout, r)))
        monkeypatch.setenv("RANK_ID", str(r))
        save_pretrained(c, d, strategy=s2)
    with pytest.raises(distckpt.NotCommittedError):
        distckpt.load(d)
    distckpt.finalize(d)
    _same(distckpt.load(d), full)


def test_load_pretrained_any_cell_and_strict(tmp_path):
    net = Plain()
    d = str(tmp_path / "plain")
    save_pretrained(net, d)
    with open(os.path.join(d, "mindspore_model.yaml")) as f:
        assert yaml.safe_load(f)["model"]["arch"]["type"] == "Plain"
    other = Plain()
    assert load_pretrained(other, d) == ([], [])
    _same(cell_state(other), cell_state(net))
    distckpt.save({**cell_state(net), "extra": np.zeros(3, np.float32)}, str(tmp_path / "x"))
    assert load_pretrained(Plain(), str(tmp_path / "x")) == ([], ["extra"])
    with pytest.raises(distckpt.FormatError, match="extra"):
        load_pretrained(Plain(), str(tmp_path / "x"), strict=True)
    with pytest.raises(TypeError, match="bogus"):
        load_pretrained(Plain(), d, bogus=1)


def test_model_helpers(tmp_path):
    model = TinyLM(TinyConfig(vocab_size=16))
    before = cell_state(model)["emb"]
    model.resize_token_embeddings(20)
    after = cell_state(model)["emb"]
    assert after.shape == (20, 8) and np.array_equal(after[:16], before) and model.config.vocab_size == 20
    model.resize_token_embeddings(10)
    assert cell_state(model)["emb"].shape == (10, 8) and np.array_equal(cell_state(model)["emb"], before[:10])

    model.prune_heads({0: [1], 1: [0, 1]})
    model.prune_heads({0: [1, 0]})  # head 1 of layer 0 is already gone
    assert model.pruned == {0: [1, 0], 1: [0, 1]}
    assert model.config.pruned_heads == {0: [0, 1], 1: [0, 1]}

    assert TinyLM.can_generate() is True
    assert PreTrainedModel.can_generate() is False
    assert PreTrainedModel.get_default_checkpoint_save_folder() == os.path.join(str(tmp_path), "checkpoint_save")

    class NoEmb(PreTrainedModel):
        pass

    with pytest.raises(NotImplementedError):
        NoEmb(PretrainedConfig()).resize_token_embeddings(3)
    with pytest.raises(NotImplementedError, match="_prune_heads"):
        NoEmb(PretrainedConfig()).prune_heads({0: [0]})
    with pytest.raises(ConfigError):
        TinyLM({"vocab_size": 3})


def test_register_for_auto_class(tmp_path):
    class CustomConfig(PretrainedConfig):
        model_type = "custom_xyz"

    class CustomModel(PreTrainedModel):
        config_class = CustomConfig

        def __init__(self, config):
            super().__init__(config)
            self.w = ms.Parameter(ms.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), name="w")

    CustomModel.register_for_auto_class(AutoModel)  # a class or a name
    assert CustomModel._auto_class == "AutoModel"
    m = CustomModel(CustomConfig(a=1))
    m.save_pretrained(str(tmp_path / "c"))
    # rename the architecture on disk: AutoModel still finds it through the config's model_type
    d = tmp_path / "c2"
    shutil.copytree(tmp_path / "c", d)
    p = d / "mindspore_model.yaml"
    doc = yaml.safe_load(p.read_text())
    doc["model"]["arch"]["type"] = "SomethingElse"
    p.write_text(yaml.safe_dump(doc))
    got = AutoModel.from_pretrained(str(d))
    assert type(got) is CustomModel and got.config.a == 1
    with pytest.raises(ConfigError, match="valid auto class"):
        CustomModel.register_for_auto_class("AutoTokenizer")
    doc["model"]["arch"]["type"] = "Unknown"
    doc["model"]["model_config"]["type"] = "UnknownConfig"
    doc["model"]["model_config"]["model_type"] = "unknown"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="Unknown"):
        AutoModel.from_pretrained(str(d))


def test_save_to_default_folder(tmp_path):
    model = TinyLM(TinyConfig())
    model.save_pretrained()
    assert sorted(os.listdir(tmp_path / "checkpoint_save")) == ["mindspore_model.ckpt", "mindspore_model.yaml"]


def test_pretrained_on_every_backend(storage_url):
    """save_pretrained / from_pretrained on a local path, memory:// and s3:// (moto over HTTP)."""
    model = TinyLM(TinyConfig())
    full = cell_state(model)
    single = storage_url.rstrip("/") + "/single"
    model.save_pretrained(single)
    _same(cell_state(TinyLM.from_pretrained(single)), full)
    # distributed: 4 thread-ranks save at once, 2 ranks of another layout read their slices
    s4 = make_strategy({"emb": ([2, 2], [1, 0]), "proj": ([2, 2], [-1, 0])})
    s2 = make_strategy({"emb": ([2], [-1, 0]), "proj": ([2], [0, -1])})
    cells = _rank_cells(full, s4)
    dist = storage_url.rstrip("/") + "/dist"
    run_ranks(4, lambda r, comm: cells[r].save_pretrained(dist, strategy=s4, comm=comm))
    for r in range(2):
        m = TinyLM.from_pretrained(dist, strategy=s2, rank=r, shard=(s2, r))
        _same(cell_state(m), {n: np_slice(a, s2.params[n].layout, r) for n, a in full.items()})
