"""distckpt.writers: .ckpt/.safetensors/sharded outputs MindSpore and safetensors read back exactly."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from distckpt import dtypes
from distckpt.errors import FormatError
from distckpt.storage import open_storage
from distckpt.writers import (
    VALUES_KEY,
    OutItem,
    constant,
    decode_metadata_values,
    group_shards,
    write_ckpt_file,
    write_safetensors_file,
    write_sharded,
)


def _items(arrays: dict) -> list[OutItem]:
    return [OutItem(n, dtypes.name_of(a.dtype), a.shape, constant(a)) for n, a in arrays.items()]


@pytest.fixture
def arrays():
    rng = np.random.default_rng(5)
    return {"w": rng.standard_normal((20, 7)).astype(np.float32),
            "b": rng.integers(0, 1 << 16, 9, dtype=np.uint16).view(ml_dtypes.bfloat16),
            "m": rng.integers(0, 2, (3, 3)).astype(bool)}


def test_ckpt_is_what_mindspore_loads(tmp_path, arrays):
    import mindspore as ms

    values = {"step": 7, "lr": 1e-300, "name": "run-α", "done": False}
    write_ckpt_file(open_storage(str(tmp_path)), "m.ckpt", _items(arrays), values)
    got = ms.load_checkpoint(str(tmp_path / "m.ckpt"))
    assert np.array_equal(got["w"].asnumpy(), arrays["w"]) and got["m"].asnumpy().tolist() == arrays["m"].tolist()
    assert got["step"].asnumpy().item() == 7 and got["lr"].asnumpy().item() == 1e-300  # float64, never float32
    assert got["name"] == "run-α"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]  # written through a temporary name


def test_safetensors_keeps_strings_in_metadata(tmp_path, arrays):
    import safetensors

    write_safetensors_file(open_storage(str(tmp_path)), "m.safetensors", _items(arrays), {"tag": "x\ny", "n": 3})
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), "np") as f:
        meta = f.metadata()
        assert meta["format"] == "ms" and json.loads(meta[VALUES_KEY]) == {"tag": "x\ny"}
        assert np.array_equal(f.get_tensor("w"), arrays["w"]) and f.get_tensor("n").item() == 3
    assert decode_metadata_values(meta) == {"tag": "x\ny"}
    with pytest.raises(FormatError, match="duplicate key"):
        decode_metadata_values({VALUES_KEY: '{"a": "1", "a": "2"}'})


def test_sharded_output_and_weight_map(tmp_path, arrays):
    items = _items(arrays)
    names = write_sharded(open_storage(str(tmp_path)), items, {"step": 1}, stem="model", ext="safetensors",
                          max_shard_size=arrays["w"].nbytes)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert names[-1] == "model.safetensors.index.json" and len(names) == 3
    assert set(idx["weight_map"]) == {"w", "b", "m", "step"} and idx["metadata"]["total_size"] == sum(
        a.nbytes for a in arrays.values())
    one = write_sharded(open_storage(str(tmp_path / "one")), items, {}, stem="model", ext="ckpt", max_shard_size=None)
    assert one == ["model.ckpt"]  # everything fits: one file, no index


def test_group_shards_never_splits_a_tensor_and_keeps_order():
    items = [OutItem(f"t{i}", "uint8", (n,), constant(np.zeros(n, np.uint8))) for i, n in enumerate([5, 5, 11, 1, 4])]
    groups = group_shards(items, 10)
    assert [[it.name for it in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_a_wrong_array_is_refused_and_nothing_is_left(tmp_path, arrays):
    bad = [OutItem("w", "float32", (20, 7), constant(np.zeros((7, 20), np.float32)))]
    with pytest.raises(FormatError, match="'w': produced float32\\[7, 20\\], expected float32\\[20, 7\\]"):
        write_ckpt_file(open_storage(str(tmp_path)), "m.ckpt", bad, {})
    assert list(tmp_path.iterdir()) == []
