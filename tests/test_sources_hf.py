"""HF checkpoints read as MindFormers ones (``distckpt.sources.hf``), end to end through the verbs.

Oracles (the real peers, on CPU):
* MindFormers 1.9's ``load_hf_checkpoint`` (default layouts) and Qwen3's
  ``convert_hf_weight`` / ``convert_weight_dict`` (every layout): ``distckpt.load(HF, model=...)``
  must give bit-identical tensors, from a local directory and from S3 (moto);
* transformers' logits: MindFormers' Qwen3 forward on the weights ``distckpt.load``,
  ``load_pretrained`` and ``AutoModel.from_pretrained`` give must match within 1e-5;
  the wrong layout must not (negative control);
* per rank at TP2 / TP4 (a MindFormers-style strategy on the MindFormers names): the
  slices equal ``np.split`` of the full import, MindSpore reads the ``split --format ckpt``
  rank files back unchanged, and bytes read / bytes needed <= 1.05 (``ReadStats``, and the
  moto server's own byte count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from types import SimpleNamespace

import hfmodels as H
import ml_dtypes
import numpy as np
import pytest

import distckpt
from distckpt.cli import main
from distckpt.errors import ConfigError, FormatError, LayoutError, NotFoundError
from distckpt.execute import ReadStats
from distckpt.layout import ParamSpec, Strategy, TensorLayout
from distckpt.models import get_model_map
from distckpt.sources import open_source
from distckpt.storage import open_storage
from distckpt.strategy import save_strategy

IDS = np.random.RandomState(11).randint(0, 128, (2, H.SEQ))
NON_DEFAULT = [("contiguous", "interleaved"), ("interleaved", "contiguous"), ("contiguous", "contiguous")]


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_qwen3"))
    model = H.make_hf(path, seed=5)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_moe"))
    model = H.make_hf(path, moe=True, seed=6)
    return SimpleNamespace(path=path, model=model, tensors=H.read_hf(path), config=H.hf_config(path))


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("mfcwd"))  # MindFormers writes ./output/log
        with H.mcore_context(), H.cpu_patches():
            yield


@pytest.fixture(scope="module")
def mf_default(mf):
    return H.mf_model(H.QWEN3)


def upload(local: str, url: str) -> str:
    store = open_storage(url)
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            store.put(name, f.read())
    return url


def where(hf, backend, request) -> str:
    if backend == "local":
        return hf.path
    srv = request.getfixturevalue("s3_server")
    return upload(hf.path, srv.url(f"hf-{os.path.basename(hf.path)}-{backend}"))


def full_import(hf, model="qwen3", **layouts):
    conv = get_model_map(model).from_hf({k: v.shape for k, v in hf.tensors.items()}, hf.config, **layouts)
    return dict(conv.hf_to_mf(hf.tensors))


def assert_same(ours: dict, theirs: dict, skip=("fi_accu", "expert_load")):
    theirs = {k: v for k, v in theirs.items() if not k.endswith(skip)}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert np.array_equal(ours[k].view(np.uint8), theirs[k].view(np.uint8)), k


def max_diff(a, b):
    return float(np.max(np.abs(a - b)))


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def tmap(name: str, shape) -> list[int]:
    """MindFormers' tensor parallelism on the MindFormers names: column-parallel weights (fused QKV, fc1,
    embedding, output layer, experts by expert parallelism) split rows, row-parallel ones (linear_proj,
    linear_fc2) split columns, norms and the router replicated."""
    if len(shape) == 1 or name.endswith("router.weight"):
        return [-1] * len(shape)
    if name.endswith(("linear_proj.weight", "mlp.linear_fc2.weight")):
        return [-1, 0]
    return [0, -1]


def tp_strategy(shapes: dict, tp: int) -> Strategy:
    return Strategy({n: ParamSpec(n, TensorLayout([tp], tmap(n, s))) for n, s in shapes.items()})


def np_rank_slice(arr: np.ndarray, name: str, tp: int, r: int) -> np.ndarray:
    """Rank r's slice by plain np.split (independent of distckpt's layout code)."""
    for axis, m in enumerate(tmap(name, arr.shape)):
        if m == 0:
            return np.split(arr, tp, axis=axis)[r]
    return arr


# ---------------------------------------------------------------- MindFormers import oracles, local and S3
@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_load_is_mindformers_load_hf_checkpoint(model, backend, mf, hf_qwen3, hf_moe, request):
    from mindformers.checkpoint.checkpoint import load_hf_checkpoint

    hf = hf_qwen3 if model == "qwen3" else hf_moe
    with open(os.path.join(hf.path, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 3  # sharded
    net = H.mf_model(hf.config)
    load_hf_checkpoint(hf.path, net)
    st = ReadStats()
    ours = distckpt.load(where(hf, backend, request), model=model, stats=st)
    assert_same(ours, H.mf_params(net))
    assert st.bytes_read == st.bytes_needed == sum(v.nbytes for v in hf.tensors.values())


@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("qkv_layout,ffn_layout", NON_DEFAULT)
def test_load_is_mindformers_convert_hf_weight(qkv_layout, ffn_layout, backend, mf, hf_qwen3, request):
    net = H.mf_model(hf_qwen3.config, qkv_layout=qkv_layout, ffn_layout=ffn_layout)
    ours = distckpt.load(where(hf_qwen3, backend, request), model="qwen3", qkv_layout=qkv_layout,
                         ffn_layout=ffn_layout)
    theirs = net.convert_weight_dict(dict(hf_qwen3.tensors), qkv_dict={}, condition=threading.Condition())
    assert_same(ours, theirs)
    mm = get_model_map("qwen3")
    split = {mm.hf_to_mf_name(k): v for k, v in hf_qwen3.tensors.items()}
    fused = net.convert_hf_weight({k: v for k, v in split.items() if re.search(r"\.(linear_[qkv]|gating|hidden)\.", k)})
    assert len(fused) == 2 * H.QWEN3["num_hidden_layers"]
    assert_same({k: ours[k] for k in fused}, fused)
    default = distckpt.load(hf_qwen3.path, model="qwen3")  # negative control: the layouts differ
    changed = [k for k in fused if not np.array_equal(default[k], ours[k])]
    assert len(changed) == (2 if qkv_layout == "contiguous" else 0) + (2 if ffn_layout == "contiguous" else 0)


# ---------------------------------------------------------------- forward passes
def test_forward_matches_transformers(mf_default, hf_qwen3):
    want = H.hf_logits(hf_qwen3.model, IDS)
    assert np.abs(want).max() > 0.5
    H.mf_load(mf_default, distckpt.load(hf_qwen3.path, model="qwen3"))
    assert max_diff(H.mf_logits(mf_default, IDS), want) < 1e-5
    for wrong in ({"qkv_layout": "contiguous"}, {"ffn_layout": "contiguous"}):  # negative controls
        H.mf_load(mf_default, distckpt.load(hf_qwen3.path, model="qwen3", **wrong))
        assert max_diff(H.mf_logits(mf_default, IDS), want) > 1e-2, wrong


def test_load_pretrained_and_auto_model_take_an_hf_directory(mf_default, hf_qwen3):
    """The family comes from the model's class (TrainingQwen3ForCausalLM -> qwen3) or config.json's model_type."""
    from distckpt.mindspore import AutoModel, load_pretrained
    from distckpt.models import family_for_class

    assert family_for_class(type(mf_default)) == "qwen3"
    want = H.hf_logits(hf_qwen3.model, IDS)
    H.mf_load(mf_default, {k: np.zeros_like(v) for k, v in H.mf_params(mf_default).items()
                           if not k.endswith(("fi_accu", "expert_load"))})
    assert load_pretrained(mf_default, hf_qwen3.path, strict=True) == ([], [])
    assert max_diff(H.mf_logits(mf_default, IDS), want) < 1e-5
    load_pretrained(mf_default, hf_qwen3.path, qkv_layout="contiguous")  # negative control
    assert max_diff(H.mf_logits(mf_default, IDS), want) > 1e-2
    model, info = AutoModel.from_pretrained(
        hf_qwen3.path, seq_length=H.SEQ, compute_dtype="float32", params_dtype="float32",
        layernorm_compute_dtype="float32", softmax_compute_dtype="float32", rotary_dtype="float32",
        use_flash_attention=False, output_loading_info=True)
    assert type(model).__name__ == "TrainingQwen3ForCausalLM"
    assert info == {"missing_keys": [], "unexpected_keys": []}
    assert max_diff(H.mf_logits(model, IDS), want) < 1e-5


def test_load_pretrained_honours_the_models_layout_flags(mf, hf_qwen3):
    from distckpt.mindspore import load_pretrained

    net = H.mf_model(hf_qwen3.config, qkv_layout="contiguous", ffn_layout="contiguous")
    load_pretrained(net, hf_qwen3.path)
    assert_same({k: v for k, v in H.mf_params(net).items() if not k.endswith(("fi_accu", "expert_load"))},
                full_import(hf_qwen3, qkv_layout="contiguous", ffn_layout="contiguous"))


# ---------------------------------------------------------------- per rank: exact, and only the rank's bytes
@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("tp", [2, 4])
def test_rank_import_is_exact_and_reads_only_its_rows(model, tp, hf_qwen3, hf_moe):
    """Every tensor of every rank equals np.split of the full import.  Row slices (fused QKV, fc1, experts,
    embedding, output layer) read <= 1.05x the bytes needed.  Column slices (linear_proj, linear_fc2) are
    plain renames: the map adds nothing to what the read planner chooses for them (which, for rows this
    short, is to read whole rows rather than issue one request per row)."""
    hf = hf_qwen3 if model == "qwen3" else hf_moe
    full = full_import(hf, model)
    strat = tp_strategy({k: v.shape for k, v in full.items()}, tp)
    src = open_source(hf.path, model=model)
    plain = open_source(hf.path)
    mm = get_model_map(model)
    columns = [n for n in full if tmap(n, full[n].shape) == [-1, 0]]
    rows = [n for n in full if n not in columns]
    assert any(n.endswith(("linear_qkv.weight", "linear_fc1.weight", "experts.weight1")) for n in rows)
    for r in range(tp):
        got = distckpt.load(src, strategy=strat, rank=r)
        assert sorted(got) == sorted(full)
        for name, arr in got.items():
            assert np.array_equal(arr, np_rank_slice(full[name], name, tp, r)), (name, r)
        st = ReadStats()  # each rank reads its own rows of q, k, v (gate, up; experts)
        distckpt.load(src, strategy=strat, rank=r, names=rows, stats=st)
        assert st.bytes_needed == sum(np_rank_slice(full[n], n, tp, r).nbytes for n in rows)
        assert st.bytes_read <= 1.05 * st.bytes_needed, st.to_json()
        mapped, unmapped = ReadStats(), ReadStats()
        distckpt.load(src, strategy=strat, rank=r, names=columns, stats=mapped)
        hf_strat = Strategy({mm.mf_to_hf_name(n): ParamSpec(mm.mf_to_hf_name(n), strat.params[n].layout)
                             for n in columns})
        distckpt.load(plain, strategy=hf_strat, rank=r, names=list(hf_strat.params), stats=unmapped)
        assert mapped == unmapped


def test_rank_qkv_reads_its_own_rows_of_q_k_v(hf_qwen3):
    """TP2, interleaved: rank 1's slice of linear_qkv is KV group 1 = rows 32.. of q, 16.. of k and v."""
    src = open_source(hf_qwen3.path, model="qwen3")
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    box = TensorLayout([2], [0, -1]).box(1, src.tensors[name].shape)
    pieces = src.conversion.read_plan(name, box)
    assert [(p.name.split(".")[-2], p.src_box.offsets[0], p.src_box.sizes[0]) for p in pieces] == \
        [("q_proj", 32, 32), ("k_proj", 16, 16), ("v_proj", 16, 16)]


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_import_from_s3_reads_only_its_bytes_on_the_server(tp, hf_qwen3, s3_server):
    url = upload(hf_qwen3.path, s3_server.url(f"hf-tp{tp}"))
    full = full_import(hf_qwen3)
    strat = tp_strategy({k: v.shape for k, v in full.items()}, tp)
    rows = [n for n in full if tmap(n, full[n].shape) != [-1, 0]]  # fused QKV and fc1 among them
    src = open_source(url, model="qwen3")  # headers read here
    for r in range(tp):
        s3_server.reset()
        st = ReadStats()
        got = distckpt.load(src, strategy=strat, rank=r, names=rows, stats=st)
        server, _ = s3_server.get_bytes(f"hf-tp{tp}/")
        for n in rows:
            assert np.array_equal(got[n], np_rank_slice(full[n], n, tp, r)), (n, r)
        assert st.bytes_needed == sum(v.nbytes for v in got.values())
        assert server <= 1.05 * st.bytes_needed, (server, st.to_json())


