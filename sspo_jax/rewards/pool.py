"""Grading in a pool of spawned worker processes, with a per-item timeout that always holds.

Each worker is a `multiprocessing` 'spawn' process (never fork: the trainer holds JAX state and
threads) with its own pipe. The parent hands one item at a time to an idle worker and waits on
all pipes and process sentinels at once (`multiprocessing.connection.wait`), so it notices a
result, a dead worker or a missed deadline without polling.

Two timeouts bound an item of `timeout` seconds:
- soft: inside the worker a `setitimer` alarm raises `GradeTimeout` (a BaseException, so neither
  math-verify's nor sympy's `except Exception` swallows it) in the worker's main thread; the item
  is `timeout` and the worker lives on;
- hard: the parent kills the worker (SIGKILL) `kill_grace` seconds after the soft deadline, for
  work a signal cannot interrupt (a signal handler runs only between bytecodes, so e.g. one
  CPython big-integer operation in C delays it until the operation ends); the item is `timeout` and a fresh worker is started in the background.
A worker that dies (killed from outside, out of memory) is replaced and its item retried once on
another worker; a second death makes it `error`. Model text never raises out of `grade`.
"""
from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref

from sspo_jax.rewards.equivalence import GradeResult, grade_response

_READY = "ready"
# A replacement worker that dies this many times in a row before saying ready means the
# environment is broken (e.g. math-verify not importable): raise rather than respawn forever.
_MAX_FAILED_STARTS = 3


class GradeTimeout(BaseException):
    """Raised by the soft-timeout alarm inside a grading process."""


def _on_alarm(signum, frame):
    raise GradeTimeout()


def run_with_alarm(fn, timeout: float | None):
    """Call `fn()` with a SIGALRM soft timeout (main thread only); raises GradeTimeout."""
    if not timeout or threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def grade_guarded(response: str, gold: str, timeout: float | None, use_math_verify: bool = True) -> GradeResult:
    """`grade_response` with the soft timeout; never raises (timeout -> `timeout`, bug -> `error`)."""
    try:
        return run_with_alarm(lambda: grade_response(response, gold, use_math_verify), timeout)
    except GradeTimeout:
        return GradeResult(0.0, "timeout", None)
    except Exception as e:  # noqa: BLE001 - any failure on model text is a graded `error`
        return GradeResult(0.0, "error", None, f"{type(e).__name__}: {str(e)[:200]}")


def warm_up() -> None:
    """Grade one symbolic item: sympy imports much of itself lazily on first use (~2 s), which
    would otherwise be charged against the first real item's timeout."""
    grade_response(r"\boxed{(x+1)^2}", r"x^2+2x+1")


