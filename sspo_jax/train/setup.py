"""What a run starts from: the policy and its tokenizer, the task's rows, and the run record."""
from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp
from flax import nnx

from sspo_jax import model as model_lib
from sspo_jax import parallel
from sspo_jax.specs import DataSpec, EvalSpec, ModelSpec, OptimizerSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_policy(m: ModelSpec, seed: int, mesh=None):
    """(tokenizer, model): a Hugging Face checkpoint, or a random tiny Qwen2 with the project's
    own synthetic-task tokenizer (the CPU demo).

    A Hugging Face checkpoint is loaded straight onto `mesh` (each device reads its shards); the
    tiny model is built on one device (every process the same, from the seed) and laid out on
    the mesh by the caller (`parallel.shard_model`), after the warm start if there is one."""
    dtype, param_dtype = DTYPES[m.dtype], DTYPES[m.param_dtype]
    tokenizer = _tokenizer(m)
    if m.hf_dir:
        model = model_lib.from_pretrained(_local_checkpoint(m.hf_dir), dtype=dtype,
                                          param_dtype=param_dtype, remat=m.remat, mesh=mesh,
                                          attention=m.attention)
        return tokenizer, model
    model = model_lib.Qwen2ForCausalLM(_model_config(m, tokenizer), rngs=nnx.Rngs(seed),
                                       dtype=dtype, param_dtype=param_dtype, remat=m.remat,
                                       attention=m.attention, platform=_platform(mesh))
    return tokenizer, model


def policy_skeleton(m: ModelSpec, mesh):
    """(tokenizer, model) like `build_policy`, but the model holds no data: every parameter is a
    `jax.ShapeDtypeStruct` with its sharding on `mesh`, ready to be filled from a checkpoint
    (`restore_params`, or the trainer's resume) without loading or initialising weights first."""
    dtype, param_dtype = DTYPES[m.dtype], DTYPES[m.param_dtype]
    tokenizer = _tokenizer(m, weights=False)
    cfg = (model_lib.Qwen2Config.from_hf(_local_checkpoint(m.hf_dir, weights=False)) if m.hf_dir
           else _model_config(m, tokenizer))
    return tokenizer, model_lib.abstract_model(cfg, mesh=mesh, dtype=dtype, param_dtype=param_dtype,
                                               remat=m.remat, attention=m.attention)


def _platform(mesh) -> str | None:
    """The platform of the mesh's devices (the model's backend decision), None without a mesh."""
    return None if mesh is None else model_lib.platform_of(mesh)


def _tokenizer(m: ModelSpec, weights: bool = True):
    from sspo_jax.data.tokenizer import build_tokenizer, load_tokenizer
    if m.tokenizer_dir or m.hf_dir:
        return load_tokenizer(m.tokenizer_dir or _local_checkpoint(m.hf_dir, weights))
    return build_tokenizer()


def _model_config(m: ModelSpec, tokenizer):
    """The tiny demo model's config (`model.tiny`, vocabulary from the tokenizer)."""
    tiny = dict(m.tiny)
    heads = tiny["num_attention_heads"]
    return model_lib.Qwen2Config(vocab_size=len(tokenizer), head_dim=tiny["hidden_size"] // heads,
                                 **tiny)


def run_optimizer(o: OptimizerSpec, total_steps: int):
    """The run's optax optimizer over `total_steps` updates (`RunSpec.optimizer_steps`); its
    state tree is part of every checkpoint."""
    from sspo_jax.train.update import make_optimizer
    return make_optimizer(o.lr, schedule=o.schedule, warmup_steps=o.warmup_steps,
                          total_steps=total_steps, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                          eps=o.eps, grad_clip=o.grad_clip)


def restore_params(model, checkpoint_dir: str, step: int | None = None) -> int:
    """Fills `model` (a `policy_skeleton`, or a model whose arrays give the target shardings)
    with the policy parameters of a training checkpoint; returns the step. Only the `params`
    item is read: no optimizer state is built or loaded."""
    from sspo_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(checkpoint_dir, save_every=1, create=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}: train first, or evaluate "
                                    f"a Hugging Face directory with --config.model.hf_dir")
        wanted = {"params": parallel.abstract(nnx.state(model))}
        if step is None:  # the newest that restores
            step, items, _ = ckpt.restore_latest(wanted)
        else:
            items, _ = ckpt.restore(wanted, step=step)
    finally:
        ckpt.close()
    nnx.update(model, items["params"])
    return step


