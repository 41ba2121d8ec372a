"""The CPU demo (the default of `python -m sspo_jax.train`): a tiny Qwen2 on the synthetic
arithmetic task, supervised warm start, then RL. `--config=configs/demo.py:grpo` picks the loss.

The settings live in sspo_jax/run_config.py (get_config) so that the installed package has the
demo built in; this file is the path users pass on the command line.
"""
from sspo_jax.run_config import get_config  # noqa: F401
