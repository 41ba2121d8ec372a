"""The import direction of the house (docs/design.md): commands -> train -> (generate, rl,
rewards, data) -> model -> parallel. Checked in a fresh interpreter, by what importing a package
pulls in."""
import subprocess
import sys

import pytest

# package -> project packages it must not import (directly or through anything it imports)
FORBIDDEN = {
    "sspo_jax.rl": ("sspo_jax.model", "sspo_jax.generate", "sspo_jax.train", "sspo_jax.rewards"),
    "sspo_jax.generate": ("sspo_jax.rl", "sspo_jax.train", "sspo_jax.rewards"),
    "sspo_jax.model": ("sspo_jax.rl", "sspo_jax.generate", "sspo_jax.train", "sspo_jax.rewards",
                       "sspo_jax.data"),
    "sspo_jax.parallel": ("sspo_jax.model", "sspo_jax.rl", "sspo_jax.generate", "sspo_jax.train",
                          "sspo_jax.rewards"),
    "sspo_jax.rewards": ("jax", "sspo_jax.model", "sspo_jax.rl", "sspo_jax.train"),
}
MODULES = {
    "sspo_jax.rl": "sspo_jax.rl.losses, sspo_jax.rl.loss_metrics, sspo_jax.rl.advantages, "
                   "sspo_jax.rl.segments, sspo_jax.rl.logprobs, sspo_jax.rl.train_batch, sspo_jax.rl.packing",
    "sspo_jax.generate": "sspo_jax.generate.sampler, sspo_jax.generate.filters",
    "sspo_jax.model": "sspo_jax.model",
    "sspo_jax.parallel": "sspo_jax.parallel",
    "sspo_jax.rewards": "sspo_jax.rewards",
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package):
    code = (f"import sys, {MODULES[package]}\n"
            f"bad = sorted(m for m in sys.modules for f in {FORBIDDEN[package]!r} "
            f"if m == f or m.startswith(f + '.'))\n"
            f"assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
