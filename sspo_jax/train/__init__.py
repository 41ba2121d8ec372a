"""The trainer: the RL loop (loop.py; `python -m sspo_jax.train` is __main__.py), the update step,
warm start, setup (policy, task, run record), evaluation, grading across hosts, checkpoints,
the compilation cache, metrics and reports."""
