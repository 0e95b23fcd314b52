"""distckpt.state: what save accepts, converted exactly; adapters imported only when needed."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from distckpt.errors import FormatError
from distckpt.state import ADAPTERS, as_array, split_state


def test_arrays_and_plain_values_are_told_apart():
    bf = np.arange(6, dtype=np.uint16).view(ml_dtypes.bfloat16)
    arrays, values = split_state({"w": bf, "s": np.float32(2.5), "step": 3, "lr": 1e-300, "tag": "x", "ok": True})
    assert sorted(arrays) == ["s", "w"] and arrays["w"] is bf and arrays["s"].dtype == np.float32
    assert values == {"step": 3, "lr": 1e-300, "tag": "x", "ok": True}


def test_bad_entries_are_named():
    with pytest.raises(FormatError, match="'obj'.*unsupported type object"):
        split_state({"obj": object()})
    with pytest.raises(FormatError, match="non-empty string"):
        split_state({"": np.ones(1)})
    with pytest.raises(FormatError, match="unsupported dtype"):
        split_state({"c": np.zeros(2, np.complex64)})
    with pytest.raises(FormatError, match="mapping"):
        split_state([1, 2])
    assert as_array("v", 3) is None


def test_a_mindspore_cell_is_saved_by_its_parameters():
    import mindspore as ms
    from mindspore import nn

    net = nn.Dense(3, 2)
    arrays, values = split_state(net)
    assert sorted(arrays) == ["bias", "weight"] and values == {}
    assert np.array_equal(arrays["weight"], net.weight.asnumpy())
    t = ms.Tensor(np.arange(4, dtype=np.float32)).astype(ms.bfloat16)
    got = as_array("t", t)
    assert got.dtype == ml_dtypes.bfloat16 and got.astype(np.float32).tolist() == [0, 1, 2, 3]


def test_the_core_does_not_import_an_adapter():
    assert set(ADAPTERS) == {"mindspore"}
    code = "import distckpt, distckpt.state, distckpt.api, sys; print(any(m.startswith('distckpt.mindspore') or m == 'mindspore' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
