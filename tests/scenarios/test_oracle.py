"""Differential tests: MindSpore's own tools are the oracle (DESIGN §2.3).

Strategy files are synthesized (MindSpore cannot emit them on a CPU), native
``rank_r/checkpoint_r.ckpt`` files are written by ``mindspore.save_checkpoint``
(or our writer) from slices cut with plain ``np.split`` (``synth.np_slice``),
and then:

* ``mindspore.transform_checkpoints`` and ``distckpt.reshard(..., format="ckpt")``
  must give the same files: same names, same dtypes, the same bytes;
* ``distckpt.load(src, strategy=dst, rank=r)`` must equal MindSpore's ``rank_r``;
* ``distckpt.merge`` must equal the full tensors and ``merge_sliced_parameter``.

Observed dtype behaviour of the oracle (mindspore 2.9): ``transform_checkpoints``
upcasts bf16 to fp32 in memory but writes ``BFloat16`` back, so its files keep
every dtype; we assert both outputs keep the source dtype and compare raw bytes.
"""

from __future__ import annotations

import math
import os

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
import synth
from synth import make_strategy, np_slice, random_model, random_strategy, read_ckpt_raw, write_native, write_strategy

import distckpt

BF16 = np.dtype(ml_dtypes.bfloat16)
EXTRAS = {"global_step": np.array([7], dtype=np.int32)}


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype (by name: MindSpore's asnumpy bf16 is its own numpy type), shape and bytes."""
    return str(a.dtype) == str(b.dtype) and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def rank_file(root, r, prefix="checkpoint_"):
    return os.path.join(root, f"rank_{r}", f"{prefix}{r}.ckpt")


class Case:
    """A source checkpoint + strategy and a destination strategy, written to disk."""

    def __init__(self, tmp, src_strat, dst_strat, full, *, native_writer="ms", strat_writer="distckpt"):
        self.tmp = str(tmp)
        self.src_strat, self.dst_strat, self.full = src_strat, dst_strat, full
        self.sf = write_strategy(src_strat, os.path.join(self.tmp, "src_strategy.ckpt"), writer=strat_writer)
        self.df = write_strategy(
            dst_strat, os.path.join(self.tmp, "dst_strategy.ckpt"), writer="pb2" if strat_writer == "distckpt" else "distckpt"
        )
        self.src = write_native(os.path.join(self.tmp, "src"), src_strat, full, extras=EXTRAS, writer=native_writer)

    def expected(self, r: int) -> dict[str, np.ndarray]:
        """rank r of the destination, computed independently with np.split."""
        stage = r // self.dst_strat.stage_device_num
        out = {}
        for name, arr in self.full.items():
            spec = self.dst_strat.params[name]
            if stage in spec.stages:
                out[name] = np_slice(arr, spec.layout, r)
        out.update(EXTRAS)
        return out


def compare_dirs(case: Case, ms_dir: str, ours_dir: str) -> None:
    for r in range(case.dst_strat.world_size):
        theirs = read_ckpt_raw(rank_file(ms_dir, r))
        ours = read_ckpt_raw(rank_file(ours_dir, r))
        want = case.expected(r)
        assert sorted(ours) == sorted(theirs) == sorted(want), f"rank {r}"
        for name in want:
            assert ours[name].dtype == want[name].dtype, (r, name)  # never upcast
            assert theirs[name].dtype == want[name].dtype, (r, name)  # MindSpore writes bf16 back too
            assert same_bytes(ours[name], theirs[name]), (r, name)
            assert same_bytes(ours[name], want[name]), (r, name)


def run_both(case: Case, tmp) -> tuple[str, str]:
    ms_dir, ours_dir = os.path.join(str(tmp), "dst_ms"), os.path.join(str(tmp), "dst_ours")
    ms.transform_checkpoints(case.src, ms_dir, "checkpoint_", case.sf, case.df)
    rep = distckpt.reshard(case.src, ours_dir, dst_strategy=case.df, src_strategy=case.sf, format="ckpt")
    assert rep["ranks"] == case.dst_strat.world_size
    return ms_dir, ours_dir


# (id, src devices/stage, src stages, dst devices/stage, dst stages, opt src, opt dst, nested, seed)
CASES = [
    ("8to4", 8, 1, 4, 1, False, False, False, 0),
    ("4to8", 4, 1, 8, 1, False, False, False, 1),
    ("8to4-opt", 8, 1, 4, 1, True, True, False, 2),
    ("4to8-opt", 4, 1, 8, 1, True, True, False, 3),
    ("8to8-opt-dst", 8, 1, 8, 1, False, True, False, 4),
    ("pp2x4-to-4", 4, 2, 4, 1, True, False, False, 5),
    ("8-to-pp2x2", 8, 1, 2, 2, False, True, False, 6),
    ("pp2x2-to-pp2x4", 2, 2, 4, 2, True, True, False, 7),
    ("nested-8to4", 8, 1, 4, 1, False, False, True, 8),
    ("nested-4to8-opt", 4, 1, 8, 1, True, True, True, 9),
]


@pytest.mark.parametrize("cid,sd,ss,dd,ds,so,do,nested,seed", CASES, ids=[c[0] for c in CASES])
def test_reshard_matches_transform_checkpoints(tmp_path, cid, sd, ss, dd, ds, so, do, nested, seed):
    rng = np.random.default_rng(seed)
    model = random_model(rng, n_params=5, num_stages=max(ss, ds))
    src = random_strategy(rng, model, sd, nested=nested, opt=so, num_stages=ss)
    dst = random_strategy(rng, model, dd, nested=nested, opt=do, num_stages=ds)
    for strat, opt in ((src, so), (dst, do)):  # the case really exercises what it claims
        lays = [p.layout for p in strat.params.values()]
        assert any(lay.opt_shard_size for lay in lays) == opt
        if nested:
            assert any(len(e) > 1 for lay in lays for e in lay.tensor_map)
        assert any(math.prod(lay.full_splits()) > 1 for lay in lays)
    if ss > 1 and ds > 1:  # keep the same stage assignment on both sides
        assert all(src.params[n].stages == dst.params[n].stages for n in model.shapes)
    full = synth.full_tensors(rng, model)
    case = Case(
        tmp_path, src, dst, full,
        native_writer="ms" if seed % 2 == 0 else "distckpt",
        strat_writer="pb2" if seed % 3 == 0 else "distckpt",
    )
    ms_dir, ours_dir = run_both(case, tmp_path)
    compare_dirs(case, ms_dir, ours_dir)
    # online load of any rank equals MindSpore's file for that rank
    for r in range(dst.world_size):
        got = distckpt.load(case.src, strategy=case.df, rank=r, src_strategy=case.sf)
        theirs = read_ckpt_raw(rank_file(ms_dir, r))
        assert sorted(got) == sorted(theirs)
        for name in theirs:
            assert same_bytes(got[name], theirs[name]), (r, name)
    # the strategy copy in DST describes the output: merging it gives the full tensors back
    merged = distckpt.load(ours_dir)
    for name, arr in full.items():
        assert same_bytes(merged[name], arr), name


def test_tp_dp_swap(tmp_path):
    """TP4 x DP2 -> TP2 x DP4 -> and the column/row swap; MindSpore agrees byte for byte."""
    rng = np.random.default_rng(11)
    shapes = {"wq": (48, 24), "wo": (24, 48), "norm": (48,), "emb": (96, 24)}
    kinds = {"wq": "bfloat16", "wo": "float16", "norm": "float32", "emb": "int32"}
    full = {n: synth.random_tensor(rng, s, kinds[n]) for n, s in shapes.items()}
    tp4dp2 = make_strategy(
        {"wq": ([2, 4], [0, -1]), "wo": ([2, 4], [-1, 0]), "norm": ([2, 4], [-1]), "emb": ([2, 4], [0, -1])}
    )
    tp2dp4 = make_strategy(
        {"wq": ([4, 2], [-1, 0]), "wo": ([4, 2], [0, -1]), "norm": ([4, 2], [0]), "emb": ([4, 2], [-1, 1])}
    )
    case = Case(tmp_path, tp4dp2, tp2dp4, full)
    ms_dir, ours_dir = run_both(case, tmp_path)
    compare_dirs(case, ms_dir, ours_dir)
    # and back: TP2xDP4 -> TP4xDP2 from our own output gives the original files
    back = os.path.join(str(tmp_path), "back")
    distckpt.reshard(ours_dir, back, dst_strategy=case.sf, format="ckpt")
    for r in range(8):
        a, b = read_ckpt_raw(rank_file(back, r)), read_ckpt_raw(rank_file(case.src, r))
        assert sorted(a) == sorted(b)
        for n in a:
            assert same_bytes(a[n], b[n]), (r, n)


def test_transform_checkpoint_by_rank(tmp_path):
    rng = np.random.default_rng(21)
    model = random_model(rng, n_params=4)
    case = Case(tmp_path, random_strategy(rng, model, 8, opt=True), random_strategy(rng, model, 4, opt=True), synth.full_tensors(rng, model))
    for r in (0, 3):
        needed = ms.rank_list_for_transform(r, case.sf, case.df)
        files = {i: rank_file(case.src, i) for i in needed}
        out = os.path.join(str(tmp_path), f"by_rank_{r}.ckpt")
        ms.transform_checkpoint_by_rank(r, files, out, case.sf, case.df)
        theirs = read_ckpt_raw(out)
        ours = distckpt.load(case.src, strategy=case.df, rank=r, src_strategy=case.sf)
        assert sorted(ours) == sorted(theirs)
        for name in theirs:
            assert same_bytes(ours[name], theirs[name]), (r, name)


def test_merge_matches_full_and_merge_sliced_parameter(tmp_path):
    rng = np.random.default_rng(31)
    shapes = {"a.bf16": (48, 24), "b.f16": (24, 24, 24), "c.f32": (48,), "d.i32": (24, 48)}
    full = {n: synth.random_tensor(rng, s, n.split(".")[1].replace("bf16", "bfloat16").replace("f16", "float16")
                                   .replace("f32", "float32").replace("i32", "int32")) for n, s in shapes.items()}
    assert {str(a.dtype) for a in full.values()} == {"bfloat16", "float16", "float32", "int32"}
    # plain TP over 4 devices, 2-way data parallel replicas, no optimizer shard
    tp = make_strategy({
        "a.bf16": ([2, 4], [0, -1]), "b.f16": ([2, 4], [-1, 0, -1]), "c.f32": ([2, 4], [0]), "d.i32": ([2, 4], [-1, 0]),
    })
    case = Case(tmp_path, tp, tp, full)
    out = os.path.join(str(tmp_path), "m.ckpt")
    rep = distckpt.merge(case.src, out, src_strategy=case.sf)
    assert rep["tensors"] == len(full) + 1
    loaded = ms.load_checkpoint(out)
    raw = read_ckpt_raw(out)
    strat = ms.build_searched_strategy(case.sf)
    for name, arr in full.items():
        assert same_bytes(raw[name], arr), name
        assert str(loaded[name].dtype).lower() == str(arr.dtype), name
        assert same_bytes(loaded[name].asnumpy(), arr), name
        slices = [ms.Parameter(synth._ms_tensor(np_slice(arr, tp.params[name].layout, r)), name=name) for r in range(8)]
        theirs = ms.merge_sliced_parameter(slices, strat).asnumpy()
        assert same_bytes(theirs.astype(arr.dtype), arr), name
        assert same_bytes(raw[name], theirs.astype(arr.dtype)), name
    assert raw["global_step"].tolist() == [7]


def test_merge_pipeline_opt_native_bitexact(tmp_path):
    """Merge of a 2-stage, optimizer-sharded native checkpoint loads in MindSpore and equals the full tensors."""
    rng = np.random.default_rng(41)
    model = random_model(rng, n_params=6, num_stages=2)
    src = random_strategy(rng, model, 4, opt=True, nested=True)
    full = synth.full_tensors(rng, model)
    case = Case(tmp_path, src, src, full, strat_writer="pb2")
    out = os.path.join(str(tmp_path), "m.ckpt")
    distckpt.merge(case.src, out, src_strategy=case.sf)
    loaded = ms.load_checkpoint(out)
    raw = read_ckpt_raw(out)
    assert sorted(raw) == sorted([*full, "global_step"])
    for name, arr in full.items():
        assert same_bytes(raw[name], arr)
        assert same_bytes(loaded[name].asnumpy(), arr)
    # MindSpore's own merge (transform to one device) agrees
    one = make_strategy({n: ([1], [-1] * len(s)) for n, s in model.shapes.items()})
    f1 = write_strategy(one, os.path.join(str(tmp_path), "one.ckpt"))
    ms.transform_checkpoints(case.src, os.path.join(str(tmp_path), "ms1"), "checkpoint_", case.sf, f1)
    theirs = read_ckpt_raw(rank_file(os.path.join(str(tmp_path), "ms1"), 0))
    for name, arr in full.items():
        assert same_bytes(theirs[name], arr)


def _tp3(shapes):
    return make_strategy({n: ([3], [0] + [-1] * (len(s) - 1)) if i % 2 == 0 else ([3], [-1] * (len(s) - 1) + [0])
                          for i, (n, s) in enumerate(shapes.items())})


def test_4_to_3_which_mindspore_refuses(tmp_path):
    rng = np.random.default_rng(51)
    model = random_model(rng, n_params=5)
    src = random_strategy(rng, model, 4, opt=True)
    dst = _tp3(model.shapes)
    full = synth.full_tensors(rng, model)
    case = Case(tmp_path, src, dst, full)
    with pytest.raises(Exception, match="(?i)transform|device"):
        ms.transform_checkpoints(case.src, os.path.join(str(tmp_path), "ms"), "checkpoint_", case.sf, case.df)
    ours = os.path.join(str(tmp_path), "ours")
    distckpt.reshard(case.src, ours, dst_strategy=case.df, src_strategy=case.sf, format="ckpt")
    for r in range(3):
        got = read_ckpt_raw(rank_file(ours, r))
        assert sorted(got) == sorted([*full, "global_step"])
        for name, arr in full.items():
            # independent reference: np.split by hand along the split dim
            dim = 0 if list(model.shapes).index(name) % 2 == 0 else arr.ndim - 1
            want = np.split(arr, 3, axis=dim)[r]
            assert same_bytes(got[name], want), (r, name)
        # online load reads the same
        loaded = distckpt.load(case.src, strategy=case.df, rank=r, src_strategy=case.sf)
        for name in full:
            assert same_bytes(loaded[name], got[name])
    # and 3 -> 4 back to the original native files, through a distckpt checkpoint
    mid = os.path.join(str(tmp_path), "mid")
    distckpt.reshard(ours, mid, dst_strategy=case.df, src_strategy=case.df)  # distckpt format, self-describing
    back = os.path.join(str(tmp_path), "back")
    distckpt.reshard(mid, back, dst_strategy=case.sf, format="ckpt")
    for r in range(4):
        a, b = read_ckpt_raw(rank_file(back, r)), read_ckpt_raw(rank_file(case.src, r))
        for n in b:
            assert same_bytes(a[n], b[n]), (r, n)


def test_bf16_bitexact_merge_split_reshard(tmp_path):
    """Every bf16 bit pattern (incl. NaN payloads, infinities, subnormals) survives merge, split, reshard."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    full = {"w": bits.view(BF16), "h": bits.view(np.float16)}
    strat = make_strategy({"w": ([2, 4], [1, 0]), "h": ([2, 4], [-1, 0], 4, 2)})
    case = Case(tmp_path, strat, make_strategy({"w": ([4], [-1, 0]), "h": ([4], [0, -1])}), full, native_writer="distckpt")
    merged = os.path.join(str(tmp_path), "m.ckpt")
    distckpt.merge(case.src, merged, src_strategy=case.sf)
    raw = read_ckpt_raw(merged)
    assert raw["w"].dtype == BF16
    assert same_bytes(raw["w"], full["w"]) and same_bytes(raw["h"], full["h"])
    split = os.path.join(str(tmp_path), "split")
    distckpt.split(merged, split, dst_strategy=case.df, format="ckpt")
    resh = os.path.join(str(tmp_path), "resh")
    distckpt.reshard(case.src, resh, dst_strategy=case.df, src_strategy=case.sf, format="ckpt")
    for r in range(4):
        a, b = read_ckpt_raw(rank_file(split, r)), read_ckpt_raw(rank_file(resh, r))
        for n, want in case.expected(r).items():
            assert same_bytes(a[n], want) and same_bytes(b[n], want), (r, n)
    # safetensors output too
    st = os.path.join(str(tmp_path), "m.safetensors")
    distckpt.merge(case.src, st, src_strategy=case.sf)
    back = distckpt.load(st)
    assert same_bytes(back["w"], full["w"]) and same_bytes(back["h"], full["h"])
