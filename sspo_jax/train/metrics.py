"""Training metrics out: a console progress line, `metrics.jsonl`, TensorBoard, and PNG plots.

Only one process (process 0) writes; the others construct a writer with `enabled=False`.
`metrics.jsonl` holds one JSON object per step. When a run resumes from a checkpoint at step s,
lines after s (written between that checkpoint and the crash) are dropped, so the file of a
resumed run reads exactly like that of an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable, Mapping

JSONL_NAME = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON line (and TensorBoard scalars) per step to `workdir`."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None,
                 enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), JSONL_NAME)
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        if resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            _truncate_after(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value):
    """numpy / jax scalars -> Python numbers, so json can write them."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    kept = [row for row in read_jsonl(path) if row["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a metrics file (a torn last line from a crash is ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def progress_line(step: int, total_steps: int, metrics: Mapping[str, float], started: float,
                  first_step: int = 0, keys: Iterable[tuple[str, str, str]] = ()) -> str:
    """One console line: step, the chosen metrics, and the ETA from the mean step time so far.

    `keys` are (metric name, short label, format) triples; missing metrics are left out.
    """
    parts = [f"step {step}/{total_steps}"]
    for name, label, fmt in keys:
        if name in metrics and metrics[name] is not None:
            parts.append(f"{label} {format(metrics[name], fmt)}")
    done = step - first_step
    if done > 0:
        per_step = (time.time() - started) / done
        parts.append(f"eta {_duration(per_step * (total_steps - step))}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 4 significant digits."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(runs: Mapping[str, list[dict]], keys: list[str], out_png: str | os.PathLike,
                title: str = "") -> None:
    """One subplot per metric key, one line per run (runs: label -> jsonl rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.5 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 and ax.get_lines():
            ax.legend()
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
