"""Reusable contract checks for storage backends (zarr ``testing/store.py`` style).

``check_storage_contract(url)`` exercises every primitive :class:`~distckpt.storage.Storage`
relies on against a fresh, empty directory URL, and ``check_roundtrip(url)``
saves and loads a small checkpoint there.  Both raise ``AssertionError``
naming the primitive that misbehaves; use them to qualify a new fsspec backend::

    from distckpt.testing import check_storage_contract, check_roundtrip
    check_storage_contract("myfs://bucket/tmp/contract")
    check_roundtrip("myfs://bucket/tmp/roundtrip")
"""

from __future__ import annotations

import threading

import numpy as np

from .comm import Communicator
from .errors import StorageError
from .storage import Storage, open_storage

__all__ = ["check_storage_contract", "check_roundtrip", "sample_state", "ThreadComm", "run_ranks"]


def _eq(got, want, what: str) -> None:
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def check_storage_contract(url: str, storage_options: dict | None = None) -> Storage:
    """Check the primitives on an empty directory ``url``; return the storage."""
    st = open_storage(url, storage_options)
    _eq(st.listdir(), [], "listdir of a missing directory")
    _eq(st.exists("nope"), False, "exists of a missing name")
    try:
        st.size("nope")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("size of a missing name must raise FileNotFoundError")

    payload = bytes(range(256)) * 41  # 10496 bytes, not a multiple of anything round
    st.makedirs()
    st.put("a.bin", payload)
    _eq(st.exists("a.bin"), True, "exists after put")
    _eq(st.size("a.bin"), len(payload), "size after put")
    _eq(st.read_bytes("a.bin"), payload, "read_bytes after put")
    _eq(bytes(st.read_range("a.bin", 1000, 333)), payload[1000:1333], "read_range")
    try:
        st.read_bytes("a.bin", limit=100)
    except StorageError:
        pass
    else:
        raise AssertionError("read_bytes must refuse an object above its limit")
    try:
        st.read_range("a.bin", len(payload) - 10, 20)
    except (StorageError, OSError):
        pass
    else:
        raise AssertionError("read_range past the end must raise")

    # a sequential writer, published by close_durable
    f = st.open_write("sub/b.bin")
    for i in range(0, len(payload), 1000):
        f.write(payload[i : i + 1000])
    _eq(f.tell(), len(payload), "writer tell()")
    st.close_durable(f)
    _eq(st.read_bytes("sub/b.bin"), payload, "open_write + close_durable")
    _eq(st.listdir(), ["a.bin", "sub"], "listdir with a file and a subdirectory")
    _eq(st.listdir("sub"), ["b.bin"], "listdir of a subdirectory")
    _eq(st.walk_files(), ["a.bin", "sub/b.bin"], "walk_files")
    _eq(st.isdir("sub"), True, "isdir of a subdirectory")

    # put_atomic replaces whole
    st.put_atomic("idx.json", b"old")
    st.put_atomic("idx.json", b"new-and-longer")
    _eq(st.read_bytes("idx.json"), b"new-and-longer", "put_atomic over an existing object")
    leftovers = [n for n in st.listdir() if n.endswith(".tmp")]
    _eq(leftovers, [], "temp files left by put_atomic")

    # many concurrent ranged reads into caller buffers; a large one is cut into pieces
    st.read_piece = 1 << 20
    big = np.random.default_rng(0).integers(0, 256, size=(3 << 20) + 12345, dtype=np.uint8).tobytes()
    st.put("big.bin", big)
    bufs = [bytearray(n) for n in (7, 1 << 16, len(big) - 100, 1)]
    starts = [0, 5000, 50, len(big) - 1]
    st.read_many([("big.bin", s, memoryview(b)) for s, b in zip(starts, bufs)])
    for s, b in zip(starts, bufs):
        _eq(bytes(b) == big[s : s + len(b)], True, f"read_many range [{s}, {s + len(b)})")

    # a writer abandoned by an exception publishes nothing
    f = st.open_write("partial.bin")
    f.write(b"x" * 100)
    try:
        raise RuntimeError("simulated failure mid-write")
    except RuntimeError:
        f.close()
    if not st.is_local:
        _eq(st.exists("partial.bin"), False, "an object whose writer failed")
    st.remove(["partial.bin"])

    # replace: a file, then a directory with its commit object copied last
    st.put("new.bin", b"N")
    st.replace("new.bin", "a.bin")
    _eq(st.read_bytes("a.bin"), b"N", "replace of a file")
    _eq(st.exists("new.bin"), False, "replace leaves no source")
    st.put("d_new/x", b"1")
    st.put("d_new/commit", b"c")
    st.put("d/old-only", b"o")
    st.replace("d_new", "d", commit_last="commit")
    _eq(st.walk_files("d"), ["d/commit", "d/x"], "replace of a directory (stale objects removed)")

    sub = st.sub("sub")
    _eq(sub.read_bytes("b.bin"), payload, "sub() storage")

    st.remove(["a.bin", "sub", "nope"])
    _eq("a.bin" in st.listdir() or "sub" in st.listdir(), False, "remove of a file and a directory")
    return st


