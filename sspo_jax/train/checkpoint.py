"""Training-state checkpoints on orbax, so a run resumes exactly where it stopped.

A checkpoint holds named items, each its own orbax item so that any one can be read alone:
- pytrees of arrays (the trainer's `params` and `opt_state`), saved with orbax's standard
  handler, which writes sharded arrays from every process together;
- `meta`: a JSON dict (the data iterator's state, counters, anything small and not an array).

Evaluation, export and the KL reference read only `params`, into abstract shapes: the optimizer
state (twice the parameters with Adam) is never materialised for them.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save (kill -9, preemption) leaves the previous checkpoint as the latest one: the training
state is never lost, at worst the steps since the last save are redone.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as log
from etils import epath

from sspo_jax.parallel import abstract

META = "meta"


class Checkpointer:
    """Saves every `save_every` steps (and on demand), keeps the newest `keep` checkpoints.

    Steps in `always_keep` are never deleted: step 0 is the starting policy (after the warm
    start), which evaluation and `sspo_jax.compare` start from.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True, always_keep: tuple[int, ...] = (0,), create: bool = True):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        directory = os.fspath(directory)
        # Local paths are made absolute; URLs (gs://...) go to orbax as they are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.save_every = save_every
        # The interval is applied in save() (orbax would also save whatever step comes first).
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if always_keep:
            policies.append(ocp.checkpoint_managers.CustomSteps(list(always_keep)))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=create,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, items: dict[str, Any], meta: dict | None = None, *,
             force: bool = False) -> bool:
        """Saves `items` (name -> pytree of arrays) and `meta` if `step` is a multiple of
        `save_every` (or `force`); returns whether it saved.

        With async saving the arrays are copied off the device before this returns and written in
        the background; `wait()` blocks until the write is complete.
        """
        if not force and step % self.save_every:
            return False
        if step in self.all_steps():
            return False  # already saved (e.g. the final step was also on the interval)
        if META in items:
            raise ValueError(f"checkpoint item name {META!r} is reserved for the JSON meta")
        args = ocp.args.Composite(**{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
                                  **{META: ocp.args.JsonSave(meta or {})})
        # A failed save (a full disk, a lost bucket) stops the run now, not steps later: the
        # previous background save's error surfaces here, this one's at the next save or close.
        with self._failing_save("an earlier background save"):
            getattr(self._manager, "check_for_errors", lambda: None)()  # not in every orbax version
        with self._failing_save(f"the save of step {step}"):
            return self._manager.save(step, args=args, force=True)

    @contextlib.contextmanager
    def _failing_save(self, what: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/OS errors of many kinds
            raise RuntimeError(
                f"checkpoint {what} in {self.directory} failed ({_first_line(e)}); the run stops "
                f"here. The newest complete checkpoint is step {self._manager.latest_step()}: "
                f"fix the cause (disk space, permissions, the bucket) and rerun to resume") from e

    def restore(self, abstract_items: dict[str, Any], step: int | None = None) -> tuple[dict, dict]:
        """Restores (items, meta) at `step` (default: the latest); only the items named in
        `abstract_items` are read.

        Each item's abstract tree holds `jax.ShapeDtypeStruct`s (with `.sharding` where the
        arrays should land sharded; `abstract` makes them from arrays or nnx State) or concrete
        arrays whose shapes, dtypes and shardings are used.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        step_dir = epath.Path(self.directory) / str(step)
        for name in abstract_items:
            if not (step_dir / name).exists():
                found = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
                raise FileNotFoundError(
                    f"checkpoint {step_dir} has no item {name!r} (it holds {found}); a checkpoint "
                    f"with a 'state' item was written by an older sspo_jax, which saved parameters "
                    f"and optimizer state together: rerun that training with this version")
        args = {name: ocp.args.StandardRestore(abstract(tree)) for name, tree in abstract_items.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **args, **{META: ocp.args.JsonRestore()}))
        return {name: restored[name] for name in abstract_items}, dict(restored[META] or {})

    def restore_latest(self, abstract_items: dict[str, Any]) -> tuple[int, dict, dict]:
        """(step, items, meta) of the newest checkpoint that restores; a newer one that does not
        (a truncated or zeroed data file, a missing manifest or metadata) is skipped with a
        warning that says which and why, and moved aside (`<step>.unreadable`, kept for a look)
        so that the step can be saved again. Raises when none restores, naming each step's
        error; a checkpoint of other shapes (a changed model) fails on every step, so it raises.

        With several processes they first agree, from checks of the files that need no
        collective (the metadata and manifests each process can read), on the newest complete
        step, and restore only that one: a data file that is present but unreadable then stops
        the run with its error (an orbax restore is collective, so it cannot be retried on one
        process alone); move that step aside and rerun."""
        failures = []
        multi = jax.process_count() > 1
        for step in sorted(self.all_steps(), reverse=True):
            problem = self._missing_files(step, abstract_items)
            if _any_process(problem is not None):
                failures.append((step, problem or "incomplete on another process"))
                continue
            if multi:
                items, meta = self.restore(abstract_items, step)
            else:
                try:
                    items, meta = self.restore(abstract_items, step)
                except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                    failures.append((step, _first_line(e)))
                    continue
            for bad, why in failures:
                log.warning("checkpoint %d in %s is unreadable (%s): moved aside", bad,
                            self.directory, why)
                self._move_aside(bad)
            if failures:
                log.warning("resuming from checkpoint %d, the newest that restores", step)
            return step, items, meta
        if not failures:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        listed = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise RuntimeError(f"no checkpoint in {self.directory} restores ({listed})")

    def _missing_files(self, step: int, abstract_items: dict[str, Any]) -> str | None:
        """Why checkpoint `step` is visibly incomplete (a missing or unparsable metadata file or
        manifest of an item), or None."""
        step_dir = epath.Path(self.directory) / str(step)
        needed = [(name, ("_METADATA", "manifest.ocdbt")) for name in abstract_items]
        for name, files in needed + [(META, ("metadata",))]:
            for f in files:
                path = step_dir / name / f
                if not path.exists():
                    return f"{name}/{f} is missing"
                if f != "manifest.ocdbt":
                    try:
                        json.loads(path.read_text())
                    except ValueError as e:
                        return f"{name}/{f} is not JSON ({e})"
        return None

    def _move_aside(self, step: int) -> None:
        """Process 0 renames the step's directory; then every process forgets the step."""
        if jax.process_index() == 0:
            path = epath.Path(self.directory) / str(step)
            try:
                path.rename(path.parent / f"{step}.unreadable")
            except OSError as e:
                log.warning("could not move %s aside (%s): remove it by hand, or its step cannot "
                            "be saved again", path, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"sspo_jax: checkpoint {step} moved aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until any background save has finished (raising if it failed)."""
        with self._failing_save("a background save"):
            self._manager.wait_until_finished()
            getattr(self._manager, "check_for_errors", lambda: None)()  # not in every orbax version

    def close(self) -> None:
        self.wait()
        self._manager.close()
        self._closed = True

    def abandon(self) -> None:
        """Closes after an error elsewhere, raising nothing (the error that stopped the run is
        the one to report): the save in flight is let finish (it is a good checkpoint), a failed
        one is logged in one line, and unfinished temporary directories are removed, so the
        checkpoint directory holds complete checkpoints only."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            try:
                self._manager.wait_until_finished()
                getattr(self._manager, "check_for_errors", lambda: None)()  # not in every orbax
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                log.warning("a background checkpoint save failed too: %s", _first_line(e))
        finally:  # even when interrupted (a second Ctrl-C): close, and no temporary directories
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing the checkpoint manager failed: %s", _first_line(e))
            if jax.process_index() == 0 and "://" not in str(self.directory):
                for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
                    if ".orbax-checkpoint-tmp" in name:
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        """On an error, `abandon`; after a normal end the caller has closed (or closes) it."""
        if exc_type is not None:
            self.abandon()
        return False

    def __enter__(self):
        return self


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (all processes call it together)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.array([flag], np.int32))).any())


class PreemptionWatcher:
    """Turns SIGTERM (how a TPU VM announces preemption) into a flag the training loop polls.

    The loop checks `requested()` at step boundaries, saves a checkpoint and exits cleanly, so the
    signal never interrupts a step half-way. With several JAX processes the flag is agreed on by
    all of them (any process signalled means all stop at the same step).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._event.set()

    def requested(self) -> bool:
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        import numpy as np
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([local], dtype=np.int32))
        return bool(np.asarray(flags).any())

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
