"""distckpt.models against MindFormers 1.9 and transformers (the real peers), plus plan properties.

Oracles:
* MindFormers' own tables (``weight_mapping`` of every family) must equal ours.
* Import: ``mindformers.checkpoint.load_hf_checkpoint`` (default layouts) and the model
  classes' ``convert_hf_weight`` / ``convert_weight_dict`` (every layout) must give
  bit-identical tensors; ``TrainModelMixin.concat_*`` and the converter ops
  (``QKVConvertOp``, ``ConcatConvertOp``, ``ExpertsConvertOp``) are the oracles of
  the hypothesis tests over random shapes, and of the per-rank QKV at TP > 1.
* MindFormers' Qwen3 forward pass on the imported weights must give transformers'
  logits (1e-5), and transformers must give MindFormers' logits on exported weights.
* Negative controls: the wrong ``qkv_layout`` / ``ffn_layout`` breaks those comparisons.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from types import SimpleNamespace

import hfmodels as H
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distckpt.errors import ConfigError, FormatError, LayoutError
from distckpt.layout import Box, TensorLayout, full_box
from distckpt.models import (
    MODEL_FAMILIES,
    WEIGHT_MAPPINGS,
    ModelConfig,
    get_model_map,
    hf_config_for,
    layouts_from_mf_config,
    mf_config_from_hf,
    mindformers_weight_mapping,
)
from distckpt.models.ops import experts_fc1_op, experts_fc2_op, fc1_op, qkv_op

LAYOUTS = [("interleaved", "interleaved"), ("contiguous", "interleaved"), ("interleaved", "contiguous"),
           ("contiguous", "contiguous")]
IDS = np.random.RandomState(7).randint(0, 128, (2, H.SEQ))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_qwen3"))
    model = H.make_hf(path, seed=1)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_qwen3_moe"))
    model = H.make_hf(path, moe=True, seed=2)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    """MindFormers mcore context + the CPU patches, cwd in a temp dir (MindFormers writes ./output/log)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("mfcwd"))
        with H.mcore_context(), H.cpu_patches():
            yield


@pytest.fixture(scope="module")
def mf_default(mf):
    """One MindFormers Qwen3 with the default layouts; its graph compiles once and is reused."""
    return H.mf_model(H.QWEN3)


def _shapes(tensors):
    return {k: v.shape for k, v in tensors.items()}


def _import(hf, model="qwen3", **layouts):
    conv = get_model_map(model).from_hf(_shapes(hf.tensors), hf.config, **layouts)
    return conv, dict(conv.hf_to_mf(hf.tensors))


def _assert_same(ours: dict, theirs: dict, skip=("fi_accu", "expert_load")):
    theirs = {k: v for k, v in theirs.items() if not k.endswith(skip)}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert np.array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8)), k


# ---------------------------------------------------------------- tables
@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_tables_are_mindformers_tables(family):
    theirs = mindformers_weight_mapping(family)
    if family == "telechat2":  # MindFormers wrote this table as a set literal: its order is arbitrary
        assert sorted(WEIGHT_MAPPINGS[family]) == sorted(theirs)
    else:
        assert list(WEIGHT_MAPPINGS[family]) == theirs


def test_unknown_family_and_names_only_families():
    with pytest.raises(LayoutError, match="unknown model family 'llama9'.*qwen3"):
        get_model_map("llama9")
    mm = get_model_map("deepseek3")
    assert mm.status == "names"
    assert mm.hf_to_mf_name("model.layers.3.self_attn.kv_b_proj.weight") == \
        "decoder.layers.3.self_attention.linear_kv_up_proj.weight"
    with pytest.raises(LayoutError, match="only the name table is known"):
        mm.from_hf({}, {})


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_names_round_trip(model, hf_qwen3, hf_moe):
    hf = hf_qwen3 if model == "qwen3" else hf_moe
    mm = get_model_map(model)
    for name in hf.tensors:
        assert mm.mf_to_hf_name(mm.hf_to_mf_name(name)) == name
    with pytest.raises(FormatError, match="no HF name"):
        mm.mf_to_hf_name("decoder.layers.0.mystery.weight")


