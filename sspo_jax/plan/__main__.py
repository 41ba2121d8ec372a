"""`python -m sspo_jax.plan --config=configs/FILE.py[:preset] --slice=v5e-8 [--noitems]`: the
memory plan and cost model of a training config on a TPU slice (sspo_jax/plan: memory.py, costs.py)."""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)

import sys

from absl import app, flags
from ml_collections import config_flags

from sspo_jax.plan import parse_slice, render


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config_flag = flags.FLAGS["config"]
    name = config_flag.config_filename
    overrides = config_flags.get_override_values(config_flag)
    if overrides:
        name += " " + " ".join(f"{k}={v}" for k, v in sorted(_flatten(overrides).items()))
    try:
        text = render(config_flag.value, name, parse_slice(_SLICE.value), _ITEMS.value)
    except ValueError as e:  # a bad slice name, mesh or model: one line, no traceback
        sys.exit(f"error: {e}")
    print(text, end="")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


if __name__ == "__main__":
    cli.define_config_flag()
    _SLICE = flags.DEFINE_string("slice", "v5p-8", "TPU accelerator type: v4-8, v5e-8 "
                                 "(v5litepod-8), v5p-8, v5p-64, v6e-8, ...")
    _ITEMS = flags.DEFINE_bool("items", True, "List every memory item (--noitems: phase totals only).")
    app.run(main)
