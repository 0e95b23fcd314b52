"""Layout math: exact tables (like PyTorch DCP's test_planner) and hypothesis properties."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import np_slice, random_tensor

import distckpt
from distckpt.errors import LayoutError, StrategyError
from distckpt.layout import Box, ParamSpec, Strategy, TensorLayout, check_tiling


def boxes(layout: TensorLayout, shape, world=None):
    return [(b.offsets, b.sizes) for b in (layout.box(r, shape) for r in range(world or layout.device_num))]


# ------------------------------------------------------------------ exact tables
def test_table_tp4_dp2_dim0():
    # dev_matrix [2, 4]: axis 0 is the rightmost (size 4), so dim 0 is cut 4 ways by rank % 4
    lay = TensorLayout([2, 4], [0, -1])
    assert boxes(lay, (8, 6)) == [
        ((0, 0), (2, 6)), ((2, 0), (2, 6)), ((4, 0), (2, 6)), ((6, 0), (2, 6)),
        ((0, 0), (2, 6)), ((2, 0), (2, 6)), ((4, 0), (2, 6)), ((6, 0), (2, 6)),
    ]


def test_table_axis1_is_leftmost():
    lay = TensorLayout([2, 4], [1, -1])  # axis 1 = dev_matrix[0] = 2: cut by rank // 4
    assert boxes(lay, (8, 6)) == [((0, 0), (4, 6))] * 4 + [((4, 0), (4, 6))] * 4


def test_table_column_split():
    lay = TensorLayout([2, 4], [-1, 0])
    assert boxes(lay, (2, 8)) == [((0, c), (2, 2)) for c in (0, 2, 4, 6)] * 2


def test_table_two_dims():
    lay = TensorLayout([2, 4], [1, 0])
    assert boxes(lay, (4, 8)) == [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((0, 4), (2, 2)), ((0, 6), (2, 2)),
                                  ((2, 0), (2, 2)), ((2, 2), (2, 2)), ((2, 4), (2, 2)), ((2, 6), (2, 2))]


def test_table_nested_outer_first():
    # [[1, 0], -1]: dim 0 over both axes, axis 1 outermost -> block = (r // 4) * 4 + r % 4 = r
    assert boxes(TensorLayout([2, 4], [[1, 0], -1]), (8, 6)) == [((r, 0), (1, 6)) for r in range(8)]
    # [[0, 1], -1]: axis 0 outermost -> block = (r % 4) * 2 + r // 4
    got = boxes(TensorLayout([2, 4], [[0, 1], -1]), (8, 6))
    assert [o[0] for o, _ in got] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert TensorLayout([2, 4], [[0, 1], -1]).json_tensor_map() == [[0, 1], -1]


def test_table_optimizer_shard():
    # TP4 on dim 0, then the optimizer shard cuts each TP block again in 2 over the DP axis
    lay = TensorLayout([2, 4], [0, -1], 4, 2)
    assert lay.full_splits() == (8, 1)
    assert boxes(lay, (16, 6)) == [((o, 0), (2, 6)) for o in (0, 4, 8, 12, 2, 6, 10, 14)]
    # pure DP with the shard over all 8 devices: rank r holds rows [2r, 2r+2)
    assert boxes(TensorLayout([8], [-1, -1], 1, 8), (16, 3)) == [((2 * r, 0), (2, 3)) for r in range(8)]
    # opt_weight_shard_size -1 means every replicated device
    assert TensorLayout([2, 4], [0, -1], 4, -1).opt_shard_size == 2


def test_table_pipeline_stages():
    s = Strategy(
        {
            "emb": ParamSpec("emb", TensorLayout([2, 2], [0, -1]), (0, 1)),
            "a": ParamSpec("a", TensorLayout([2, 2], [-1, 1]), (0,)),
            "b": ParamSpec("b", TensorLayout([2, 2], [-1]), (1,)),
        },
        num_stages=2,
    )
    assert s.world_size == 8 and s.stage_device_num == 4
    assert [s.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [s.holds("a", r) for r in range(8)] == [True] * 4 + [False] * 4
    assert [s.holds("b", r) for r in range(8)] == [False] * 4 + [True] * 4
    assert s.ranks_holding("emb").tolist() == list(range(8))
    assert s.box("a", 5, (4, 4)) is None
    assert s.box("b", 2, (6,)) is None
    # rank r of stage 1 has the coordinates of rank r - 4
    assert [s.box("emb", r, (4, 2)).offsets for r in range(8)] == [(0, 0), (2, 0), (0, 0), (2, 0)] * 2
    assert [s.box("a", r, (2, 4)).offsets for r in range(4)] == [(0, 0), (0, 0), (0, 2), (0, 2)]
    assert s.box("b", 6, (6,)) == Box((0,), (6,))


def test_table_replica_groups():
    s = Strategy({"w": ParamSpec("w", TensorLayout([2, 4], [0, -1]))})
    groups = s.replica_groups("w", (8, 2))
    assert [(b.offsets, sorted(r.tolist())) for b, r in groups] == [
        ((0, 0), [0, 4]), ((2, 0), [1, 5]), ((4, 0), [2, 6]), ((6, 0), [3, 7]),
    ]
    s = Strategy({"w": ParamSpec("w", TensorLayout([2, 4], [0, -1], 4, 2))})
    assert len(s.replica_groups("w", (8, 2))) == 8  # no replicas left after the shard
    s = Strategy({"x": ParamSpec("x", TensorLayout([4], []))})
    ((box, ranks),) = s.replica_groups("x", ())
    assert box.ndim == 0 and ranks.tolist() == [0, 1, 2, 3]


def test_layout_validation_names_the_problem():
    with pytest.raises(StrategyError, match="not divisible"):
        TensorLayout([2, 4], [0, -1]).validate((6, 2), "w")
    with pytest.raises(StrategyError, match="has 2 dims"):
        TensorLayout([2, 4], [0, -1]).validate((8,), "w")
    with pytest.raises(StrategyError, match="names device axis 2"):
        TensorLayout([2, 4], [2, -1])
    with pytest.raises(StrategyError, match="twice"):
        TensorLayout([2, 4], [0, 0])
    with pytest.raises(StrategyError, match="optimizer shard step 1 must equal"):
        TensorLayout([2, 4], [0, -1], 1, 2).validate((8, 2), "w")
    with pytest.raises(StrategyError, match="other parameters cover"):
        Strategy({"a": ParamSpec("a", TensorLayout([4], [0])), "b": ParamSpec("b", TensorLayout([8], [0]))}, 1, 4)


def test_check_tiling_rejects_exact_cases():
    check_tiling((4, 2), [Box((0, 0), (2, 2)), Box((2, 0), (2, 2))])
    with pytest.raises(LayoutError, match="cover 4 elements"):  # gap
        check_tiling((4, 2), [Box((0, 0), (2, 2))])
    with pytest.raises(LayoutError, match="cover 12 elements"):  # duplicate
        check_tiling((4, 2), [Box((0, 0), (2, 2)), Box((2, 0), (2, 2)), Box((2, 0), (2, 2))])
    with pytest.raises(LayoutError, match="overlap"):  # same volume, one overlap + one gap
        check_tiling((4, 2), [Box((0, 0), (2, 2)), Box((1, 0), (2, 2))])
    with pytest.raises(LayoutError, match="outside"):
        check_tiling((4, 2), [Box((0, 0), (2, 2)), Box((3, 0), (2, 2))])
    with pytest.raises(LayoutError, match="rank"):
        check_tiling((4, 2), [Box((0,), (8,))])
    with pytest.raises(LayoutError, match="cover 2 elements"):
        check_tiling((), [Box((), ()), Box((), ())])
    check_tiling((), [Box((), ())])
    with pytest.raises(LayoutError):
        Box((0, -1), (1, 1))


# ------------------------------------------------------------------ properties
@st.composite
def layouts(draw, *, opt=True):
    """(TensorLayout, shape) with a shape that divides, any dev_matrix of 1-3 axes, nested entries."""
    dm = draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3))
    n = len(dm)
    ndim = draw(st.integers(0, 3))
    axes = draw(st.permutations(list(range(n))))
    axes = list(axes)
    tmap = []
    for _ in range(ndim):
        kind = draw(st.sampled_from(["none", "one", "nested"]))
        if kind == "nested" and len(axes) >= 2:
            tmap.append((axes.pop(), axes.pop()))
        elif kind != "none" and axes:
            tmap.append(axes.pop())
        else:
            tmap.append(-1)
    lay = TensorLayout(dm, tmap)
    blocks = [draw(st.integers(1, 3)) for _ in range(ndim)]
    step = size = 0
    if opt and ndim and draw(st.booleans()):
        used = {a for e in lay.tensor_map for a in e if lay.axis_size(a) > 1}
        rep = sorted(a for a in range(n) if lay.axis_size(a) > 1 and a not in used)
        if rep and (not used or min(rep) > max(used)):
            size = lay.axis_size(rep[0])
            step = math.prod(lay.splits)
            blocks[0] *= size
    shape = tuple(b * k for b, k in zip(blocks, lay.splits))
    return TensorLayout(dm, tmap, step, size), shape


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_boxes_tile_the_tensor_and_match_np_split(ls):
    lay, shape = ls
    s = Strategy({"t": ParamSpec("t", lay)})
    groups = s.replica_groups("t", shape)
    check_tiling(shape, [b for b, _ in groups])
    assert sorted(r for _, rs in groups for r in rs.tolist()) == list(range(lay.device_num))
    full = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    for r in range(lay.device_num):
        b = lay.box(r, shape)
        assert np.array_equal(full[tuple(slice(o, o + z) for o, z in zip(b.offsets, b.sizes))], np_slice(full, lay, r))
    # replicas hold the same box; distinct groups hold distinct boxes
    assert len({g[0] for g in groups}) == len(groups)
    for b, rs in groups:
        assert all(lay.box(int(r), shape) == b for r in rs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.data())
def test_check_tiling_rejects_perturbed_grids(shape, data):
    cuts = [sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=2)) if n > 1 else [])) for n in shape]
    edges = [[0, *c, n] for c, n in zip(cuts, shape)]
    import itertools

    grid = [
        Box(tuple(e[i] for e, i in zip(edges, idx)), tuple(e[i + 1] - e[i] for e, i in zip(edges, idx)))
        for idx in itertools.product(*[range(len(e) - 1) for e in edges])
    ]
    check_tiling(shape, grid)
    k = data.draw(st.integers(0, len(grid) - 1))
    with pytest.raises(LayoutError):  # gap
        check_tiling(shape, grid[:k] + grid[k + 1 :])
    with pytest.raises(LayoutError):  # overlap
        check_tiling(shape, grid + [grid[k]])
    b = grid[k]
    moved = Box(tuple(o + (1 if d == 0 else 0) for d, o in enumerate(b.offsets)), b.sizes)
    with pytest.raises(LayoutError):  # shifted: out of bounds, or overlap + gap
        check_tiling(shape, grid[:k] + [moved] + grid[k + 1 :])


DT = ["float32", "float16", "bfloat16", "int32", "int8", "bool", "float8_e4m3fn"]


@st.composite
def strategies_with_tensors(draw, stage_devices=None):
    """A Strategy of 1-3 params over one dev_matrix (1 or 2 stages) + full tensors."""
    dm = draw(st.sampled_from([[1], [2], [4], [2, 2], [3], [2, 3], [2, 1, 2], [4, 2]]))
    if stage_devices is not None:
        dm = stage_devices
    ns = draw(st.integers(1, 2))
    specs, full = {}, {}
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    for i in range(draw(st.integers(1, 3))):
        lay, shape = draw(layouts().filter(lambda x: True))
        # re-home the drawn layout on this strategy's dev_matrix, keeping its shape divisible
        tmap = [
            -1 if not e or max(e) >= len(dm) or shape[d] % math.prod(dm[len(dm) - 1 - a] for a in e) else
            (e if len(e) > 1 else e[0])
            for d, e in enumerate(lay.tensor_map)
        ]
        used = [a for e in tmap for a in (e if isinstance(e, tuple) else (e,)) if a != -1]
        if len(used) != len(set(used)):
            tmap = [-1] * len(shape)
        name = f"p{i}"
        stages = (0, 1)[: ns] if i == 0 else (draw(st.integers(0, ns - 1)),)
        specs[name] = ParamSpec(name, TensorLayout(dm, tmap), stages)
        full[name] = random_tensor(rng, shape, draw(st.sampled_from(DT)))
    return Strategy(specs, ns), full


def _save_ranks(path, strat: Strategy, full: dict, values: dict):
    for r in range(strat.world_size):
        state = {}
        for name, arr in full.items():
            spec = strat.params[name]
            if strat.holds(name, r):
                state[name] = np_slice(arr, spec.layout, r)
        if r == 0:
            state.update(values)
        distckpt.save(state, path, strategy=strat, rank=r)
    distckpt.finalize(path)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies_with_tensors())
def test_split_then_merge_is_identity(sf):
    strat, full = sf
    values = {"step": 3, "lr": 0.5, "tag": "x"}
    with tempfile.TemporaryDirectory() as d:
        _save_ranks(d + "/ck", strat, full, values)
        got = distckpt.load(d + "/ck")
        assert sorted(got) == sorted([*full, *values])
        for name, arr in full.items():
            assert _same(got[name], arr), name
        assert {k: got[k] for k in values} == values
        for r in range(strat.world_size):
            mine = distckpt.load(d + "/ck", strategy=strat, rank=r)
            for name, arr in full.items():
                if strat.holds(name, r):
                    assert _same(mine[name], np_slice(arr, strat.params[name].layout, r))
                else:
                    assert name not in mine
        distckpt.verify(d + "/ck")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategies_with_tensors(), st.sampled_from([[1], [3], [2, 2], [4, 2]]), st.data())
def test_reshard_a_to_b_to_a_is_identity(sf, dm_b, data):
    a, full = sf
    b_specs = {}
    for name, arr in full.items():
        k = dm_b[-1]
        tmap = [-1] * arr.ndim
        if arr.ndim and data.draw(st.booleans()):
            d = data.draw(st.integers(0, arr.ndim - 1))
            if arr.shape[d] % k == 0:
                tmap[d] = 0
        b_specs[name] = ParamSpec(name, TensorLayout(dm_b, tmap))
    b = Strategy(b_specs)
    with tempfile.TemporaryDirectory() as d:
        _save_ranks(d + "/a", a, full, {"step": 1})
        distckpt.reshard(d + "/a", d + "/b", dst_strategy=b)
        distckpt.reshard(d + "/b", d + "/a2", dst_strategy=a)
        for r in range(b.world_size):
            got = distckpt.load(d + "/b", strategy=b, rank=r)
            for name, arr in full.items():
                assert _same(got[name], np_slice(arr, b.params[name].layout, r))
        for r in range(a.world_size):
            x = distckpt.load(d + "/a", strategy=a, rank=r)
            y = distckpt.load(d + "/a2", strategy=a, rank=r)
            assert sorted(x) == sorted(y)
            for name in x:
                assert _same(x[name], y[name]) if isinstance(x[name], np.ndarray) else x[name] == y[name]
        info = distckpt.inspect(d + "/a2")
        assert info["strategy"]["num_stages"] == a.num_stages