# ---------------------------------------------------------------- MindFormers import oracles
@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_import_is_load_hf_checkpoint(model, mf, hf_qwen3, hf_moe):
    """Default layouts: bit-identical to MindFormers' own load_hf_checkpoint, same names and shapes."""
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint

    hf = hf_qwen3 if model == "qwen3" else hf_moe
    with open(os.path.join(hf.path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 3  # a sharded checkpoint
    net = H.mf_model(hf.config)
    load_hf_checkpoint(hf.path, net)
    _, ours = _import(hf, model)
    _assert_same(ours, H.mf_params(net))


@pytest.mark.parametrize("qkv_layout,ffn_layout", LAYOUTS)
def test_import_is_convert_hf_weight(qkv_layout, ffn_layout, mf, hf_qwen3):
    """Every layout: bit-identical to Qwen3's convert_hf_weight and convert_weight_dict."""
    net = H.mf_model(hf_qwen3.config, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    mm = get_model_map("qwen3")
    _, ours = _import(hf_qwen3, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    split = {mm.hf_to_mf_name(k): v for k, v in hf_qwen3.tensors.items()}
    need_concat = {k: v for k, v in split.items() if re.search(r"\.(linear_[qkv]|gating|hidden)\.", k)}
    fused = net.convert_hf_weight(need_concat)
    assert len(fused) == 2 * H.QWEN3["num_hidden_layers"]
    _assert_same({k: ours[k] for k in fused}, fused)
    full = net.convert_weight_dict(dict(hf_qwen3.tensors), qkv_dict={}, condition=threading.Condition())
    _assert_same(ours, full)


def test_moe_import_is_convert_weight_dict(mf, hf_moe):
    net = H.mf_model(hf_moe.config)
    _, ours = _import(hf_moe, "qwen3_moe")
    theirs = net.convert_weight_dict(dict(hf_moe.tensors), qkv_dict={}, condition=threading.Condition())
    _assert_same(ours, theirs)


def test_load_hf_checkpoint_ignores_layout_flags(mf, hf_qwen3):
    """MindFormers' own loader always writes the default layouts (the bug docs/models.md describes)."""
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint

    net = H.mf_model(hf_qwen3.config, qkv_layout="contiguous", ffn_layout="contiguous")
    load_hf_checkpoint(hf_qwen3.path, net)
    _, default = _import(hf_qwen3)
    _, right = _import(hf_qwen3, qkv_layout="contiguous", ffn_layout="contiguous")
    _assert_same(default, H.mf_params(net))
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not np.array_equal(right[name], default[name])


# ---------------------------------------------------------------- forward passes (logits)
def _max_diff(a, b):
    return float(np.max(np.abs(a - b)))


def test_forward_matches_transformers(mf_default, hf_qwen3):
    want = H.hf_logits(hf_qwen3.model, IDS)
    assert np.abs(want).max() > 0.5  # the logits are not trivially small
    _, ours = _import(hf_qwen3)
    H.mf_load(mf_default, ours)
    assert _max_diff(H.mf_logits(mf_default, IDS), want) < 1e-5
    # negative controls: either wrong layout breaks the model
    for layouts in ({"qkv_layout": "contiguous"}, {"ffn_layout": "contiguous"}):
        _, wrong = _import(hf_qwen3, **layouts)
        H.mf_load(mf_default, wrong)
        assert _max_diff(H.mf_logits(mf_default, IDS), want) > 1e-2, layouts


def test_forward_non_default_layouts(mf, hf_qwen3):
    """Contiguous QKV + contiguous gate/up: ours match transformers; MindFormers' loader does not."""
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint

    want = H.hf_logits(hf_qwen3.model, IDS)
    net = H.mf_model(hf_qwen3.config, qkv_layout="contiguous", ffn_layout="contiguous")
    _, ours = _import(hf_qwen3, qkv_layout="contiguous", ffn_layout="contiguous")
    H.mf_load(net, ours)
    assert _max_diff(H.mf_logits(net, IDS), want) < 1e-5
    load_hf_checkpoint(hf_qwen3.path, net)
    assert _max_diff(H.mf_logits(net, IDS), want) > 1e-1


def test_export_loads_in_transformers(mf_default, tmp_path):
    """A random MindFormers Qwen3 -> mf_to_hf -> model.safetensors + config.json -> transformers' logits."""
    import transformers
    from safetensors.numpy import save_file

    fresh = H.mf_params(H.mf_model(H.QWEN3))  # MindFormers' own initialisation
    rng = np.random.RandomState(3)
    for k, v in fresh.items():
        if "norm" in k:  # MindFormers initialises norms to ones: make them count
            fresh[k] = (1 + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype)
    H.mf_load(mf_default, fresh)
    want = H.mf_logits(mf_default, IDS)
    mf_cfg = dict(H.QWEN3, type="Qwen3Config", params_dtype="float32")
    hf_cfg = hf_config_for("qwen3", mf_cfg)
    assert hf_cfg["rope_theta"] == 10000.0 and hf_cfg["architectures"] == ["Qwen3ForCausalLM"]

    def export(path, **layouts):
        os.makedirs(path)
        save_file(dict(get_model_map("qwen3").mf_to_hf(fresh, mf_cfg, **layouts)),
                  os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f)
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        return H.hf_logits(model.eval(), IDS)

    assert _max_diff(export(str(tmp_path / "ok")), want) < 1e-5
    assert _max_diff(export(str(tmp_path / "badq"), qkv_layout="contiguous"), want) > 1e-2
    assert _max_diff(export(str(tmp_path / "badf"), ffn_layout="contiguous"), want) > 1e-2


def test_moe_experts_compute_what_transformers_experts_compute(hf_moe):
    """weight1/weight2 as MindFormers' grouped GEMM reads them (SwiGLU over the two column halves)."""
    import torch

    conv, ours = _import(hf_moe, "qwen3_moe")
    E, Hd, F = 4, H.QWEN3_MOE["hidden_size"], H.QWEN3_MOE["moe_intermediate_size"]
    w1 = ours["decoder.layers.1.mlp.experts.weight1"].reshape(E, Hd, 2 * F)  # ffn.py: reshape to [E, h, 2H]
    w2 = ours["decoder.layers.1.mlp.experts.weight2"].reshape(E, F, Hd)
    x = np.random.RandomState(0).standard_normal((5, Hd)).astype(np.float32)
    for e in range(E):
        a = x @ w1[e]
        gate, up = a[:, :F], a[:, F:]
        got = (gate / (1 + np.exp(-gate)) * up) @ w2[e]
        with torch.no_grad():
            want = hf_moe.model.model.layers[1].mlp.experts[e](torch.from_numpy(x)).numpy()
        assert np.allclose(got, want, atol=1e-5), e


# ---------------------------------------------------------------- bf16 and full transforms
@pytest.mark.parametrize("qkv_layout,ffn_layout", LAYOUTS)
def test_bf16_bit_exact_round_trip(qkv_layout, ffn_layout, hf_moe):
    rng = np.random.RandomState(0)
    bf = {k: rng.randint(0, 1 << 16, v.shape).astype(np.uint16).view(ml_dtypes.bfloat16)
          for k, v in hf_moe.tensors.items()}
    mm = get_model_map("qwen3_moe")
    conv = mm.from_hf(_shapes(bf), hf_moe.config, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    mf_t = dict(conv.hf_to_mf({k: (lambda v=v: v) for k, v in bf.items()}))  # getters work too
    assert all(v.dtype == ml_dtypes.bfloat16 for v in mf_t.values())
    back = dict(mm.mf_to_hf(mf_t, hf_moe.config, qkv_layout=qkv_layout, ffn_layout=ffn_layout))
    _assert_same(back, bf)
    again = dict(mm.hf_to_mf(back, hf_moe.config, qkv_layout=qkv_layout, ffn_layout=ffn_layout))
    _assert_same(again, mf_t)


def test_fusing_refuses_mixed_dtypes(hf_qwen3):
    t = dict(hf_qwen3.tensors)
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].astype(np.float16)
    conv = get_model_map("qwen3").from_hf(_shapes(t), hf_qwen3.config)
    with pytest.raises(FormatError, match="k_proj.weight: dtype float16 differs"):
        dict(conv.hf_to_mf(t))


# ---------------------------------------------------------------- plans: properties
def _random_box(data, shape):
    offs, sizes = [], []
    for n in shape:
        lo = data.draw(st.integers(0, n))
        hi = data.draw(st.integers(lo, n))
        offs.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offs), tuple(sizes))


def _slices(box):
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))


