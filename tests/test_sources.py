"""distckpt.sources: every SRC kind opens through the registry, and nothing else does."""

from __future__ import annotations

import numpy as np
import pytest
from synth import make_strategy, random_tensor, write_native

import distckpt
from distckpt.errors import NotCommittedError, NotFoundError, StrategyError
from distckpt.sources import SourceKind, open_source, register


def test_each_kind_is_recognised(tmp_path):
    full = {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}
    distckpt.save(full, tmp_path / "dc")
    distckpt.merge(tmp_path / "dc", tmp_path / "one.ckpt")
    distckpt.merge(tmp_path / "dc", tmp_path / "pre")
    strat = make_strategy({"w": ([2], [0, -1])})
    write_native(str(tmp_path / "native"), strat, full, writer="distckpt")
    from distckpt.strategy import save_strategy

    save_strategy(strat, tmp_path / "native" / "strategy.ckpt")
    kinds = {p: open_source(tmp_path / p).kind for p in ("dc", "one.ckpt", "pre", "native")}
    assert kinds == {"dc": SourceKind.DISTCKPT, "one.ckpt": SourceKind.FILE, "pre": SourceKind.PRETRAINED,
                     "native": SourceKind.NATIVE}
    assert json_kind(open_source(tmp_path / "dc")) == "distckpt"  # serialises as its plain string
    src = open_source(tmp_path / "native")
    assert src.world_size == 2 and np.array_equal(src.read("w", distckpt.Box((1, 0), (2, 4))), full["w"][1:3])


def json_kind(source) -> str:
    import json

    return json.loads(json.dumps({"k": source.kind}))["k"]


def test_what_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(NotCommittedError, match="not a checkpoint"):
        open_source(tmp_path / "junk")
    with pytest.raises(NotFoundError, match="no such"):
        open_source(tmp_path / "missing")
    with pytest.raises(NotFoundError, match="no such file"):
        open_source(tmp_path / "missing.ckpt")


def test_one_ranks_folder_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    strat = make_strategy({"w": ([2], [0, -1])})
    write_native(str(tmp_path / "n"), strat, {"w": random_tensor(rng, (4, 2), "float32")}, writer="distckpt")
    with pytest.raises(StrategyError, match="one rank's slice.*merge the parent"):
        open_source(tmp_path / "n" / "rank_0")


def test_a_registered_kind_is_asked_in_order(tmp_path):
    from distckpt.index import Index
    from distckpt.sources import _OPENERS, Source

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "MAGIC").write_text("")
    register("magic", lambda p: "MAGIC" in p.names,
             lambda p: Source(p.storage, Index(tensors={}, values={"magic": True}), SourceKind.FILE),
             before="distckpt")
    try:
        assert open_source(tmp_path / "x").values == {"magic": True}
    finally:
        del _OPENERS[[o.kind for o in _OPENERS].index("magic")]
