"""metrics.jsonl, TensorBoard events, resume truncation, console line and plots."""
import glob
import math
import os
import time

import numpy as np

from sspo_jax.train import metrics as M


def test_jsonl_rows_and_tensorboard(tmp_path):
    w = M.MetricsWriter(tmp_path)
    w.write(0, {"eval/accuracy": np.float32(0.25)})
    w.write(1, {"reward/mean": 0.5, "loss": float("nan"), "truncated": True})
    w.close()
    rows = M.read_jsonl(tmp_path / M.JSONL_NAME)
    assert rows[0] == {"step": 0, "eval/accuracy": 0.25}
    assert rows[1]["reward/mean"] == 0.5 and rows[1]["truncated"] == 1
    assert math.isnan(rows[1]["loss"])
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))


def test_resume_drops_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    w = M.MetricsWriter(tmp_path)
    for step in range(1, 6):
        w.write(step, {"x": step})
    w.close()
    with open(tmp_path / M.JSONL_NAME, "a") as f:
        f.write('{"step": 6, "x"')  # a crash mid-write
    w = M.MetricsWriter(tmp_path, resume_step=3)
    w.write(4, {"x": 40})
    w.close()
    assert [(r["step"], r["x"]) for r in M.read_jsonl(tmp_path / M.JSONL_NAME)] == [
        (1, 1), (2, 2), (3, 3), (4, 40)]
    # A fresh (non-resumed) run starts a new file.
    M.MetricsWriter(tmp_path, tensorboard=False).close()
    assert not os.path.exists(tmp_path / M.JSONL_NAME)


def test_disabled_writer_writes_nothing(tmp_path):
    w = M.MetricsWriter(tmp_path / "sub", enabled=False)
    w.write(1, {"x": 1})
    w.close()
    assert not os.path.exists(tmp_path / "sub")


def test_progress_line_and_table():
    line = M.progress_line(5, 10, {"reward/mean": 0.123456, "entropy": None}, time.time() - 50,
                           keys=[("reward/mean", "reward", ".3f"), ("entropy", "ent", ".2f"),
                                 ("missing", "m", ".1f")])
    assert line.startswith("step 5/10 | reward 0.123 | eta 0m50s")
    table = M.markdown_table(["run", "acc"], [["sspo", 0.51234], ["grpo", 1]])
    assert table.splitlines() == ["| run | acc |", "|---|---|", "| sspo | 0.5123 |", "| grpo | 1 |"]


def test_plot_curves_writes_a_png(tmp_path):
    runs = {"a": [{"step": i, "r": i * 0.1} for i in range(5)],
            "b": [{"step": i, "r": 0.2} for i in range(5)]}
    out = tmp_path / "p.png"
    M.plot_curves(runs, ["r", "missing"], out, title="t")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