def _random_op(data):
    kind = data.draw(st.sampled_from(["qkv", "fc1", "w1", "w2"]))
    cols = data.draw(st.integers(0, 3))
    tail = (cols,) if cols else ()
    if kind == "qkv":
        ng, rep, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        layout = data.draw(st.sampled_from(["interleaved", "contiguous"]))
        shapes = [(ng * rep * d, *tail), (ng * d, *tail), (ng * d, *tail)]
        return qkv_op("qkv", ["q", "k", "v"], shapes, num_heads=ng * rep, num_kv_heads=ng, head_dim=d,
                      layout=layout)
    if kind == "fc1":
        f = data.draw(st.integers(1, 6))
        return fc1_op("fc1", ["g", "u"], [(f, *tail)] * 2, layout=data.draw(st.sampled_from(["interleaved",
                                                                                                 "contiguous"])))
    E, h, f = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    if kind == "w1":
        return experts_fc1_op("w1", [f"{p}{e}" for e in range(E) for p in "gu"], [(f, h)] * (2 * E), num_experts=E)
    return experts_fc2_op("w2", [f"d{e}" for e in range(E)], [(h, f)] * E, num_experts=E)


def _hf_arrays(op, seed=0):
    rng = np.random.RandomState(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(op.hf_names, op.hf_shapes)}


