"""Several JAX processes (hosts) running one program: start-up, and host <-> global arrays.

Multi-controller JAX: every process runs the same Python program; jitted functions of global
arrays (sharded over every process's devices) run as one SPMD program. This module holds what
the trainer and evaluation need around that:

- `initialize`: `jax.distributed.initialize` from explicit flags (GPU hosts, tests), or from the
  environment on Cloud TPU VMs (`--multihost`); a no-op for one process.
- `to_numpy`: the whole value of a global array on every process (an all-gather when this
  process does not hold all of it).
- `process_block` / `allgather_blocks`: each process handles a contiguous block of a list
  (the trainer's grading, sspo_jax/train/grading.py) and the results are all-gathered.

Data: every process reads the same global prompt stream (the prompts are small: 128 prompts of
1k tokens are 0.5 MB); batches become global arrays with each process feeding only the rows its
devices hold (`parallel.put_batch`, by `jax.make_array_from_process_local_data`). So a run is
identical whatever the number of processes, which the tests check.
"""
from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, multihost: bool = False,
               timeout_s: int = 300) -> None:
    """Starts JAX's multi-process runtime when asked to; call before any other JAX use.

    Explicit: `coordinator_address` (HOST:PORT of process 0), `num_processes`, `process_id`.
    `multihost=True` without them: let JAX find them in the environment (Cloud TPU VMs, SLURM).
    Neither: a single process, nothing to do. A process waits at most `timeout_s` seconds for
    all the others to join (then the runtime stops it), and says so first, with the fix.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if not all(v is not None for v in explicit):
            raise ValueError("multi-process run: give all of --coordinator_address=HOST:PORT, "
                             "--num_processes=N and --process_id=I (I from 0 to N-1)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        # CPU devices of different processes talk through gloo (TPU/GPU use their own fabric).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # The runtime aborts the process (in C++, uncatchable) when the others do not come in
        # time, so what is awaited and the fix are said before.
        print(f"process {process_id} of {num_processes}: joining {coordinator_address}; it stops "
              f"after {timeout_s} s (--distributed_timeout_s) unless the same command runs on every "
              f"host, with --process_id=0 .. {num_processes - 1} and process 0's address", flush=True)
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    elif multihost:
        jax.distributed.initialize(initialization_timeout=timeout_s)


def is_chief() -> bool:
    """Process 0 writes logs, metrics, plots and the run record."""
    return jax.process_index() == 0


def to_numpy(x) -> np.ndarray:
    """The whole value of `x` as a NumPy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def stop_everywhere(error: BaseException | None, message: str) -> None:
    """Raises `error` on the process that has it and RuntimeError(`message`) on every other one,
    so a check made on process 0 alone (the run record, the workdir lock) stops every process
    instead of leaving the others waiting in a collective."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        refused = multihost_utils.process_allgather(np.array([error is not None], np.int32))
        if np.asarray(refused).any() and error is None:
            raise RuntimeError(message)
    if error is not None:
        raise error


def on_chief(check, message: str, errors=(ValueError,)):
    """Runs `check()` on process 0 only and returns its result there (None elsewhere); an error
    of type `errors` it raises stops every process (`stop_everywhere`). For the checks only
    process 0 can make: the run record, the workdir lock."""
    error, result = None, None
    if jax.process_index() == 0:
        try:
            result = check()
        except errors as e:
            error = e
    stop_everywhere(error, message)
    return result


def process_block(n: int, index: int | None = None, count: int | None = None) -> slice:
    """The contiguous block of `n` items that process `index` of `count` handles (default:
    this process); blocks differ in size by at most one."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def allgather_blocks(local: np.ndarray, n: int) -> np.ndarray:
    """Concatenates every process's `local` block (as laid out by `process_block(n)`) on every
    process."""
    count = jax.process_count()
    if count == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils
    width = -(-n // count)
    padded = np.zeros((width, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))    # [count, width, ...]
    return np.concatenate([gathered[i][: _block_len(n, i, count)] for i in range(count)])


def _block_len(n: int, index: int, count: int) -> int:
    block = process_block(n, index, count)
    return block.stop - block.start


def define_flags():
    """The multi-process flags of `sspo_jax.train` and `sspo_jax.evaluate` (absl)."""
    from absl import flags
    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0 for a multi-process run (with --num_processes and "
                        "--process_id); on Cloud TPU VMs use --multihost instead.")
    flags.DEFINE_integer("num_processes", None, "Number of JAX processes (hosts) in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
    flags.DEFINE_integer("distributed_timeout_s", 300, "Seconds a process waits for all the others "
                         "to join a multi-process run before it stops with a message.")
    flags.DEFINE_bool("multihost", False,
                      "Start JAX's multi-process runtime from the environment (Cloud TPU VMs, "
                      "SLURM): every worker runs the same command.")


def initialize_from_flags() -> None:
    from absl import flags
    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id, multihost=f.multihost,
               timeout_s=f.distributed_timeout_s)