def sample_state(seed: int = 0) -> dict:
    """A small state with the dtypes and shapes that matter: bf16, fp32, int, bool, scalar, value."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((64, 48)).astype(np.float32),
        "b16": rng.standard_normal((40, 8)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(-5, 5, size=(9,), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(3, 3)).astype(bool),
        "scale": np.asarray(1.5 + seed, dtype=np.float32),
        "step": 100 + seed,
        "tag": "run-α",
    }


def check_roundtrip(url: str, storage_options: dict | None = None, seed: int = 0) -> dict:
    """Save :func:`sample_state` to ``url``, load it back, compare bit for bit; return what was loaded."""
    from . import api

    state = sample_state(seed)
    api.save(state, url, storage_options=storage_options)
    got = api.load(url, storage_options=storage_options)
    _eq(sorted(got), sorted(state), "names after a round trip")
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            g = got[k]
            _eq((g.dtype, g.shape), (v.dtype, v.shape), f"dtype/shape of {k!r}")
            _eq(g.tobytes() == v.tobytes(), True, f"bytes of {k!r}")
        else:
            _eq(got[k], v, f"value {k!r}")
    return got


class ThreadComm(Communicator):
    """Ranks as threads of one process (shared slots and a barrier).

    Lets a test run a real multi-rank save or load on one CPU without mpirun;
    the collectives carry the same JSON bytes as :class:`~distckpt.comm.MPIComm`.
    """

    def __init__(self, rank: int, shared: dict):
        self.rank, self.size, self._s = rank, shared["size"], shared

    @staticmethod
    def group(n: int, *, timeout: float = 300) -> list[ThreadComm]:
        shared = {"size": n, "barrier": threading.Barrier(n, timeout=timeout), "slots": [None] * n}
        return [ThreadComm(r, shared) for r in range(n)]

    def barrier(self, name, *, timeout=None):
        self._s["barrier"].wait()

    def _allgather_bytes(self, data, name, timeout):
        self._s["slots"][self.rank] = data
        self._s["barrier"].wait()
        out = list(self._s["slots"])
        self._s["barrier"].wait()
        return out

    def _broadcast_bytes(self, data, root, name, timeout):
        if self.rank == root:
            self._s["slots"][root] = data
        self._s["barrier"].wait()
        out = self._s["slots"][root]
        self._s["barrier"].wait()
        return out


def run_ranks(n: int, fn, *, timeout: float = 300) -> list:
    """Run ``fn(rank, comm)`` on ``n`` thread-ranks; return the results, re-raise the first error."""
    comms = ThreadComm.group(n, timeout=timeout)
    results: list = [None] * n
    errors: list = []

    def body(r):
        try:
            results[r] = fn(r, comms[r])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            comms[r]._s["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return results
