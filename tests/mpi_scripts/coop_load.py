"""Every rank of an mpirun job loads PATH into a strategy and checks its slices exactly.

coop_load.py PATH LAYOUT [--no-coop] [--names a,b]; LAYOUT is dp4 (every rank holds everything) or dp2tp2.
Prints ``RANK r OK <bytes read by this rank>`` or ``RANK r ERROR message``.
"""

import argparse
import sys

import numpy as np

import distckpt
from distckpt.comm import get_comm
from distckpt.execute import ReadStats
from distckpt.layout import ParamSpec, Strategy, TensorLayout

SHAPES = {"w1": (256, 512), "w2": (128, 768), "emb": (160, 64)}  # >= 4 checksum blocks per box


def full_state() -> dict:
    rng = np.random.default_rng(11)
    out = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    out["norm"] = rng.standard_normal(512).astype(np.float16)  # not in the strategy: everyone's
    return out


def strategy(layout: str) -> Strategy:
    if layout == "dp4":
        return Strategy({n: ParamSpec(n, TensorLayout((4,), (-1, -1))) for n in SHAPES})
    return Strategy({n: ParamSpec(n, TensorLayout((2, 2), (0, -1))) for n in SHAPES})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("layout")
    ap.add_argument("--no-coop", action="store_true")
    args = ap.parse_args()
    c = get_comm()
    strat = strategy(args.layout)
    stats = ReadStats()
    try:
        got = distckpt.load(args.path, strategy=strat, stats=stats, cooperative=False if args.no_coop else None)
        full = full_state()
        for n, a in full.items():
            box = strat.box(n, c.rank, a.shape) if n in strat else None
            want = a[box.relative_to(distckpt.Box((0,) * a.ndim, a.shape))] if box is not None else a
            assert got[n].dtype == want.dtype and got[n].tobytes() == np.ascontiguousarray(want).tobytes(), n
        assert got["step"] == 5
        print(f"RANK {c.rank} OK {stats.bytes_read}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"RANK {c.rank} ERROR {exc}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
