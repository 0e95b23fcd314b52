"""CheckpointManager: save every N steps, keep the last K (and the best), resume into any layout.

Layout on storage: ``ROOT/{step}/`` is one distckpt checkpoint per step.  A
step counts only once its index is committed, so a save killed half way is
invisible (and removed by the next retention pass or ``distckpt gc``).

With ``layout="mindformers"`` the root is MindFormers 1.9's own
(``ROOT/iteration_{step:08d}/`` + ``latest_checkpointed_iteration.txt``, see
:mod:`distckpt.writers.mindformers`): MindFormers' ``load_checkpoint(ROOT, net,
optimizer=...)`` resumes from what the manager saved, and the manager restores
what MindFormers saved.  A step counts once the tracker names it (or named it:
older iterations with their ``common.json``); retention never deletes the
tracker's iteration.  MindFormers' ``common.json`` has fixed fields, so this
layout keeps no metrics (``best_fn`` and ``metrics=`` are refused).

Who does what during ``save(step, ...)``:

1. (all ranks) wait for the previous async save; re-raise its error if it failed;
2. (all ranks) prepare the save (:class:`distckpt.saving.SaveJob`); if async, copy the
   pieces this rank writes -- and only those -- into shared memory (the only time
   training is blocked; over ``staging_limit`` the save is synchronous instead);
3. (all ranks, a background thread if async) run the save protocol; the data file is
   written by a separate writer process (:mod:`distckpt.asyncsave`), so the writes and
   checksums never hold the training process's GIL; a rank that cannot prepare or stage its
   state keeps the error, and the save's protocol raises it on every rank (never a rank alone);
4. (rank 0) once committed, apply retention: delete old steps, never the
   newest committed one, never the best one, never one this process reads.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .asyncsave import AsyncWriter
from .errors import ConfigError, DistCkptError, NotCommittedError
from .index import INDEX_NAME, MAX_INDEX_BYTES, Index
from .saving import SaveJob
from .storage import open_storage

__all__ = ["CheckpointManager"]

_STEP = re.compile(r"^\d+$")
DEFAULT_STAGING_LIMIT = 8 << 30
LAYOUTS = ("distckpt", "mindformers")


class CheckpointManager:
    """Orbax-style manager over distckpt checkpoints, on any storage backend and under mpirun."""

    def __init__(
        self,
        root,
        *,
        max_to_keep: int | None = None,
        save_interval_steps: int = 1,
        keep_period: int | None = None,
        best_fn: Callable[[Mapping[str, Any]], float] | None = None,
        best_mode: str = "max",
        async_save: bool = False,
        storage_options: dict | None = None,
        comm=None,
        staging_limit_bytes: int | None = None,
        layout: str = "distckpt",
    ):
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if layout == "mindformers" and best_fn is not None:
            raise ConfigError("layout='mindformers' keeps no metrics (common.json has fixed fields): best_fn cannot rank its steps")
        if max_to_keep is not None and max_to_keep < 1:
            raise ConfigError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ConfigError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if keep_period is not None and keep_period < 1:
            raise ConfigError(f"keep_period must be >= 1 or None, got {keep_period}")
        if best_mode not in ("max", "min"):
            raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.root = os.fspath(root)
        self.layout = layout
        self.storage = open_storage(self.root, storage_options)
        self.storage_options = storage_options
        self.max_to_keep = max_to_keep
        self.save_interval_steps = save_interval_steps
        self.keep_period = keep_period
        self.best_fn = best_fn
        self.best_mode = best_mode
        self.async_save = async_save
        self._comm = comm
        env_limit = os.environ.get("DISTCKPT_STAGING_LIMIT")
        self.staging_limit = staging_limit_bytes or (int(env_limit) if env_limit else DEFAULT_STAGING_LIMIT)
        self._thread: threading.Thread | None = None
        self._async_writer: AsyncWriter | None = None
        self._error: BaseException | None = None
        self._reading: dict[int, int] = {}
        self._lock = threading.Lock()
        self._metrics_cache: dict[int, Any] = {}

    # ---------------------------------------------------------------- steps
    def _comm_obj(self):
        from .comm import get_comm

        return get_comm(self._comm)

    @property
    def _mf(self) -> bool:
        return self.layout == "mindformers"

    def step_path(self, step: int) -> str:
        if self._mf:
            from .codecs.mindformers import iteration_dir

            return self.storage.child_url(iteration_dir(int(step)))
        return self.storage.child_url(str(int(step)))

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        if self._mf:
            from .sources.mindformers import list_iterations

            return [s.iteration for s in list_iterations(self.storage) if s.state in ("committed", "previous")]
        steps = []
        for name in self.storage.listdir():
            if _STEP.match(name) and self.storage.exists(f"{name}/{INDEX_NAME}"):
                steps.append(int(name))
        return sorted(steps)

    def latest_step(self) -> int | None:
        if self._mf:  # the tracker's iteration (it may be older than another that was saved after it)
            from .sources.mindformers import list_iterations

            return next((s.iteration for s in list_iterations(self.storage) if s.state == "committed"), None)
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def metrics(self, step: int) -> Mapping[str, Any] | None:
        if self._mf:
            return None
        if step not in self._metrics_cache:
            try:
                idx = Index.loads(
                    self.storage.read_bytes(f"{step}/{INDEX_NAME}", limit=MAX_INDEX_BYTES),
                    where=self.storage.child_url(f"{step}/{INDEX_NAME}"),
                )
            except (FileNotFoundError, DistCkptError):
                return None
            self._metrics_cache[step] = idx.metadata.get("metrics")
        return self._metrics_cache[step]

    # ----------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        strategy=None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` as ``step`` if the interval says so (or ``force``); return whether it did."""
        self.wait()  # at most one save in flight; surfaces a background error here
        if not force and not self.should_save(step):
            return False
        if self._mf and metrics is not None:
            raise ConfigError("layout='mindformers' keeps no metrics (common.json has fixed fields); save without metrics=")
        meta: dict[str, Any] = {"step": int(step)}
        if metrics is not None:
            meta["metrics"] = dict(metrics)
        if self._mf:
            self._save_mindformers(step, state, strategy)
            return True
        job = SaveJob(state, self.step_path(step), strategy=strategy, comm=self._comm_obj(),
                      storage_options=self.storage_options, metadata=meta)
        if self.async_save and job.nbytes <= self.staging_limit:
            # the one blocked copy: this rank's pieces into shared memory; a writer process does the rest
            writer = self._writer()
            job.stage(allocate=writer.allocate)
            self._thread = threading.Thread(
                target=self._background, args=(step, job, meta, writer), name=f"distckpt-save-{step}", daemon=True
            )
            self._thread.start()
            return True
        self._save_now(step, job, meta)  # synchronous (or over the staging cap)
        return True

    def _save_mindformers(self, step: int, state: Mapping[str, Any], strategy) -> None:
        """layout="mindformers": MindFormers' own format (``iteration_{step}`` + tracker), every rank at once;
        asynchronous saves copy the state into host memory and write from a background thread."""
        from .state import split_state
        from .writers.mindformers import save_distributed

        c = self._comm_obj()

        def run(st: Mapping[str, Any]) -> None:
            save_distributed(st, self.storage, iteration=int(step), strategy=strategy, comm=c,
                             storage_options=self.storage_options)
            c.run("manager.retention", self._retention if c.rank == 0 else (lambda: None))
            c.barrier("manager.saved")

        if not self.async_save:
            run(state)
            return
        arrays, values = split_state(state)
        if sum(int(a.nbytes) for a in arrays.values()) > self.staging_limit:
            run(state)
            return
        staged = {**{k: np.array(a, copy=True) for k, a in arrays.items()}, **values}

        def background() -> None:
            try:
                run(staged)
            except BaseException as exc:  # noqa: BLE001 - surfaced at the next save() / wait()
                self._error = exc
            finally:
                staged.clear()

        self._thread = threading.Thread(target=background, name=f"distckpt-save-{step}", daemon=True)
        self._thread.start()

    def _writer(self) -> AsyncWriter:
        if self._async_writer is None:
            self._async_writer = AsyncWriter()
        return self._async_writer

    def _background(self, step: int, job: SaveJob, meta: dict, writer: AsyncWriter) -> None:
        try:
            self._save_now(step, job, meta, writer.write)
        except BaseException as exc:  # noqa: BLE001 - surfaced at the next save() / wait()
            self._error = exc
        finally:
            job.pieces = []
            writer.release(keep=True)  # the next save stages into the same (faulted-in) memory

    def _save_now(self, step: int, job: SaveJob, meta: dict, write=None) -> None:
        job.run() if write is None else job.run(writer=write)
        if meta.get("metrics") is not None:
            self._metrics_cache[int(step)] = meta["metrics"]
        c = job.comm
        c.run("manager.retention", self._retention if c.rank == 0 else (lambda: None))
        c.barrier("manager.saved")

    def wait(self) -> None:
        """Block until the pending save (if any) is committed; raise its error."""
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._async_writer is not None:
                self._async_writer.close()
                self._async_writer = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ retention
    def _best_step(self, steps: list[int]) -> int | None:
        if self.best_fn is None:
            return None
        scored = []
        for s in steps:
            m = self.metrics(s)
            if m is None:
                continue
            scored.append((float(self.best_fn(m)), s))
        if not scored:
            return None
        pick = max(scored) if self.best_mode == "max" else min(scored, key=lambda x: (x[0], -x[1]))
        return pick[1]

    def _retention(self) -> None:
        steps = self.all_steps()
        if not steps:
            return
        keep = {steps[-1]}
        latest = self.latest_step() if self._mf else None
        if latest is not None:
            keep.add(latest)  # the tracker's, whatever its number
        best = self._best_step(steps)
        if best is not None:
            keep.add(best)
        if self.keep_period:
            keep.update(s for s in steps if s % self.keep_period == 0)
        if self.max_to_keep is None:
            keep.update(steps)
        else:
            if self.best_fn is not None:
                # Orbax: keep the top max_to_keep by metric
                ranked = [s for s in steps if self.metrics(s) is not None]
                ranked.sort(key=lambda s: float(self.best_fn(self.metrics(s))), reverse=self.best_mode == "max")  # type: ignore[misc, arg-type]
                keep.update(ranked[: self.max_to_keep])
                keep.update(s for s in steps if self.metrics(s) is None and s in steps[-self.max_to_keep :])
            else:
                keep.update(steps[-self.max_to_keep :])
        with self._lock:
            reading = {s for s, n in self._reading.items() if n > 0}
        doomed = [s for s in steps if s not in keep and s not in reading]
        for s in doomed:
            if self._mf:
                from .writers.mindformers import remove_iteration

                remove_iteration(self.storage, s)
                continue
            # remove the index first: a half-deleted step is then uncommitted, never wrong
            self.storage.remove([f"{s}/{INDEX_NAME}"])
            self.storage.remove([str(s)])
            self._metrics_cache.pop(s, None)

    # -------------------------------------------------------------- restore
    def restore(self, step: int | None = None, *, strategy=None, rank: int | None = None, **kwargs) -> dict:
        """Load ``step`` (the latest committed by default) into any layout."""
        from .api import load

        if step is None:
            step = self.latest_step()
            if step is None:
                raise NotCommittedError(f"{self.root}: no committed checkpoint to restore")
        with self._lock:
            self._reading[step] = self._reading.get(step, 0) + 1
        try:
            if self._mf:
                if step not in self.all_steps():
                    raise NotCommittedError(f"not a committed iteration: {self.step_path(step)}")
                return load(self.root, iteration=step, strategy=strategy, rank=rank,
                            storage_options=self.storage_options, comm=self._comm, **kwargs)
            if not self.storage.exists(f"{step}/{INDEX_NAME}"):
                raise NotCommittedError(f"not a committed checkpoint: {self.step_path(step)}")
            return load(
                self.step_path(step),
                strategy=strategy,
                rank=rank,
                storage_options=self.storage_options,
                comm=self._comm,
                **kwargs,
            )
        finally:
            with self._lock:
                self._reading[step] -= 1