def _run_import(op, hf, box):
    out = np.full(box.sizes, np.nan, np.float32)
    hits = np.zeros(box.sizes, np.int64)
    for p in op.read_plan(box):
        assert p.unit_step and p.name in hf
        p.apply_box(hf[p.name][_slices(p.src_box)], out)  # a reader hands over just the box it fetched
        hits[p.dst] += 1
    return out, hits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_read_plan_fills_any_box_exactly(data):
    op = _random_op(data)
    hf = _hf_arrays(op)
    full = op.assemble([hf[n] for n in op.hf_names])
    box = _random_box(data, op.mf_shape)
    got, hits = _run_import(op, hf, box)
    assert np.array_equal(got, full[_slices(box)])
    assert (hits == 1).all()  # every element once: no overlap, no gap
    assert sum(p.src_box.numel for p in op.read_plan(box)) == box.numel  # no over-read


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_export_plan_fills_any_hf_box_exactly(data):
    op = _random_op(data)
    hf = _hf_arrays(op)
    full = op.assemble([hf[n] for n in op.hf_names])
    name = data.draw(st.sampled_from(op.hf_names))
    shape = op.hf_shapes[op.hf_names.index(name)]
    box = _random_box(data, shape)
    out = np.full(box.sizes, np.nan, np.float32)
    hits = np.zeros(box.sizes, np.int64)
    pieces = op.export_plan(name, box)
    for p in pieces:
        assert p.name == op.mf_name
        p.apply(full, out)
        hits[p.dst] += 1
    assert np.array_equal(out, hf[name][_slices(box)])
    assert (hits == 1).all()
    assert sum(p.numel for p in pieces) == box.numel
    assert [np.array_equal(a, hf[n]) for n, a in zip(op.hf_names, op.split(full))] == [True] * len(op.hf_names)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ng=st.integers(1, 4), rep=st.integers(1, 3), d=st.integers(1, 4), cols=st.integers(0, 5),
       f=st.integers(1, 6), E=st.integers(1, 3))
