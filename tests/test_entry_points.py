"""Every command-line program starts: flags parse, imports resolve (e.g. no flag defined twice)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,flag", [
    ("sspo_jax.train", "--workdir"), ("sspo_jax.evaluate", "--step"),
    ("sspo_jax.compare", "--objectives"), ("sspo_jax.data.prepare_math", "--levels"),
])
def test_program_prints_its_help(module, flag):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    # absl exits with status 1 after printing help, so judge by the output.
    assert "Traceback" not in out, out[-3000:]
    assert flag in out
    if module != "sspo_jax.data.prepare_math":  # the commands that take --config say how to use it
        assert "--config.BLOCK.FIELD=VALUE" in out and "presets: grpo" in out, out[-3000:]


@pytest.mark.parametrize("module,args,message", [
    ("sspo_jax.train", ["--config.rollout.top_k=-3"], "error: bad config: rollout.top_k=-3"),
    ("sspo_jax.evaluate", ["--step=3"], "error: --step=3 given but"),
    ("sspo_jax.export", ["--out=/tmp/never"], "error: no checkpoint in"),
])
def test_a_user_error_is_one_line_not_a_traceback(tmp_path, module, args, message):
    proc = subprocess.run([sys.executable, "-m", module, f"--workdir={tmp_path}", *args],
                          capture_output=True, text=True, timeout=300)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(out) < 30 and any(line.startswith(message) for line in out), out