def test_split_writes_mindspore_rank_files(hf_qwen3, tmp_path, capsys):
    """`split HF DST --dst-strategy F --model qwen3 --format ckpt`: MindSpore reads each rank's slices."""
    import mindspore as ms

    full = full_import(hf_qwen3)
    strat = tp_strategy({k: v.shape for k, v in full.items()}, 2)
    sf = save_strategy(strat, str(tmp_path / "tp2.ckpt"))
    dst = tmp_path / "ranks"
    code, _, err = cli(capsys, "split", hf_qwen3.path, dst, "--dst-strategy", sf, "--model", "qwen3",
                       "--format", "ckpt", "--quiet")
    assert code == 0, err
    for r in range(2):
        loaded = ms.load_checkpoint(str(dst / f"rank_{r}" / f"checkpoint_{r}.ckpt"))
        assert sorted(loaded) == sorted(full)
        for name, p in loaded.items():
            assert np.array_equal(p.asnumpy(), np_rank_slice(full[name], name, 2, r)), (name, r)


# ---------------------------------------------------------------- sources of every shape, dtypes, decisions
def test_one_file_bf16_source_is_bit_exact(hf_qwen3, tmp_path):
    import torch

    path = str(tmp_path / "bf16")
    hf_qwen3.model.to(torch.bfloat16).save_pretrained(path)  # one model.safetensors, bf16
    hf_qwen3.model.to(torch.float32)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    raw = distckpt.load(os.path.join(path, "model.safetensors"))  # HF names, ml_dtypes.bfloat16
    assert {v.dtype for v in raw.values()} == {np.dtype(ml_dtypes.bfloat16)}
    conv = get_model_map("qwen3").from_hf({k: v.shape for k, v in raw.items()}, hf_qwen3.config)
    want = dict(conv.hf_to_mf(raw))
    for src in (path, os.path.join(path, "model.safetensors")):  # the directory and the one file
        assert_same(distckpt.load(src, model="qwen3"), want)