def test_full_transforms_are_mindformers_functions(ng, rep, d, cols, f, E):
    """Random shapes, with MindFormers' own numpy functions as the oracle."""
    from mindformers.checkpoint.converter.convert_op import ConcatConvertOp, ExpertsConvertOp, QKVConvertOp
    from mindformers.parallel_core.utils.model_mixin import TrainModelMixin as T

    tail = (cols,) if cols else ()
    rng = np.random.RandomState(ng * 100 + cols)
    q, k, v = (rng.standard_normal((n * d, *tail)).astype(np.float32) for n in (ng * rep, ng, ng))
    g, u = (rng.standard_normal((f, *tail)).astype(np.float32) for _ in "gu")
    kw = dict(num_heads=ng * rep, num_kv_heads=ng, head_dim=d)
    qkv_i = qkv_op("x.qkv", "qkv", [q.shape, k.shape, v.shape], **kw).assemble([q, k, v])
    qkv_c = qkv_op("x.qkv", "qkv", [q.shape, k.shape, v.shape], layout="contiguous", **kw).assemble([q, k, v])
    fc1_i = fc1_op("x.fc1", "gu", [g.shape, u.shape]).assemble([g, u])
    fc1_c = fc1_op("x.fc1", "gu", [g.shape, u.shape], layout="contiguous").assemble([g, u])
    ref = T.concat_qkv_interleaved(None, q, k, v, "a.linear_q.w", d, ng, ng * rep)["a.linear_qkv.w"]
    assert np.array_equal(qkv_i.ravel(), ref.ravel())
    assert np.array_equal(qkv_c, T.concat_qkv_contiguous(None, q, k, v, "a.linear_q.w")["a.linear_qkv.w"])
    assert np.array_equal(fc1_i.ravel(), T.concat_linear_fc1_interleaved(None, g, u, "a.gating.w", f)
                          ["a.linear_fc1.w"].ravel())
    assert np.array_equal(fc1_c, T.concat_linear_fc1_contiguous(None, g, u, "a.gating.w")["a.linear_fc1.w"])
    assert np.array_equal(fc1_i, ConcatConvertOp(hf_names=["g", "u"], mf_names=["x"], dim=0)._hf_to_mf([g, u])[0])
    if cols:
        op = QKVConvertOp(hf_names=["q", "k", "v"], mf_names=["x"], num_attention_heads=ng * rep,
                          num_query_groups=ng, kv_channels=d, hidden_size=cols, tensor_model_parallel_size=1,
                          optimizer_parallel_size=1)
        assert np.array_equal(qkv_i, op._hf_to_mf([q, k, v])[0])
        h = cols
        gates = [rng.standard_normal((f, h)).astype(np.float32) for _ in range(E)]
        ups = [rng.standard_normal((f, h)).astype(np.float32) for _ in range(E)]
        downs = [rng.standard_normal((h, f)).astype(np.float32) for _ in range(E)]
        eop = dict(num_moe_experts=E, hidden_size=h, moe_ffn_hidden_size=f, expert_parallel_size=1,
                   optimizer_parallel_size=1)
        stacked = [np.stack(x).reshape(E * x[0].shape[0], -1) for x in (gates, ups, downs)]  # as ReshardLoader
        w1 = ExpertsConvertOp(hf_names=["g", "u"], mf_names=["w1"], **eop)._hf_to_mf(stacked[:2])[0]
        w2 = ExpertsConvertOp(hf_names=["d"], mf_names=["w2"], **eop)._hf_to_mf(stacked[2:])[0]
        interleaved = [a for pair in zip(gates, ups) for a in pair]
        names = [f"{p}{e}" for e in range(E) for p in "gu"]
        assert np.array_equal(w1, experts_fc1_op("w1", names, [(f, h)] * 2 * E, num_experts=E)
                              .assemble(interleaved))
        assert np.array_equal(w2, experts_fc2_op("w2", [f"d{e}" for e in range(E)], [(h, f)] * E, num_experts=E)
                              .assemble(downs))


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_qkv_is_mindformers_qkv_of_the_rank_rows(tp):
    """QKVConvertOp on a rank's own q/k/v rows (what MindFormers does at TP) = our plan for that rank's box."""
    from mindformers.checkpoint.converter.convert_op import QKVConvertOp

    ng, rep, d, hid = 4, 3, 2, 5
    op = qkv_op("qkv", ["q", "k", "v"], [(ng * rep * d, hid), (ng * d, hid), (ng * d, hid)], num_heads=ng * rep,
                num_kv_heads=ng, head_dim=d)
    hf = _hf_arrays(op)
    mfop = QKVConvertOp(hf_names=["q", "k", "v"], mf_names=["x"], num_attention_heads=ng * rep, num_query_groups=ng,
                        kv_channels=d, hidden_size=hid, tensor_model_parallel_size=tp, optimizer_parallel_size=1)
    lay = TensorLayout([tp], [0, -1])
    for r in range(tp):
        local = [np.split(hf[n], tp)[r] for n in "qkv"]
        want = mfop._hf_to_mf(local)[0]
        pieces = op.read_plan(lay.box(r, op.mf_shape))
        assert [p.name for p in pieces] == ["q", "k", "v"] * (ng // tp)
        got, _ = _run_import(op, hf, lay.box(r, op.mf_shape))
        assert np.array_equal(got, want)


def _tp_boxes(shape, axis, tp):
    """Rank boxes splitting ``axis`` into ``tp`` (np.array_split bounds: uneven when tp does not divide)."""
    if axis is None:
        return [full_box(shape)] * tp
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(shape[axis]), tp)])
    out = []
    for r in range(tp):
        offs = [0] * len(shape)
        sizes = list(shape)
        offs[axis], sizes[axis] = int(bounds[r]), int(bounds[r + 1] - bounds[r])
        out.append(Box(tuple(offs), tuple(sizes)))
    return out


