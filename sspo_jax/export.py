"""A training checkpoint out as a Hugging Face model directory (config, safetensors, tokenizer).

    python -m sspo_jax.export --config=configs/FILE.py[:preset] --workdir=DIR --out=HF_DIR
        [--step=N] [--dtype=bfloat16]

loads the policy of checkpoint step N (default: the newest) of the run in DIR (or
`checkpoint.dir`) onto the config's mesh and writes it with `model.save_pretrained`, so
`transformers`, vLLM or another evaluation harness can load the trained model. With several
hosts run the same command on each (the multi-process flags of `sspo_jax.train`); process 0
writes the files.
"""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)

import os

from absl import app, flags

from sspo_jax import parallel


def export(config, workdir: str, out_dir: str, step: int | None = None,
           dtype: str | None = None) -> int:
    """Writes the checkpoint's policy (and tokenizer) to `out_dir`; returns the step exported."""
    import jax.numpy as jnp

    from sspo_jax import model as model_lib
    from sspo_jax import parallel, run_config, specs
    from sspo_jax.generate import sampler
    from sspo_jax.train import run_record
    from sspo_jax.train.compile_cache import CompileCache
    from sspo_jax.train.setup import policy_skeleton, restore_params

    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype!r}: choose float32, bfloat16 or float16")
    run_config.check_workdir(workdir)
    spec = specs.parse(config, training_data=False)
    run_record.check_reader(workdir, config, "export")
    mesh = parallel.mesh_from_config(spec.mesh)
    with CompileCache(spec.compile_cache, workdir):  # the all-gathers of the weights compile
        tokenizer, model = policy_skeleton(spec.model, mesh)  # filled with the checkpoint's parameters only
        run_record.check_tokenizer(workdir, tokenizer, record=False)
        step = restore_params(model, run_config.checkpoint_dir(spec, workdir), step)
        # Where the sampler stops, the tokenizer's own EOS first (config.json names one id).
        eos = sorted(sampler.default_eos_ids(tokenizer), key=lambda e: e != tokenizer.eos_token_id)
        model_lib.save_pretrained(model, out_dir, dtype=None if dtype is None else jnp.dtype(dtype),
                                  eos_token_ids=eos, pad_token_id=_pad_id(tokenizer, eos))
    if parallel.is_chief():
        tokenizer.save_pretrained(out_dir)
        print(f"exported the policy of step {step} to {os.path.abspath(out_dir)}", flush=True)
    return step


def _pad_id(tokenizer, eos) -> int:
    """transformers pads finished rows with the pad id: the tokenizer's own (Qwen's is an EOS,
    which transformers allows), else the first EOS; never a visible token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_from_flags()
    cli.quiet_logs()
    export(_CONFIG.value, _WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value)


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag()
    _WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The run directory.")
    _OUT = flags.DEFINE_string("out", None, "Where to write the Hugging Face model directory.",
                               required=True)
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: newest).")
    _DTYPE = flags.DEFINE_string("dtype", None, "On-disk dtype (default: the parameter dtype).")
    parallel.define_flags()
    app.run(cli.one_line_errors(main))
