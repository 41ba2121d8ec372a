"""The headline: the default CPU demo (`python -m sspo_jax.train`, no arguments) gains at least
10 points of held-out accuracy over its warm start. About a minute on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_default_demo_gains_ten_points(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.train", f"--workdir={tmp_path}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert rows[-1]["step"] == 60 and len(evals) == 7
    assert evals[-1] - evals[0] >= 0.10, evals
