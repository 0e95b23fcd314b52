"""distckpt.plan: writes planned per rank in closed form (each box once, byte-balanced), fits, loads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth import random_model, random_strategy

from distckpt.errors import StrategyError
from distckpt.layout import Box, ParamSpec, Strategy, TensorLayout, check_tiling
from distckpt.plan import check_fit, plan_load, plan_save, plan_writes


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), stages=st.sampled_from([1, 2]), devices=st.sampled_from([1, 2, 4, 6, 8]))
def test_every_distinct_box_is_written_once_by_a_rank_that_holds_it(seed, stages, devices):
    rng = np.random.default_rng(seed)
    model = random_model(rng, n_params=5, num_stages=stages)
    strat = random_strategy(rng, model, devices, nested=True, opt=True)
    tensors = {n: (model.dtypes[n], model.shapes[n]) for n in model.shapes}
    tensors["extra.step"] = ("int64", ())  # not in the strategy: a replica on every rank
    world = strat.world_size
    items = plan_save(tensors, strat, world)
    for name, (_dt, shape) in tensors.items():
        mine = [it for it in items if it.name == name]
        check_tiling(shape, [it.box for it in mine], name=name)  # every element exactly once
        for it in mine:
            if name in strat:
                assert strat.holds(name, it.writer) and strat.box(name, it.writer, shape) == it.box
    # each rank's own plan is the same decision, made without the rest of the world
    for r in range(world):
        held = {n: v for n, v in tensors.items() if n not in strat or strat.holds(n, r)}
        assert [(i.name, i.box) for i in plan_writes(held, strat, world, r)] == [
            (i.name, i.box) for i in items if i.writer == r
        ]


def _llm(h: int, layers: int, dp: int, tp: int):
    """The bench's LLM-shaped model: matrices split by TP, norms replicated."""
    tensors, params = {"embed": ("float32", (4 * h, h))}, {"embed": ParamSpec("embed", TensorLayout((dp, tp), (0, -1)))}
    for i in range(layers):
        for n, shape, tm in ((f"l{i}.qkv", (3 * h, h), (0, -1)), (f"l{i}.o", (h, h), (-1, 0)),
                             (f"l{i}.up", (4 * h, h), (0, -1)), (f"l{i}.down", (h, 4 * h), (-1, 0)),
                             (f"l{i}.norm1", (h,), (-1,)), (f"l{i}.norm2", (h,), (-1,))):
            tensors[n] = ("float32", shape)
            params[n] = ParamSpec(n, TensorLayout((dp, tp), tm))
    return tensors, Strategy(params)


@pytest.mark.parametrize("dp, tp, layers", [(2, 4, 8), (4, 2, 6), (4, 1, 5), (8, 1, 12), (2, 2, 3)])
def test_writes_are_balanced_by_bytes(dp, tp, layers):
    tensors, strat = _llm(256, layers, dp, tp)
    loads = np.zeros(dp * tp)
    for it in plan_save(tensors, strat, dp * tp):
        loads[it.writer] += it.box.numel * 4
    assert loads.max() / loads.mean() <= 1.25, loads


def test_check_fit_names_the_tensor_and_both_shapes():
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)), shape=(64, 16))})
    with pytest.raises(StrategyError, match=r"'w' has shape \[32, 16\].*tensor_shape says \[64, 16\]"):
        check_fit(strat, {"w": (32, 16)})
    assert check_fit(strat, {"w": (64, 16)}) == []
    assert check_fit(strat, {}) == ["w"]
    with pytest.raises(StrategyError, match="not divisible"):
        check_fit(Strategy({"w": ParamSpec("w", TensorLayout((3,), (0,)))}), {"w": (4,)})


def test_plan_load_boxes_and_pipeline_stages():
    strat = Strategy({"w": ParamSpec("w", TensorLayout((2,), (0, -1)), stages=(1,))}, num_stages=2)
    shapes = {"w": (4, 3), "b": (5,)}
    assert [(i.name, i.box) for i in plan_load(shapes, strat, 0)] == [("b", Box((0,), (5,)))]  # stage 0 lacks w
    assert [(i.name, i.box) for i in plan_load(shapes, strat, 3)] == [("w", Box((2, 0), (2, 3))), ("b", Box((0,), (5,)))]
    assert plan_load(shapes, strat, 3, names=["b"])[0].name == "b"