def test_skipped_names_values_and_inspect(hf_qwen3, tmp_path):
    from distckpt.writers import OutItem, constant, write_safetensors_file

    t = dict(hf_qwen3.tensors)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.arange(8, dtype=np.float32)
    d = tmp_path / "extra"
    d.mkdir()
    items = [OutItem(k, "float32", v.shape, constant(v)) for k, v in t.items()]
    write_safetensors_file(open_storage(str(d)), "model.safetensors", items, {"note": "from a test"})
    shutil.copy(os.path.join(hf_qwen3.path, "config.json"), d / "config.json")
    got = distckpt.load(str(d), model="qwen3")
    assert got.pop("note") == "from a test"  # plain values pass through
    assert_same(got, full_import(hf_qwen3))
    rep = distckpt.inspect(str(d), model="qwen3")
    assert rep["kind"] == "hf"
    assert rep["model_map"]["skipped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert {r["name"] for r in rep["tensors"]} == set(full_import(hf_qwen3))
    assert distckpt.verify(str(d), model="qwen3")["ok"]


def test_tied_embeddings_skip_lm_head(tmp_path):
    path = str(tmp_path / "tied")
    H.make_hf(path, tie_word_embeddings=True, num_hidden_layers=1)
    src = open_source(path, model="qwen3")
    assert "output_layer.weight" not in src.tensors and "embedding.word_embeddings.weight" in src.tensors


def test_refusals(hf_qwen3, hf_moe, tmp_path):
    with pytest.raises(FormatError, match="no MindFormers name for the HF tensors.*mlp.experts"):
        distckpt.load(hf_moe.path, model="qwen3")
    with pytest.raises(LayoutError, match="only the name table is known"):
        distckpt.load(hf_qwen3.path, model="deepseek3")
    with pytest.raises(LayoutError, match="unknown model family 'llama9'"):
        distckpt.load(hf_qwen3.path, model="llama9")
    with pytest.raises(NotFoundError, match="no MindFormers tensor"):
        open_source(hf_qwen3.path, model="qwen3").read("model.norm.weight", None)  # type: ignore[arg-type]
    bare = tmp_path / "noconfig"
    shutil.copytree(hf_qwen3.path, bare)
    os.remove(bare / "config.json")
    with pytest.raises(ConfigError, match="no config.json beside the weights"):
        distckpt.load(str(bare), model="qwen3")
    mixed = dict(hf_qwen3.tensors)
    mixed["model.layers.0.self_attn.k_proj.weight"] = mixed["model.layers.0.self_attn.k_proj.weight"].astype(np.float16)
    d = _write_hf(tmp_path / "mixed", mixed, hf_qwen3.config)
    with pytest.raises(FormatError, match="linear_qkv.weight is fused from tensors of different dtypes"):
        distckpt.load(d, model="qwen3")


def _write_hf(path, tensors: dict, config: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


# ---------------------------------------------------------------- hostile inputs through the CLI: one line each
def _edited_index(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    p = os.path.join(dst, "model.safetensors.index.json")
    with open(p) as f:
        doc = json.load(f)
    edit(doc["weight_map"])
    with open(p, "w") as f:
        json.dump(doc, f)
    return str(dst)


def test_hostile_index_naming_a_missing_shard(hf_qwen3, tmp_path, capsys):
    def edit(wm):
        wm["model.norm.weight"] = "model-00099-of-00099.safetensors"

    d = _edited_index(hf_qwen3.path, tmp_path / "missing", edit)
    for verb in ("inspect", "verify"):
        code, _, err = cli(capsys, verb, d, "--model", "qwen3")
        assert_one_line_error(code, err, "model.safetensors.index.json", "model-00099-of-00099.safetensors")
    code, _, err = cli(capsys, "merge", d, tmp_path / "out.ckpt", "--model", "qwen3")
    assert_one_line_error(code, err, "model-00099-of-00099.safetensors")
    assert not (tmp_path / "out.ckpt").exists()


def test_hostile_shard_path_with_dotdot(hf_qwen3, tmp_path, capsys):
    outside = tmp_path / "evil.safetensors"
    shutil.copy(os.path.join(hf_qwen3.path, "model-00001-of-" + _total(hf_qwen3.path) + ".safetensors"), outside)

    def edit(wm):
        wm["model.norm.weight"] = "../evil.safetensors"

    d = _edited_index(hf_qwen3.path, tmp_path / "inner" / "dotdot", edit)
    code, _, err = cli(capsys, "inspect", d, "--model", "qwen3")
    assert_one_line_error(code, err, "../evil.safetensors")


def _total(path: str) -> str:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return sorted(set(json.load(f)["weight_map"].values()))[0].split("-of-")[1].split(".")[0]


@pytest.mark.parametrize("name,shape,needle", [
    ("model.layers.1.self_attn.k_proj.weight", (48, 64), "model.layers.1.self_attn.k_proj.weight: shape (48, 64)"
                                                         " does not fit the model map"),
    ("model.norm.weight", (3,), "model.norm.weight: shape (3,) does not fit the model map"),
    ("model.layers.0.mlp.down_proj.weight", (64, 95), "down_proj.weight: shape (64, 95) does not fit the model map"),
])
def test_hostile_tensor_shape_that_does_not_fit_the_map(name, shape, needle, hf_qwen3, tmp_path, capsys):
    bad = dict(hf_qwen3.tensors)
    bad[name] = np.zeros(shape, np.float32)
    d = _write_hf(tmp_path / "bad", bad, hf_qwen3.config)
    for argv in (("inspect", d, "--model", "qwen3"),
                 ("merge", d, tmp_path / "o.ckpt", "--model", "qwen3")):
        code, _, err = cli(capsys, *argv)
        assert_one_line_error(code, err, needle)
    with pytest.raises(FormatError, match="does not fit the model map"):
        distckpt.load(d, model="qwen3")
