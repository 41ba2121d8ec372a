"""What every command (train, evaluate, export, compare, plan) does first, and their flag help.

Import it before anything that imports transformers: the environment below is read once, at
transformers' import ("PyTorch was not found" is advice for model users; this project runs its
models in JAX and needs torch only as the tests' reference).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONFIG_HELP = ("Config file, configs/FILE.py[:PRESET] (presets: grpo, dapo, dr_grpo, gspo, sspo, "
               "sspo_fixed); default: the CPU demo. Any field can be overridden: "
               "--config.BLOCK.FIELD=VALUE, e.g. --config.steps=100 --config.optimizer.lr=1e-6 "
               "(fields and defaults: sspo_jax/run_config.py).")


def define_config_flag(help_text: str = CONFIG_HELP, lock_config: bool = True):
    """The `--config` flag every command takes; its default is the CPU demo (run_config.py)."""
    from absl import flags
    from ml_collections import config_flags
    holder = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_config.py"),
        help_text, lock_config=lock_config)
    # Defined in this module, so --help (the main module's flags only) would leave it out, and
    # with it the overrides and presets its help text names. absl names the main module by
    # sys.argv[0].
    import sys
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])
    return holder


def one_line_errors(main):
    """`main` with a user's errors (a bad config, a refused resume, a missing file) printed as
    one `error: ...` line and exit status 1 instead of a traceback; with --verbosity given, the
    traceback is kept for debugging."""
    import functools
    import sys

    @functools.wraps(main)
    def wrapped(argv):
        from absl import flags
        try:
            return main(argv)
        except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
            if flags.FLAGS["verbosity"].present:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def quiet_logs() -> None:
    """absl and orbax log every save and restore at INFO: show warnings and errors only, unless
    --verbosity is given."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
