"""Running the project's commands as separate JAX processes (gloo CPU collectives), as on a pod:
each process sees `devices` fake CPU devices and joins a coordinator on a free local port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(module: str, args: list[str], devices: int, log, process: tuple[int, int, int] | None = None):
    """`python -m module args` with `devices` CPU devices; `process` = (port, count, index) joins
    a multi-process run. Output goes to the file `log`."""
    extra = [] if process is None else [f"--coordinator_address=localhost:{process[0]}",
                                         f"--num_processes={process[1]}", f"--process_id={process[2]}"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", module, *args, *extra], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start_processes(module: str, args: list[str], count: int, devices: int, logs) -> list:
    """The same command as `count` processes of one run, `devices` CPU devices each."""
    port = free_port()
    return [start(module, args, devices, logs[i], (port, count, i)) for i in range(count)]


def finish(procs, logs, timeout: float = 1200) -> None:
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=timeout) == 0, open(log).read()[-4000:]


def metric_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Comparing the metrics of two runs of one config spread differently over processes: counts
# and discrete outcomes must be identical; float statistics differ only by the order in which
# the collectives add (gloo between processes, in-process within one).
TIMING = ("time/", "tokens_per_s", "train_tokens_per_s")
EXACT = ("step", "reward/", "response/", "grading/", "groups/", "eval/", "skipped_updates",
         "bad_steps_total", "clip_frac")


def assert_same_metrics(rows_a, rows_b, steps, rel: float, abs_: float) -> None:
    """Rows of `steps`: the same keys, EXACT ones (and non-floats) equal, floats within
    rel / abs_, timings ignored."""
    for a, b in zip(rows_a, rows_b):
        if a["step"] not in steps:
            continue
        assert a["step"] == b["step"] and set(a) == set(b), a["step"]
        for key, value in a.items():
            if key.startswith(TIMING):
                continue
            if key.startswith(EXACT) or not isinstance(value, float):
                assert b[key] == value, (a["step"], key)
            else:
                assert b[key] == pytest.approx(value, rel=rel, abs=abs_), (a["step"], key, value, b[key])


def config_with(overrides: dict, config=None):
    """The demo config (or `config`) with `--config.KEY=VALUE`-style overrides applied."""
    from sspo_jax import run_config
    c = run_config.get_config() if config is None else config
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


def restored_policy(config, workdir):
    """(step, model): the newest checkpoint of `workdir`, restored in this process (its 8
    devices) on the config's mesh."""
    from sspo_jax import parallel, specs
    from sspo_jax.train.setup import policy_skeleton, restore_params
    _, model = policy_skeleton(specs.parse(config).model, parallel.mesh_from_config(config.mesh))
    return restore_params(model, os.path.join(workdir, "checkpoints")), model
