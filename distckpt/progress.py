"""Progress bars (tqdm) on a terminal, nothing otherwise or with ``quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

__all__ = ["progress", "counted"]

T = TypeVar("T")


def _show(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", quiet: bool = False,
             unit: str = "tensor") -> Iterable[T]:
    """A tqdm bar over ``iterable`` on a terminal; the iterable itself otherwise."""
    if not _show(quiet):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


def counted(items: Sequence[Any], *, desc: str, quiet: bool) -> list[Any]:
    """Writer items (:class:`~distckpt.writers.OutItem`) whose ``fetch`` advances a byte-counting bar."""
    if not _show(quiet) or not items:
        return list(items)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(it.nbytes for it in items), desc=desc, unit="B", unit_scale=True, leave=False)

    def wrap(it):
        fetch = it.fetch

        def run():
            arr = fetch()
            bar.update(arr.nbytes)
            if bar.n >= bar.total:
                bar.close()
            return arr

        return replace(it, fetch=run)

    return [wrap(it) for it in items]
