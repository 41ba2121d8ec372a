"""Running the project's commands as separate JAX processes (gloo CPU collectives), as on a pod:
each process sees `devices` fake CPU devices and joins a coordinator on a free local port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