def list_checkpoints(root, *, storage_options: dict | None = None) -> dict:
    """What ``distckpt list ROOT`` shows: the committed steps of a CheckpointManager root.

    Returns ``{"root", "steps", "latest", "entries": [{"name", "step", "state", "line"}]}``;
    a ROOT that does not exist is an error.  A MindFormers root (a tracker or ``iteration_*/``
    directories) lists every iteration: ``{"root", "kind": "mindformers", "steps", "latest",
    "entries": [{"name", "iteration", "state", "line"}]}``, state ``committed`` (the tracker's),
    ``previous`` (an earlier commit), ``uncommitted`` or ``missing`` (named by the tracker, absent).
    """
    from .errors import NotFoundError

    store = open_storage(root, storage_options)
    if not store.exists():
        raise NotFoundError(f"{root}: no such directory")
    if not store.isdir():
        raise NotFoundError(f"{root}: is a file; list takes the root directory of a CheckpointManager")
    names = store.listdir()
    from .sources.mindformers import is_root, list_iterations

    if is_root(names):
        its = list_iterations(store, names)
        rows = [{"name": s.name, "iteration": s.iteration, "state": s.state, "line": f"{s.name}  {s.state}"} for s in its]
        done = [s.iteration for s in its if s.state in ("committed", "previous")]
        latest = next((s.iteration for s in its if s.state == "committed"), None)
        return {"root": os.fspath(root), "kind": "mindformers", "steps": done, "latest": latest, "entries": rows}
    steps = CheckpointManager(root, storage_options=storage_options).all_steps()
    entries = [{"name": str(s), "step": s, "state": "committed", "line": str(s)} for s in steps]
    return {"root": os.fspath(root), "steps": steps, "latest": steps[-1] if steps else None, "entries": entries}
