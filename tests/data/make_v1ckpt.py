"""How ``tests/data/v1ckpt`` was made: an index-version-1 checkpoint written by distckpt's own
version-1 writer (main at 369e753, before index version 2), two ranks in rank mode, then finalize::

    PYTHONPATH=<checkout of 369e753> python tests/data/make_v1ckpt.py tests/data/v1ckpt

``tests/test_index.py`` imports :func:`full_state` and :data:`STRATEGY` to check what it reads.
"""

from __future__ import annotations

import json
import os
import sys

import ml_dtypes
import numpy as np

import distckpt
from distckpt.layout import ParamSpec, Strategy, TensorLayout


def full_state():
    rng = np.random.default_rng(11)
    return {
        "w": rng.standard_normal((6, 4)).astype(np.float32),
        "e": rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16),
        "b": np.arange(5, dtype=np.int32) - 2,
        "x": rng.standard_normal((2, 4, 3)).astype(np.float16),
        "s": np.float64(2.5),
    }

STRATEGY = Strategy({
    "w": ParamSpec("w", TensorLayout((2,), (0, -1))),
    "e": ParamSpec("e", TensorLayout((2,), (-1, 0))),
    "x": ParamSpec("x", TensorLayout((2,), (-1, 0, -1))),
})


def main(out: str) -> None:
    strat = STRATEGY
    full = full_state()
    for r in range(2):
        st = {}
        for k, v in full.items():
            box = strat.box(k, r, v.shape) if k in strat else distckpt.Box((0,) * np.ndim(v), np.shape(v))
            st[k] = np.ascontiguousarray(np.asarray(v)[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]) if np.ndim(v) else v
        st["step"] = 3
        st["lr"] = 0.5
        distckpt.save(st, out, strategy=strat, rank=r, block_size=4096, metadata={"name": "v1fixture"})
    print(distckpt.finalize(out))
    print(json.load(open(os.path.join(out, "distckpt.index.json")))["version"])


if __name__ == "__main__":
    main(sys.argv[1])
