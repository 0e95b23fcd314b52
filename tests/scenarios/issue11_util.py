"""Helpers shared by the issue-11 scenario tests (``test_issue11_*.py``, ``test_docs.py``).

* :func:`cli` -- run ``distckpt.cli.main`` in this process and capture exit code, stdout, stderr;
* :func:`assert_error` -- exit 1 with exactly one ``error: ...`` line (or, with ``code=2``, the
  subcommand's usage and one ``distckpt CMD: error: ...`` line), no traceback, the needles in it;
* :func:`assert_nothing_at` -- neither DST nor a hidden staging leftover beside it;
* :func:`native_tp` -- a MindSpore-style ``rank_*/`` directory cut by plain numpy, and its strategy file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from synth import make_strategy, write_native, write_strategy  # noqa: E402

__all__ = ["cli", "assert_error", "assert_nothing_at", "native_tp", "full_model", "REPO", "TESTS"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """``distckpt ARGS`` in this process: (exit code, stdout, stderr)."""
    from distckpt.cli import main

    capsys.readouterr()
    try:
        rc = main([os.fspath(a) for a in args])
    except SystemExit as exc:  # argparse's own usage errors (a missing positional) exit from inside parse_args
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(result: tuple[int, str, str], *needles: str, code: int = 1, command: str | None = None) -> str:
    """The CLI failed cleanly: exit ``code``, one error line holding every needle; returns that line."""
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    else:
        assert lines[0].startswith(f"usage: distckpt {command or ''}"), err
        assert [ln for ln in lines if "error:" in ln] == [lines[-1]], err
        assert lines[-1].startswith(f"distckpt {command or ''}"), err
    line = lines[-1]
    for n in needles:
        assert n in line, (n, line)
    for cls in ("Error:", "Exception:", "NotADirectoryError", "FileNotFoundError", "MemoryError", "KeyError"):
        assert cls not in line.replace("error: ", "", 1), line  # words, not class names
    return line


def assert_nothing_at(dst) -> None:
    """DST does not exist, and nothing hidden named after it was left beside it."""
    dst = Path(dst)
    assert not dst.exists() and not dst.is_symlink(), dst
    if dst.parent.exists():
        left = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]
        assert not left, left


def full_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((8, 8)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
    }


def native_tp(root, tp: int, *, strategy_name: str | None = None, extra_params: dict | None = None,
              seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """``root/rank_{r}/checkpoint_{r}.ckpt`` for a TP-``tp`` layout (w split by rows, b replicated)
    and the strategy file beside it (with ``extra_params`` layouts that no file holds)."""
    root = Path(root)
    full = full_model(seed)
    layouts = {"w": ((tp,), (0, -1)), "b": ((tp,), (-1,))}
    write_native(root, make_strategy(layouts), full, writer="distckpt")
    layouts.update(extra_params or {})
    strat_path = root.parent / (strategy_name or f"{root.name}_strategy.ckpt")
    write_strategy(make_strategy(layouts), strat_path)
    return root, strat_path, full
