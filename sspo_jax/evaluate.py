"""`python -m sspo_jax.evaluate --config=configs/FILE.py --workdir=DIR [--step=N]`

evaluates the newest checkpoint in DIR/checkpoints (or, when there is none, the configured
Hugging Face model `model.hf_dir`) on `eval.benchmarks` (default: the synthetic held-out split)
and writes DIR/eval/<benchmark>.json (every response, extracted answer, score, reason),
DIR/eval/summary.md and DIR/eval/summary.json (sspo_jax/train/evaluation.py does the work).
"""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)


from absl import app, flags

from sspo_jax import parallel
from sspo_jax.train.evaluation import run_evaluation


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_from_flags()
    cli.quiet_logs()
    run_evaluation(_CONFIG.value, _WORKDIR.value, _STEP.value)


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag()
    _WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Run directory holding checkpoints/.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: newest).")
    parallel.define_flags()
    app.run(cli.one_line_errors(main))
