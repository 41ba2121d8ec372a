"""RL post-training: `python -m sspo_jax.train [--config=configs/FILE.py[:preset]] [--workdir=DIR]`.

With no --config the CPU demo runs (sspo_jax/run_config.py: get_config). Rerunning the same
command on the same workdir resumes from its newest checkpoint. One RL step:

  prompts -> n samples each (sampler) -> rewards (grading pool) -> group advantages, segment ids
  and clip bounds on the whole batch -> ppo_mini_batches x ppo_epochs optimizer steps, each
  accumulated over micro-batches -> metrics -> maybe evaluate / checkpoint.
"""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)


from absl import app, flags

from sspo_jax import parallel
from sspo_jax.train.loop import train_and_evaluate


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_from_flags()
    cli.quiet_logs()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CHANGE.value)


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag()
    _WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints, metrics and plots go.")
    _ALLOW_CHANGE = flags.DEFINE_bool(
        "allow_config_change", False, "Resume a run whose config differs only in safe fields "
        "(steps, eval.*, checkpoint.every/keep/async_save, compile_cache.*); other changes are refused.")
    parallel.define_flags()
    app.run(cli.one_line_errors(main))
