"""distckpt.mindspore conversions: exact dtypes, bf16 bit for bit without asnumpy() on bf16."""

from __future__ import annotations

import subprocess
import sys

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import nn

import distckpt
from distckpt.errors import FormatError, LayoutError
from distckpt.mindspore import cell_state, from_numpy, load_into_cell, to_numpy

ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)


@pytest.fixture
def no_bf16_asnumpy(monkeypatch):
    """Make asnumpy() fail on bf16 the way mindspore 2.10 + numpy 2 does (DESIGN §2.1)."""
    orig = ms.Tensor.asnumpy
    calls = []

    def guarded(self):
        calls.append(str(self.dtype))
        if self.dtype == ms.bfloat16:
            raise TypeError("The Numpy bfloat16 data type is not supported now")
        return orig(self)

    monkeypatch.setattr(ms.Tensor, "asnumpy", guarded)
    return calls


def _bf16_tensor(bits: np.ndarray):
    """A bf16 Tensor of these raw patterns, built by MindSpore's own checkpoint-loading call."""
    from mindspore._c_expression import TensorPy

    return ms.Tensor(TensorPy.convert_bytes_to_tensor(bits.tobytes(), bits.shape, ms.bfloat16))


def test_bf16_to_numpy_every_pattern_without_asnumpy(no_bf16_asnumpy):
    t = _bf16_tensor(ALL_BF16)
    got = to_numpy(t)
    assert got.dtype == np.dtype(ml_dtypes.bfloat16) and got.shape == (256, 256)
    assert np.array_equal(got.view(np.uint16), ALL_BF16)  # every pattern: NaN payloads, subnormals, -0
    assert "BFloat16" not in no_bf16_asnumpy and "Float32" in no_bf16_asnumpy


def test_bf16_to_numpy_equals_asnumpy_on_numpy_1():
    assert np.__version__.startswith("1.")  # here asnumpy() on bf16 still works: use it as the oracle
    t = _bf16_tensor(ALL_BF16)
    assert np.array_equal(to_numpy(t).view(np.uint16), t.asnumpy().view(np.uint16))
    p = ms.Parameter(t, name="p")
    assert np.array_equal(to_numpy(p).view(np.uint16), ALL_BF16)


def test_bf16_from_numpy_every_pattern(no_bf16_asnumpy):
    arr = ALL_BF16.view(ml_dtypes.bfloat16)
    t = from_numpy(arr)
    assert t.dtype == ms.bfloat16 and tuple(t.shape) == (256, 256)
    assert np.array_equal(to_numpy(t).view(np.uint16), ALL_BF16)
    s = from_numpy(np.asarray(ALL_BF16[3, 7]).view(ml_dtypes.bfloat16))  # scalar
    assert tuple(s.shape) == () and to_numpy(s).view(np.uint16) == ALL_BF16[3, 7]


@pytest.mark.parametrize(
    "dtype", ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"]
)
def test_round_trip_exact_dtypes(dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 5)) * 50).astype(dtype) if dtype != "bool" else rng.random((3, 5)) < 0.5
    t = from_numpy(arr)
    assert str(t.dtype) == distckpt.dtypes.ckpt_name(dtype)
    back = to_numpy(t)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    assert np.array_equal(to_numpy(ms.Parameter(t, name="x")), arr)


def test_float8_has_no_mindspore_dtype():
    with pytest.raises(FormatError, match="float8"):
        from_numpy(np.zeros(3, ml_dtypes.float8_e4m3fn), name="w")


class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)
        self.emb = nn.Embedding(10, 4)
        self.scale = ms.Parameter(_bf16_tensor(ALL_BF16[100, :4].copy()), name="scale")


def test_cell_state_and_load_into_cell():
    net = Net()
    st = cell_state(net)
    assert set(st) == {"dense.weight", "dense.bias", "emb.embedding_table", "scale"}
    assert st["scale"].dtype == np.dtype(ml_dtypes.bfloat16) and st["dense.weight"].dtype == np.float32
    other = Net()
    new = {k: (np.asarray(v, np.float32) + 1).astype(v.dtype) for k, v in st.items()}
    new["scale"] = ALL_BF16[200, :4].view(ml_dtypes.bfloat16)
    new["extra"] = np.zeros(2, np.float32)
    del new["dense.bias"]
    missing, unexpected = load_into_cell(other, new)
    assert (missing, unexpected) == (["dense.bias"], ["extra"])
    got = cell_state(other)
    assert np.array_equal(got["dense.weight"], new["dense.weight"])
    assert np.array_equal(got["scale"].view(np.uint16), ALL_BF16[200, :4])
    with pytest.raises(FormatError, match="strict"):
        load_into_cell(other, new, strict=True)
    with pytest.raises(LayoutError, match="dense.weight.*\\[4, 4\\].*\\[3, 4\\]"):
        load_into_cell(other, {"dense.weight": np.zeros((4, 4), np.float32)})
    # a float dtype is cast when not strict, refused when strict
    load_into_cell(other, {"dense.weight": np.ones((3, 4), np.float16)})
    assert got["dense.weight"].dtype == np.float32 and np.all(cell_state(other)["dense.weight"] == 1)
    with pytest.raises(FormatError, match="dense.weight.*float16"):
        load_into_cell(other, {**cell_state(other), "dense.weight": np.ones((3, 4), np.float16)}, strict=True)


def test_save_accepts_parameters_and_tensors(tmp_path):
    net = Net()
    state = dict(net.parameters_dict())
    state["step"] = 7
    distckpt.save(state, str(tmp_path / "c"))
    got = distckpt.load(str(tmp_path / "c"))
    assert got["step"] == 7
    for k, v in cell_state(net).items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8), v.view(np.uint8))


def test_import_is_lazy():
    code = "import sys, distckpt, distckpt.mindspore; assert 'mindspore' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
