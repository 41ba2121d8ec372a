"""The comparison runs every objective from one warm start."""
import os
import subprocess
import sys

import pytest
from test_train import TINY


@pytest.mark.slow
def test_objectives_share_the_warm_start_and_write_one_table(tmp_path):
    # keep=1: the first run ends with only its last checkpoint, plus the always-kept step 0.
    overrides = {**TINY, "steps": 2, "eval.every": 2, "checkpoint.keep": 1}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.compare", f"--workdir={tmp_path}",
                           "--objectives=grpo,sspo", *[f"--config.{k}={v}" for k, v in overrides.items()]],
                          cwd=repo, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open(tmp_path / "compare.md").read()
    assert "| grpo |" in table and "| sspo |" in table
    assert open(tmp_path / "compare.png", "rb").read(4) == b"\x89PNG"
    from sspo_jax.train.metrics import read_jsonl
    grpo = {r["step"]: r for r in read_jsonl(tmp_path / "grpo" / "metrics.jsonl")}
    sspo = {r["step"]: r for r in read_jsonl(tmp_path / "sspo" / "metrics.jsonl")}
    assert sorted(sspo) == [0, 1, 2]
    assert sspo[0] == grpo[0]  # the same starting policy, evaluated once
    # Step 1 samples from identical weights, data and RNG: identical rollouts and rewards...
    for key in ("reward/mean", "response/length_mean", "groups/zero_variance_frac"):
        assert sspo[1][key] == grpo[1][key], key
    # ...while the objectives differ (subsentence vs token ratios and clip ranges).
    assert sspo[1]["clip_eps_high_mean"] != grpo[1]["clip_eps_high_mean"]


def test_means_standard_errors_and_paired_intervals_by_hand():
    from sspo_jax import compare
    mean, se = compare.mean_se([0.7, 0.8, 0.9])
    assert mean == pytest.approx(0.8) and se == pytest.approx(0.1 / 3 ** 0.5)
    # Differences 0.1, 0.1, 0.1: no spread, an interval of zero width away from 0.
    assert compare.paired_ci([0.8, 0.9, 1.0], [0.7, 0.8, 0.9]) == pytest.approx((0.1, 0.1, 0.1))
    # Differences +0.1, -0.1: mean 0, se 0.1, t(1 df) = 12.706.
    mean, lo, hi = compare.paired_ci([0.8, 0.7], [0.7, 0.8])
    assert mean == pytest.approx(0.0) and (lo, hi) == pytest.approx((-1.2706, 1.2706))
    rows = [{"step": 0, "eval/accuracy": 0.5, "entropy_mean": float("nan")},
            {"step": 1, "grad_norm": 1.0, "entropy_mean": 2.0},
            {"step": 2, "grad_norm": 5.0, "entropy_mean": 1.0, "eval/accuracy": 0.7},
            {"step": 3, "grad_norm": 1.0, "entropy_mean": 0.5},
            {"step": 4, "eval/accuracy": 0.6, "grad_norm": 2.0}]
    s = compare.stability(rows)
    assert s["largest_eval_drop"] == pytest.approx(0.1)
    assert s["eval_auc"] == pytest.approx((2 * 0.6 + 2 * 0.65) / 4)
    assert s["grad_norm_spike"] == pytest.approx(5.0 / 1.5) and s["entropy_ratio"] == pytest.approx(0.25)


@pytest.mark.slow
def test_two_seeds_give_finite_error_bars_and_paired_intervals(tmp_path):
    overrides = {**TINY, "steps": 2, "eval.every": 1, "checkpoint.keep": 1}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.compare", f"--workdir={tmp_path}", "--seeds=2",
                           "--objectives=grpo,sspo", *[f"--config.{k}={v}" for k, v in overrides.items()]],
                          cwd=repo, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seed = int(TINY.get("seed", 0))
    assert sorted(os.listdir(tmp_path / f"seed{seed}")) == ["grpo", "sspo"]
    assert (tmp_path / f"seed{seed + 1}" / "sspo" / "metrics.jsonl").exists()
    summary = open(tmp_path / "summary.md").read()
    for name in ("grpo", "sspo"):
        line = next(row for row in summary.splitlines() if row.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        mean, se = (float(x) for x in cells[0].split(" +- "))  # eval_accuracy_end
        assert 0 <= mean <= 1 and se >= 0 and se == se  # finite (not nan)
    assert "| grpo - sspo |" in summary and "95% CI" in summary
    for png in ("compare.png", "clipping.png"):
        assert open(tmp_path / png, "rb").read(4) == b"\x89PNG"
