"""MindFormers checkpoints exported as HuggingFace models (``distckpt.writers.hf``, ``merge --format hf``).

Oracles: transformers' ``AutoModelForCausalLM.from_pretrained(DST)`` must give the logits of
MindFormers' own Qwen3 forward pass (1e-5) on the weights exported from a
``save_pretrained`` directory and from a distributed (TP2) distckpt checkpoint; the wrong
layout must not (negative control).  Round trips HF -> MindFormers -> HF are bit-exact
(bf16 included), for Qwen3 and Qwen3-MoE.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import hfmodels as H
import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt import dtypes
from distckpt.cli import main
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.models import get_model_map
from distckpt.storage import open_storage
from distckpt.writers import OutItem, constant, write_safetensors_file

IDS = np.random.RandomState(13).randint(0, 128, (2, H.SEQ))


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("mfcwd"))  # MindFormers writes ./output/log
        with H.mcore_context(), H.cpu_patches():
            yield


@pytest.fixture(scope="module")
def mf_random(mf, tmp_path_factory):
    """A random MindFormers Qwen3: its weights, its logits, a save_pretrained directory, a TP2 distckpt."""
    from distckpt.mindspore import save_pretrained

    net = H.mf_model(H.QWEN3)
    params = H.mf_params(net)
    rng = np.random.RandomState(4)
    for k, v in params.items():
        if "norm" in k:  # MindFormers initialises norms to ones: make them count
            params[k] = (1 + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype)
    H.mf_load(net, params)
    logits = H.mf_logits(net, IDS)
    root = tmp_path_factory.mktemp("mf_random")
    pretrained = save_pretrained(net, str(root / "pretrained"))
    yaml = os.path.join(pretrained, "mindspore_model.yaml")
    dist = str(root / "tp2")
    strat = tp_strategy({k: v.shape for k, v in params.items()}, 2)
    for r in range(2):
        local = {n: rank_slice(a, n, 2, r) for n, a in params.items()}
        distckpt.save(local, dist, strategy=strat, rank=r)
    distckpt.finalize(dist)
    shutil.copy(yaml, dist)
    return SimpleNamespace(net=net, params=params, logits=logits, pretrained=pretrained, dist=dist, yaml=yaml)


def tmap(name: str, shape) -> list[int]:
    """MindFormers' tensor parallelism (see tests/test_sources_hf.py)."""
    if len(shape) == 1 or name.endswith("router.weight"):
        return [-1] * len(shape)
    return [-1, 0] if name.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")) else [0, -1]


def tp_strategy(shapes: dict, tp: int) -> Strategy:
    return Strategy({n: ParamSpec(n, TensorLayout([tp], tmap(n, s))) for n, s in shapes.items()})


def rank_slice(arr, name, tp, r):
    for axis, m in enumerate(tmap(name, arr.shape)):
        if m == 0:
            return np.split(arr, tp, axis=axis)[r]
    return arr


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def transformers_logits(path: str) -> np.ndarray:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return H.hf_logits(model.eval(), IDS)


def max_diff(a, b):
    return float(np.max(np.abs(a - b)))


def write_mf(path, tensors: dict, config: dict | None = None, values: dict | None = None) -> str:
    """MindFormers-named tensors in one .safetensors file with a MindFormers YAML beside it."""
    from distckpt.mfconfig import yaml_bytes

    os.makedirs(path, exist_ok=True)
    items = [OutItem(k, dtypes.name_of(v.dtype), v.shape, constant(v)) for k, v in tensors.items()]
    store = open_storage(str(path))
    write_safetensors_file(store, "weights.safetensors", items, values or {})
    if config is not None:
        store.put("weights.yaml", yaml_bytes({"model": {"arch": {"type": "TrainingQwen3ForCausalLM"},
                                                        "model_config": {"type": "Qwen3Config", **config}}}))
    return os.path.join(str(path), "weights.safetensors")


