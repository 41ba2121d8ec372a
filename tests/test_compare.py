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
