"""distckpt.jsonutil: every JSON distckpt reads is strict, everything it prints is strict JSON."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distckpt import jsonutil
from distckpt.errors import ConfigError, FormatError


def test_duplicate_keys_are_refused_at_any_depth():
    with pytest.raises(FormatError, match=r"x.json: not valid JSON: duplicate key 'version'.*twice"):
        jsonutil.loads(b'{"version": 99, "version": 1}', where="x.json")
    with pytest.raises(FormatError, match="duplicate key 'tensors'"):
        jsonutil.loads(b'{"a": {"tensors": {"w": 1}, "tensors": {}}}', where="i")


def test_nan_and_infinity_are_not_json_on_input_but_lenient_reads_take_them():
    for bad in (b'{"a": NaN}', b"[Infinity]", b"-Infinity"):
        with pytest.raises(FormatError, match="not valid JSON"):
            jsonutil.loads(bad, where="w")
    assert math.isnan(jsonutil.loads_lenient(b'{"a": NaN}', where="w")["a"])
    with pytest.raises(FormatError, match="duplicate"):
        jsonutil.loads_lenient(b'{"a": 1, "a": 2}', where="w")


def test_errors_are_the_callers_class_and_never_raw():
    with pytest.raises(ConfigError, match="cfg: not valid JSON"):
        jsonutil.loads(b"{nope", where="cfg", error=ConfigError)
    with pytest.raises(FormatError):
        jsonutil.loads(b"\xff\xfe{}", where="w")
    with pytest.raises(FormatError):
        jsonutil.loads(b"[" * 100_000 + b"]" * 100_000, where="deep")  # RecursionError, caught


def test_output_is_strict_json():
    text = jsonutil.dumps({"loss": float("nan"), "best": [float("inf"), -float("inf"), 1.5]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": "NaN", "best": ["Infinity", "-Infinity", 1.5]}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_round_trip_of_strict_documents(doc):
    assert jsonutil.loads(jsonutil.dumps(doc), where="rt") == doc