# ---------------------------------------------------------------- transformers gives MindFormers' logits
@pytest.mark.parametrize("kind", ["pretrained", "tp2"])
def test_export_loads_in_transformers_with_mindformers_logits(kind, mf_random, tmp_path, capsys):
    src = mf_random.pretrained if kind == "pretrained" else mf_random.dist
    dst = tmp_path / "hf"
    code, out, err = cli(capsys, "merge", src, dst, "--format", "hf", "--model", "qwen3")
    assert code == 0, err
    assert err == ""  # nothing left out of a model's weights
    assert "(x1.0 of needed)" in out
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]  # 5GB default: one file
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["rope_theta"] == 10000.0
    assert "pad_token_id" not in cfg  # MindFormers' 151643 does not fit the tiny vocabulary
    assert max_diff(transformers_logits(str(dst)), mf_random.logits) < 1e-5
    for wrong in ("--qkv-layout", "--ffn-layout"):  # negative controls
        bad = tmp_path / wrong.strip("-")
        code, _, err = cli(capsys, "merge", src, bad, "--format", "hf", "--model", "qwen3", wrong, "contiguous")
        assert code == 0, err
        assert max_diff(transformers_logits(str(bad)), mf_random.logits) > 1e-2, wrong


def test_export_reads_every_byte_once_and_shards(mf_random, tmp_path):
    total = sum(v.nbytes for v in mf_random.params.values())
    rep = distckpt.merge(mf_random.dist, tmp_path / "hf", format="hf", model="qwen3", max_shard_size="40KB")
    assert rep["read"]["bytes_read"] == rep["read"]["bytes_needed"] == total  # checksummed blocks included
    names = sorted(os.listdir(tmp_path / "hf"))
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 3 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    exported = dict(get_model_map("qwen3").mf_to_hf(mf_random.params, H.QWEN3))
    assert sorted(index["weight_map"]) == sorted(exported)
    assert index["metadata"]["total_size"] == total
    got = H.read_hf(str(tmp_path / "hf"))
    for k, v in exported.items():
        assert np.array_equal(got[k], v), k
    assert max_diff(transformers_logits(str(tmp_path / "hf")), mf_random.logits) < 1e-5


def test_hf_config_is_copied_and_must_fit(mf_random, tmp_path):
    cfg = dict(H.QWEN3, architectures=["Qwen3ForCausalLM"], model_type="qwen3", note="kept as is")
    (tmp_path / "given.json").write_text(json.dumps(cfg, indent=1))
    distckpt.merge(mf_random.pretrained, tmp_path / "hf", format="hf", model="qwen3",
                   hf_config=str(tmp_path / "given.json"))
    assert (tmp_path / "hf" / "config.json").read_bytes() == (tmp_path / "given.json").read_bytes()
    (tmp_path / "small.json").write_text(json.dumps(dict(cfg, hidden_size=32, head_dim=8)))
    with pytest.raises(distckpt.errors.FormatError, match="does not fit the model map"):
        distckpt.merge(mf_random.pretrained, tmp_path / "hf2", format="hf", model="qwen3",
                       hf_config=str(tmp_path / "small.json"))
    assert not (tmp_path / "hf2").exists()


# ---------------------------------------------------------------- round trips, layouts, dtypes, leftovers
@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_qwen3"))
    model = H.make_hf(path, seed=8)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_moe"))
    model = H.make_hf(path, moe=True, seed=9)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.mark.parametrize("qkv_layout,ffn_layout", [("contiguous", "contiguous"), ("interleaved", "contiguous")])