def _worker_main(conn, memory_limit_mb: int | None, use_math_verify: bool) -> None:
    """Body of a grading process: receive (index, response, gold, timeout), send (index, result)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if use_math_verify:
        warm_up()
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg is None:
            return
        index, response, gold, timeout = msg
        try:
            result = grade_guarded(response, gold, timeout, use_math_verify)
        except GradeTimeout:  # the alarm fired between the item's end and its cancellation
            result = GradeResult(0.0, "timeout", None)
        conn.send((index, result))


class _Worker:
    """One grading process and the parent's end of its pipe."""

    def __init__(self, ctx, memory_limit_mb, use_math_verify):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, memory_limit_mb, use_math_verify),
                                   daemon=True, name="sspo-grader")
        self.process.start()
        child_conn.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def stop(self, kill: bool) -> None:
        """Ask the process to exit (unless `kill`), SIGKILL it if still alive after 0.5 s, close the pipe."""
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(0.5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        self.conn.close()


def _shutdown(workers: list) -> None:
    for w in workers:  # ask all to exit first, so they stop in parallel
        try:
            w.conn.send(None)
        except OSError:
            pass
    for w in workers:
        w.stop(kill=False)
    workers.clear()


class Grader:
    """Grades batches of responses; holds a reusable pool of spawned grading processes.

    `Grader(processes=0)` grades in the calling process (for debugging; the soft timeout works
    only from the main thread, and nothing bounds C-level work). Use as a context manager or
    call `close()`; workers are also shut down when the Grader is collected or at exit.
    """

    def __init__(self, processes: int | None = None, kill_grace: float = 1.0,
                 memory_limit_mb: int | None = 4096, use_math_verify: bool = True):
        if processes is None:
            processes = min(4, os.cpu_count() or 1)
        if processes < 0:
            raise ValueError(f"processes must be >= 0 (0 = grade in this process), got {processes}")
        if kill_grace <= 0:
            raise ValueError(f"kill_grace must be > 0 seconds, got {kill_grace}")
        if memory_limit_mb is not None and memory_limit_mb <= 0:
            raise ValueError(f"memory_limit_mb must be > 0 or None (no limit), got {memory_limit_mb}")
        self.processes = processes
        self.kill_grace = kill_grace
        self.memory_limit_mb = memory_limit_mb
        self.use_math_verify = use_math_verify
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._failed_starts = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        for _ in range(processes):
            self._workers.append(self._new_worker())
        if processes == 0 and use_math_verify:
            warm_up()

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.memory_limit_mb, self.use_math_verify)

    def worker_pids(self) -> list[int]:
        """Process ids of the current grading processes (empty in in-process mode)."""
        return [w.process.pid for w in self._workers]

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        """Block until every grading process has started (imported sympy); TimeoutError after `timeout` s.

        Optional: `grade` waits for workers by itself. Call it after creating a Grader so the first
        training step is not charged for the start-up, or in tests before timing a batch.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not all(w.ready for w in self._workers):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"grading processes not ready after {timeout} s")
                waiting = [w for w in self._workers if not w.ready]
                ready = set(multiprocessing.connection.wait(
                    [w.conn for w in waiting] + [w.process.sentinel for w in waiting], timeout=left))
                for w in waiting:
                    if w.conn in ready or w.process.sentinel in ready:
                        self._receive_ready(w)

    def _receive_ready(self, w: _Worker) -> None:
        """Read a starting worker's READY, or replace it if it died while starting."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._count_failed_start(w)
            self._replace(w)
            return
        if msg == _READY:
            w.ready = True
            self._failed_starts = 0

    def _count_failed_start(self, w: _Worker) -> None:
        self._failed_starts += 1
        if self._failed_starts >= _MAX_FAILED_STARTS:
            raise RuntimeError(
                f"grading processes keep dying before they start (exit code "
                f"{w.process.exitcode}): check that math-verify imports, and that your script "
                f"can be re-imported by them (they are spawned): put the code that grades under "
                f"`if __name__ == '__main__':` (see docs/rewards.md, Limits)")

    def close(self) -> None:
        """Stop the grading processes. Idempotent; `grade` afterwards raises."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def grade(self, responses, golds, timeout: float = 5.0) -> list[GradeResult]:
        """Grade `responses[i]` against `golds[i]`; one GradeResult per item, in order.

        `timeout` (seconds, > 0) bounds each item once it starts; a batch of n items on p
        processes takes at most about ceil(n / p) * (timeout + kill_grace) plus worker restarts.
        Raises only for caller errors (lengths, gold types, closed grader), never on model text.
        """
        responses, golds = list(responses), list(golds)
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds: pass one gold per response")
        for i, g in enumerate(golds):
            if not isinstance(g, str) or not g.strip():
                raise ValueError(f"gold {i} is {g!r}: every gold must be a non-empty string")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        texts = [_as_text(r) for r in responses]
        with self._lock:
            if self._closed:
                raise RuntimeError("this Grader is closed: create a new one")
            results: list[GradeResult | None] = [None] * len(texts)
            todo = []
            for i, t in enumerate(texts):
                if t is None:
                    results[i] = GradeResult(0.0, "error", None,
                                             f"response is a {type(responses[i]).__name__}, not text")
                else:
                    todo.append(i)
            if self.processes == 0:
                for i in todo:
                    results[i] = grade_guarded(texts[i], golds[i], timeout, self.use_math_verify)
            else:
                self._run(todo, texts, golds, timeout, results)
            return results

    def _replace(self, w: _Worker) -> None:
        """Kill `w` (if still alive) and start a fresh worker in its slot."""
        w.stop(kill=True)
        self._workers[self._workers.index(w)] = self._new_worker()

    def _run(self, todo, texts, golds, timeout, results) -> None:
        queue = collections.deque(todo)
        attempts = collections.Counter()

        def worker_died(w: _Worker) -> None:
            # A started worker died (killed from outside, out of memory): retry its item once.
            if w.task is not None:
                attempts[w.task] += 1
                if attempts[w.task] >= 2:
                    results[w.task] = GradeResult(0.0, "error", None, "grading process died twice")
                else:
                    queue.appendleft(w.task)
            self._replace(w)

        while queue or any(w.task is not None for w in self._workers):
            for w in list(self._workers):
                if queue and w.ready and w.task is None:
                    i = queue.popleft()
                    try:
                        w.conn.send((i, texts[i], golds[i], timeout))
                    except OSError:
                        queue.appendleft(i)
                        worker_died(w)
                        continue
                    w.task, w.deadline = i, time.monotonic() + timeout + self.kill_grace
            busy = [w.deadline for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(busy) - time.monotonic()) if busy else 1.0
            waitables = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
            ready = set(multiprocessing.connection.wait(waitables, timeout=wait_s))
            for w in list(self._workers):
                if not w.ready and (w.conn in ready or w.process.sentinel in ready):
                    self._receive_ready(w)
                elif w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        worker_died(w)
                        continue
                    index, result = msg
                    if index == w.task:
                        results[index] = result
                        w.task = None
                elif w.process.sentinel in ready:
                    worker_died(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = GradeResult(0.0, "timeout", None)
                    w.task = None
                    self._replace(w)


def _as_text(response) -> str | None:
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", "replace")
    return None
