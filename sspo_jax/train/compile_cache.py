"""The persistent XLA compilation cache: a resumed or repeated run reads its compiled programs
from disk instead of compiling them again (a preempted TPU run would otherwise recompile every
program of the step before its first update).

Config block `compile_cache`: `dir` ("" = WORKDIR/compile_cache, "none" = off, or any path or
URL jax can write, e.g. gs://BUCKET/compile_cache) and `min_compile_secs` (programs that compile
faster are not worth an entry). JAX writes entries from process 0 only, so on several hosts the
directory must be one they all read (a bucket); with a per-host local directory only host 0
gains.
"""
from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache.compilation_cache import reset_cache

# JAX's monitoring events: every compilation that consults the cache, and those it served.
REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
HIT = "/jax/compilation_cache/cache_hits"


def directory(cache_cfg, workdir: str) -> str | None:
    """The cache directory the config asks for, or None when it is off."""
    d = cache_cfg.dir
    if d == "none":
        return None
    return d or os.path.join(workdir, "compile_cache")


class CompileCache:
    """Points this process's compilation cache at the configured directory and counts what it
    served (`hits`) and what had to be compiled (`misses`) until `close()`, which puts the
    previous settings back (a library caller, or a test process, keeps its own).

    As a context manager (`with CompileCache(...):`) it closes on exit and, after a command that
    ran to the end, prints `summary()` on process 0."""

    def __init__(self, cache_cfg, workdir: str):
        self.dir = directory(cache_cfg, workdir)
        self.hits = self.requests = 0
        self._previous = None
        if self.dir is None:
            return
        if "://" not in self.dir:
            self.dir = os.path.abspath(self.dir)
        self._previous = (jax.config.jax_compilation_cache_dir,
                          jax.config.jax_persistent_cache_min_compile_time_secs)
        self._apply(self.dir, float(cache_cfg.min_compile_secs))
        jax.monitoring.register_event_listener(self._count)

    @staticmethod
    def _apply(path, min_secs):
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
        # JAX decides once per process whether a cache is in use (at its first compilation):
        # make it decide again with these settings.
        reset_cache()

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    def _count(self, event: str, **_):
        if event == HIT:
            self.hits += 1
        elif event == REQUEST:
            self.requests += 1

    def summary(self) -> str:
        """One line for the console, e.g. `compilation cache DIR: 12 programs read, 3 compiled`."""
        if self.dir is None:
            return "compilation cache off (compile_cache.dir=none)"
        note = ""
        if jax.process_count() > 1 and "://" not in self.dir:
            note = " (a local directory: only process 0 writes it; give hosts a shared compile_cache.dir)"
        return f"compilation cache {self.dir}: {self.hits} programs read, {self.misses} compiled{note}"

    def __enter__(self) -> "CompileCache":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close()
        if exc_type is None and jax.process_index() == 0:
            print(self.summary(), flush=True)

    def close(self) -> None:
        if self._previous is not None:
            jax.monitoring.unregister_event_listener(self._count)
            self._apply(*self._previous)
            self._previous = None