def test_layouts_default_from_the_mindformers_config(qkv_layout, ffn_layout, hf_qwen3, tmp_path):
    mf_t = distckpt.load(hf_qwen3.path, model="qwen3", qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    flags = {"use_contiguous_weight_layout_attention": qkv_layout == "contiguous",
             "use_interleaved_weight_layout_mlp": ffn_layout == "interleaved"}
    src = write_mf(tmp_path / "mf", mf_t, dict(H.QWEN3, **flags))
    distckpt.merge(src, tmp_path / "hf", format="hf", model="qwen3")
    got = H.read_hf(str(tmp_path / "hf"))
    assert sorted(got) == sorted(hf_qwen3.tensors)
    for k, v in hf_qwen3.tensors.items():
        assert np.array_equal(got[k], v), k
    assert max_diff(transformers_logits(str(tmp_path / "hf")), H.hf_logits(hf_qwen3.model, IDS)) < 1e-5
    distckpt.merge(src, tmp_path / "forced", format="hf", model="qwen3", qkv_layout="interleaved",
                   ffn_layout="interleaved")  # an explicit layout wins over the flags: here the wrong one
    forced = H.read_hf(str(tmp_path / "forced"))
    assert not np.array_equal(forced["model.layers.0.mlp.gate_proj.weight"],
                              hf_qwen3.tensors["model.layers.0.mlp.gate_proj.weight"])


def test_moe_round_trip_is_bit_exact(hf_moe, tmp_path):
    mf_t = distckpt.load(hf_moe.path, model="qwen3_moe")
    mf_t["decoder.layers.0.mlp.router.fi_accu"] = np.zeros(4, np.float32)  # a buffer with no HF name
    src = write_mf(tmp_path / "mf", mf_t, dict(H.QWEN3_MOE))
    rep = distckpt.merge(src, tmp_path / "hf", format="hf", model="qwen3_moe")
    assert rep["read"]["bytes_read"] == sum(v.nbytes for v in hf_moe.tensors.values())
    got = H.read_hf(str(tmp_path / "hf"))
    assert sorted(got) == sorted(hf_moe.tensors)
    for k, v in hf_moe.tensors.items():
        assert np.array_equal(got[k], v), k
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["architectures"], cfg["num_experts"], cfg["moe_intermediate_size"]) == (["Qwen3MoeForCausalLM"], 4, 32)
    assert max_diff(transformers_logits(str(tmp_path / "hf")), H.hf_logits(hf_moe.model, IDS)) < 1e-5


def test_bf16_kept_and_training_leftovers_reported(hf_qwen3, tmp_path, capsys):
    rng = np.random.RandomState(1)
    mf_t = {k: rng.randint(0, 1 << 16, v.shape).astype(np.uint16).view(ml_dtypes.bfloat16)
            for k, v in distckpt.load(hf_qwen3.path, model="qwen3").items()}
    mf_t["adam_m.decoder.final_layernorm.weight"] = np.zeros(64, np.float32)
    src = write_mf(tmp_path / "mf", mf_t, dict(H.QWEN3, params_dtype="bfloat16"), values={"global_step": 7, "run": "a"})
    code, _, err = cli(capsys, "merge", src, tmp_path / "hf", "--format", "hf", "--model", "qwen3")
    assert code == 0
    assert err.startswith("warning: --format hf: left out 2 tensor(s)") and "1 plain value(s)" in err
    assert "adam_m.decoder.final_layernorm.weight" in err and "global_step" in err
    got = distckpt.load(str(tmp_path / "hf"))  # distckpt reads bf16 as ml_dtypes.bfloat16
    weights = {k: v for k, v in mf_t.items() if not k.startswith("adam")}
    want = dict(get_model_map("qwen3").mf_to_hf(weights, H.QWEN3))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == ml_dtypes.bfloat16 and np.array_equal(got[k].view(np.uint16), v.view(np.uint16)), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_refusals(hf_qwen3, tmp_path, capsys):
    mf_t = distckpt.load(hf_qwen3.path, model="qwen3")
    no_cfg = write_mf(tmp_path / "nocfg", mf_t)
    code, _, err = cli(capsys, "merge", no_cfg, tmp_path / "a", "--format", "hf", "--model", "qwen3")
    assert code == 1 and err.startswith("error: ") and "pass --hf-config" in err
    code, _, err = cli(capsys, "merge", hf_qwen3.path, tmp_path / "b", "--format", "hf")
    assert code != 0 and "--format hf needs --model" in err
    code, _, err = cli(capsys, "merge", hf_qwen3.path, tmp_path / "c", "--format", "hf", "--model", "qwen3")
    assert code == 1 and "no tensor has a MindFormers name of model family 'qwen3'" in err
    assert not any((tmp_path / n).exists() for n in "abc")