def _tp_axis(name, ndim):
    """MindFormers' TP split: column-parallel (qkv, fc1, embedding, output, experts by EP) on dim 0,
    row-parallel (linear_proj, linear_fc2) on dim 1, norms replicated."""
    if ndim == 1:
        return None
    return 1 if name.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")) else 0


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("tp", [2, 3, 4])
@pytest.mark.parametrize("qkv_layout,ffn_layout", LAYOUTS[::3])
def test_rank_read_plans_on_the_tiny_models(model, tp, qkv_layout, ffn_layout, hf_qwen3, hf_moe):
    """Every tensor, every rank (TP2, uneven TP3, TP4): exact, and bytes read == bytes needed."""
    hf = hf_qwen3 if model == "qwen3" else hf_moe
    conv, full = _import(hf, model, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    read = needed = 0
    for name, shape in conv.mf_shapes.items():
        for box in _tp_boxes(shape, _tp_axis(name, len(shape)), tp):
            got, hits = _run_import(conv.op_for_mf(name), hf.tensors, box)
            assert np.array_equal(got, full[name][_slices(box)]), (name, box)
            assert (hits == 1).all()
            read += sum(p.src_box.numel for p in conv.read_plan(name, box))
            needed += box.numel
    assert read == needed
    if model == "qwen3" and qkv_layout == "interleaved" and tp == 2:  # a rank's QKV = its own q, k, v rows
        name = "decoder.layers.0.self_attention.linear_qkv.weight"
        pieces = conv.read_plan(name, _tp_boxes(conv.mf_shapes[name], 0, 2)[1])
        assert [(p.name.split(".")[-2], p.src_box.offsets[0], p.src_box.sizes[0]) for p in pieces] == \
            [("q_proj", 32, 32), ("k_proj", 16, 16), ("v_proj", 16, 16)]


def test_export_plans_on_the_tiny_model(hf_moe):
    conv, full = _import(hf_moe, "qwen3_moe")
    exp = get_model_map("qwen3_moe").from_mf(conv.mf_shapes, hf_moe.config)
    assert exp.hf_shapes == {k: v.shape for k, v in hf_moe.tensors.items()}
    for name, want in hf_moe.tensors.items():
        for box in _tp_boxes(want.shape, 0, 3):
            out = np.empty(box.sizes, np.float32)
            for p in exp.export_plan(name, box):
                p.apply(full[p.name], out)
            assert np.array_equal(out, want[_slices(box)]), name
    pieces = exp.export_plan("model.layers.0.mlp.experts.2.up_proj.weight")
    assert [(p.name, p.src_box, p.transpose) for p in pieces] == \
        [("decoder.layers.0.mlp.experts.weight1", Box((128, 32), (64, 32)), True)]


# ---------------------------------------------------------------- hostile / malformed input
def test_shape_that_does_not_fit_the_map(hf_qwen3):
    shapes = _shapes(hf_qwen3.tensors)
    shapes["model.layers.1.self_attn.k_proj.weight"] = (48, 64)
    with pytest.raises(FormatError, match=r"model.layers.1.self_attn.k_proj.weight: shape \(48, 64\) does not fit"):
        get_model_map("qwen3").from_hf(shapes, hf_qwen3.config)
    mf_shapes = {"decoder.layers.0.self_attention.linear_qkv.weight": (100, 64)}
    with pytest.raises(FormatError, match=r"linear_qkv.weight: shape \(100, 64\) does not fit"):
        get_model_map("qwen3").from_mf(mf_shapes, hf_qwen3.config)
    conv = get_model_map("qwen3").from_hf(_shapes(hf_qwen3.tensors), hf_qwen3.config)
    bad = dict(hf_qwen3.tensors, **{"model.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(FormatError, match=r"model.norm.weight: shape \(3,\) does not fit"):
        dict(conv.hf_to_mf(bad))


def test_missing_and_unknown_tensors(hf_qwen3, hf_moe):
    shapes = _shapes(hf_qwen3.tensors)
    del shapes["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(FormatError, match=r"layers.0.self_attention.linear_qkv.weight: cannot fuse: missing parts \['v'\]"):
        get_model_map("qwen3").from_hf(shapes, hf_qwen3.config)
    shapes = _shapes(hf_moe.tensors)
    del shapes["model.layers.1.mlp.experts.3.down_proj.weight"]
    with pytest.raises(FormatError, match=r"experts.weight2: cannot fuse: missing parts \[\(3, 'linear_fc2'\)\]"):
        get_model_map("qwen3_moe").from_hf(shapes, hf_moe.config)
    shapes = dict(_shapes(hf_qwen3.tensors), **{"vision.patch_embed.weight": (3, 3)})
    with pytest.raises(FormatError, match="no MindFormers name for the HF tensors \\['vision.patch_embed.weight'\\]"):
        get_model_map("qwen3").from_hf(shapes, hf_qwen3.config)
    lenient = get_model_map("qwen3").from_hf(shapes, hf_qwen3.config, strict=False)
    assert "vision.patch_embed.weight" not in lenient.hf_shapes
    assert lenient.skipped == ("vision.patch_embed.weight",)
    with pytest.raises(FormatError, match="config has no experts"):
        get_model_map("qwen3_moe").from_hf(_shapes(hf_moe.tensors), hf_qwen3.config)
    conv = get_model_map("qwen3").from_hf(_shapes(hf_qwen3.tensors), hf_qwen3.config)
    with pytest.raises(LayoutError, match="does not lie inside"):
        conv.read_plan("decoder.final_layernorm.weight", Box((60,), (8,)))
    with pytest.raises(LayoutError, match="not a MindFormers tensor"):
        conv.read_plan("decoder.layers.9.mlp.linear_fc1.weight")


def test_tied_embeddings(tmp_path):
    path = str(tmp_path / "tied")
    H.make_hf(path, tie_word_embeddings=True, num_hidden_layers=1)
    t, cfg = H.read_hf(path), H.hf_config(path)
    assert "lm_head.weight" not in t
    conv = get_model_map("qwen3").from_hf(_shapes(t), cfg)
    assert "output_layer.weight" not in conv.mf_shapes
    t["lm_head.weight"] = t["model.embed_tokens.weight"]  # some tied checkpoints still carry it
    assert get_model_map("qwen3").from_hf(_shapes(t), cfg).mf_shapes == conv.mf_shapes
    untied = dict(cfg, tie_word_embeddings=False)
    with pytest.raises(FormatError, match="no output_layer.weight"):
        get_model_map("qwen3").from_mf(conv.mf_shapes, untied)


# ---------------------------------------------------------------- configs
def test_model_config_from_hf_and_mindformers(hf_qwen3, hf_moe):
    from mindformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig

    hf_cfg = ModelConfig.from_dict(hf_moe.config)
    assert hf_cfg == ModelConfig(2, 64, 4, 2, 16, 96, 128, 4, 32, False)
    yaml_like = {"model": {"model_config": {"type": "Qwen3MoeConfig", **H.QWEN3_MOE}}}
    assert ModelConfig.from_dict(yaml_like) == hf_cfg
    megatron = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                    ffn_hidden_size=96, vocab_size=128, num_moe_experts=4, moe_ffn_hidden_size=32)
    assert ModelConfig.from_dict(megatron) == hf_cfg
    mf_cfg = mf_config_from_hf(hf_moe.config, mf_type="Qwen3MoeConfig")
    assert mf_cfg["type"] == "Qwen3MoeConfig"
    made = Qwen3MoeConfig(**{k: v for k, v in mf_cfg.items() if k != "type"})
    assert (made.num_experts, made.moe_intermediate_size, made.head_dim) == (4, 32, 16)
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelConfig.from_dict(dict(hf_qwen3.config, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="intermediate_size / ffn_hidden_size must be an integer"):
        ModelConfig.from_dict({k: v for k, v in hf_qwen3.config.items() if k != "intermediate_size"})


def test_layouts_from_mindformers_config():
    assert layouts_from_mf_config({}) == ("interleaved", "interleaved")
    assert layouts_from_mf_config({"model": {"model_config": {"use_contiguous_weight_layout_attention": True,
                                                              "use_interleaved_weight_layout_mlp": False}}}) == \
        ("contiguous", "contiguous")
    with pytest.raises(ConfigError):
        layouts_from_mf_config({"use_interleaved_weight_layout_mlp": "yes"})


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_hf_config_from_mindformers_config_loads_in_transformers(model, tmp_path):
    import transformers

    base = H.QWEN3_MOE if model == "qwen3_moe" else H.QWEN3
    mf_cfg = {"type": "X", **{k: v for k, v in base.items() if k != "rope_theta"}, "rotary_base": 500000.0,
              "params_dtype": "bfloat16", "rope_parameters": {"rope_theta": 1.0}}
    cfg = hf_config_for(model, mf_cfg)
    assert cfg["rope_theta"] == 500000.0 and cfg["torch_dtype"] == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == ("Qwen3MoeConfig" if model == "qwen3_moe" else "Qwen3Config")
    assert ModelConfig.from_dict(loaded.to_dict()) == ModelConfig.from_dict(base)
    assert loaded.rope_theta == 500000.0
    assert math.isclose(loaded.rms_norm_eps, 1e-6)


def test_moe_with_dense_layers_is_refused(hf_moe):
    """MindFormers' Qwen3-MoE has no dense layers (mlp_only_layers is ignored): refuse, naming the tensors."""
    shapes = dict(_shapes(hf_moe.tensors), **{"model.layers.1.mlp.gate_proj.weight": (96, 64)})
    with pytest.raises(FormatError, match=r"no MindFormers name for the HF tensors \['model.layers.1.mlp.gate_proj"):
        get_model_map("qwen3_moe").from_hf(shapes, hf_moe.config)


def test_export_from_a_training_checkpoint_leaves_out_non_weights(hf_moe):
    conv, _ = _import(hf_moe, "qwen3_moe")
    training = dict(conv.mf_shapes)
    training.update({"adam_m.decoder.layers.0.mlp.router.weight": (4, 64), "global_step": (1,),
                     "decoder.layers.0.mlp.router.fi_accu": (4,)})
    mm = get_model_map("qwen3_moe")
    with pytest.raises(FormatError, match="adam_m.decoder.layers.0.mlp.router.weight: no HF name"):
        mm.from_mf(training, hf_moe.config)
    exp = mm.from_mf(training, hf_moe.config, strict=False)
    assert sorted(exp.skipped) == ["adam_m.decoder.layers.0.mlp.router.weight",
                                   "decoder.layers.0.mlp.router.fi_accu", "global_step"]
    assert exp.hf_shapes == _shapes(hf_moe.tensors)