def abstract_opt_state(optimizer, params):
    """The optimizer state `update.init_optimizer(optimizer, params)` would make, as
    `jax.ShapeDtypeStruct`s with its shardings, computed without allocating it (`params` may be
    abstract): what a resumed run restores the saved state into."""
    from sspo_jax.train.update import optimizer_state_shardings
    shapes = jax.eval_shape(optimizer.init, parallel.abstract(params))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        optimizer_state_shardings(optimizer, params))


def _local_checkpoint(name: str, weights: bool = True) -> str:
    """A local directory as is; an `org/name` hub id is downloaded (cached) first, without the
    weight files when only the config and tokenizer are needed (`weights=False`)."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.txt", "*.model"] + (["*.safetensors"] if weights else [])
    return snapshot_download(name, allow_patterns=patterns)


def eval_rows(e: EvalSpec, d: DataSpec, seed: int, name: str) -> list[dict]:
    """Rows of benchmark `name`; `synthetic` is the synthetic task's held-out split (training's
    periodic evaluation and `sspo_jax.evaluate` both read their rows here)."""
    if name == "synthetic":
        from sspo_jax.data import synthetic
        return synthetic.generate(e.num_prompts, split="test", levels=d.synthetic_levels,
                                  seed=seed + 1)
    from sspo_jax.data.benchmarks import load_benchmark
    return load_benchmark(name, e.data_dir)


def load_task(d: DataSpec, e: EvalSpec, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(training rows, evaluation rows, data counts).

    Synthetic: the task's train split and held-out split. A user's own data (jsonl, parquet or a
    hub dataset, read with `data.problem_field` / `data.answer_field`): all its rows, skipped
    rows counted; evaluated on `eval.benchmarks`, or, when there are none, on a held-out split of
    the same data (`eval.num_prompts` rows, at most a fifth of them, drawn with the seed and
    taken out of training). `counts` has the rows read, skipped (by reason) and held out."""
    if d.source == "synthetic":
        from sspo_jax.data import synthetic
        train = synthetic.generate(d.synthetic_train_size, split="train", levels=d.synthetic_levels,
                                   seed=seed)
        return train, eval_rows(e, d, seed, "synthetic"), {"rows_read": len(train)}
    import numpy as np

    from sspo_jax.data.sources import FieldMap, load_rows
    source = d.path if d.source != "hub" else f"hf:{d.path}"
    # The default field names keep their usual alternatives ("question" for GSM8K-style files).
    fields = FieldMap(problem=FieldMap().problem if d.problem_field == "problem" else (d.problem_field,),
                      answer=FieldMap().answer if d.answer_field == "answer" else (d.answer_field,))
    rows, counts = load_rows(source, fields, strict=d.strict)
    if e.benchmarks:
        held = [row for name in e.benchmarks for row in eval_rows(e, d, seed, name)]
        return rows, (held[: e.num_prompts] if e.num_prompts else held), counts
    n_eval = min(e.num_prompts or len(rows), len(rows) // 5)
    if n_eval < 1:
        raise ValueError(f"data.path={d.path!r} has {len(rows)} usable rows: too few to hold some out "
                         f"for evaluation (a fifth of them); name eval.benchmarks instead")
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    held = set(order[:n_eval].tolist())
    counts["held_out_for_eval"] = n_eval
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held], counts)


def write_run_info(workdir: str, config, mesh=None) -> None:
    """The config and the software/hardware it ran on, for reproducing the run (process 0)."""
    if jax.process_index() != 0:
        return
    import flax
    import optax
    import orbax.checkpoint
    info = {
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                     "flax": flax.__version__, "optax": optax.__version__,
                     "orbax-checkpoint": orbax.checkpoint.__version__},
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        "mesh": dict(mesh.shape) if mesh is not None else None,
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)
