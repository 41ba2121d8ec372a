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
