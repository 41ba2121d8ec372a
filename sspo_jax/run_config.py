"""The training configuration: every field with its default, and the CPU demo built on it.

Config files in `configs/` start from `base_config()` and change what they need; any field can be
overridden on the command line (`--config.optimizer.lr=1e-6`). `sspo_jax.specs.parse` turns a
config into typed, validated specs. Fields whose default is "take it
from the loss preset" are placeholders (None until set), so the preset stays the single source of
the algorithm's defaults.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from sspo_jax.rl import losses

# LossConfig fields a config may override on top of the named preset, with their types (taken
# from LossConfig itself, so a new loss knob is a config knob). `delimiters` is a tuple of
# strings, which ml_collections cannot hold as a typed placeholder: the subsentence delimiters
# are a preset choice, changed in code (losses.preset(..., delimiters=...)).
_FIELD_TYPES = {"str": str, "float": float, "int": int, "bool": bool, "float | None": float}
LOSS_OVERRIDES = {f.name: _FIELD_TYPES[f.type] for f in dataclasses.fields(losses.LossConfig)
                  if f.name != "delimiters"}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 100                      # RL steps (one rollout batch each)

    # Policy model: a Hugging Face Qwen2/Qwen2.5 directory, or (hf_dir = "") a random tiny model.
    c.model = ml_collections.ConfigDict(dict(
        hf_dir="",
        tokenizer_dir="",              # "" = hf_dir's tokenizer, or the project's synthetic one
        dtype="float32",               # compute dtype: float32 | bfloat16
        param_dtype="float32",
        remat="none",                  # none | full | dots_saveable
        attention="auto",              # auto | xla | splash (TPU) | cudnn (GPU, bfloat16)
        tiny=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, tie_word_embeddings=True),
    ))

    # Training data: the synthetic arithmetic task, or local JSONL / Parquet files, or a hub name.
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",            # synthetic | jsonl | parquet | hub
        path="",
        problem_field="problem",
        answer_field="answer",
        template="qwen25-math-cot",    # qwen25-math-cot | plain | chat
        max_prompt_len=256,
        long_prompts="drop",           # drop | truncate (keep the end)
        strict=False,
        synthetic_levels=(1, 2),
        synthetic_train_size=20000,
    ))

    # Rollouts: prompts_per_step prompts x num_samples samples each.
    c.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=8,
        num_samples=8,
        max_new_tokens=64,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        old_logprobs="sampler",        # sampler | recompute
        grading_timeout=5.0,
        filter_zero_variance_groups=False,
        # Prompts per sampler call (0: all prompts_per_step at once). Smaller passes bound the
        # KV cache (rows x context x layers) at the cost of less batching; see docs/scaling.md.
        # Static engine only: the continuous one bounds it by `slots`.
        sample_batch_size=0,
        # static: all rows decode together until the longest ends; continuous: `slots` decode
        # slots per batch shard (0 = one per row) fed from a queue of all rows, a finished row
        # replaced at once, finished rows graded while decoding goes on (docs/design.md).
        engine="static",
        slots=0,
        chunk_steps=32,                # continuous: decode steps between the host's check-ins
    ))

    # The objective: a preset name plus optional overrides of its fields.
    c.loss = ml_collections.ConfigDict({"name": "sspo"})
    for field, kind in LOSS_OVERRIDES.items():
        c.loss[field] = config_dict.placeholder(kind)
    # Clip ranges by preset name, (eps_low, eps_high), for the bounds eps_low / eps_high leave unset:
    # a config tuned for its own response lengths (the demo) widens them per objective, and
    # `sspo_jax.compare`, which swaps loss.name, then gives each objective its own range.
    c.loss.clip_by_preset = ml_collections.ConfigDict()

    # The update: the rollout batch is split into ppo_mini_batches optimizer steps, for
    # ppo_epochs passes; each mini-batch is accumulated over micro-batches of micro_batch_size.
    c.train = ml_collections.ConfigDict(dict(
        ppo_mini_batches=4,
        ppo_epochs=1,
        micro_batch_size=16,
        logprob_chunk=128,             # tokens per chunk of the LM-head log-prob computation
        max_bad_steps=5,               # consecutive non-finite steps before the run stops
        # Padding-free update (sspo_jax/rl/packing.py): the sequences packed into rows of
        # prompt + max_new_tokens slots; micro-batches of max_tokens_per_micro_batch slots per
        # device (0: micro_batch_size rows' worth).
        packing=False,
        max_tokens_per_micro_batch=0,
    ))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
    ))

    # Reward shaping on top of correctness (sspo_jax/rewards/shaping.py): format_weight x [exactly
    # one \boxed{}], and DAPO's overlong penalty over the last overlong_buffer tokens of
    # rollout.max_new_tokens (0 = off). Off by default: the reward is the correctness score.
    c.reward = ml_collections.ConfigDict(dict(format_weight=0.0, overlong_buffer=0))
    # dir: "" = WORKDIR/checkpoints; or a URL orbax writes directly, e.g. gs://BUCKET/run (every
    # process of a multi-host run writes its shards there, and it outlives a preempted TPU VM).
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True, dir=""))
    # Persistent XLA compilation cache (sspo_jax/train/compile_cache.py): dir "" = WORKDIR/compile_cache,
    # "none" = off, or a path / URL; on several hosts a directory they all read (gs://...), since
    # only process 0 writes entries. Programs compiling faster than min_compile_secs are not cached.
    c.compile_cache = ml_collections.ConfigDict(dict(dir="", min_compile_secs=1.0))
    c.eval = ml_collections.ConfigDict(dict(
        every=25,                      # 0 = never; step 0 (the starting policy) is evaluated too
        num_prompts=256,
        max_new_tokens=64,
        benchmarks=(),                 # benchmark names for real runs; () = held-out split
        data_dir="",                   # where the benchmark files are (see docs/data.md)
        num_samples=1,                 # k > 1 adds avg@k / pass@k at `temperature` to greedy pass@1
        temperature=0.6,
        top_p=0.95,
        batch_size=32,
    ))
    c.warm_start = ml_collections.ConfigDict(dict(steps=0, lr=1e-3, batch_size=32, examples=4000))
    # Device mesh (docs/scaling.md): data / fsdp / tensor sizes within a slice (one may be -1:
    # the rest of the devices), dcn_* the number of slices along each axis (multi-slice), devices
    # the number of devices used (0: all of them). The batch is split over data x fsdp; weights
    # and Adam moments over fsdp (and tensor). sampler_reshard: decode with a copy of the weights
    # gathered over fsdp (one more copy in memory, no per-token weight all-gathers).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1,
                                            dcn_tensor=1, devices=0, sampler_reshard=False))
    # Testing hooks: inject_nan_step poisons that step's advantages to exercise the skip path;
    # raise_at_step fails that step right after its checkpoint save was dispatched (in flight in
    # the background), to exercise the teardown after an error.
    c.debug = ml_collections.ConfigDict(dict(inject_nan_step=0, raise_at_step=0))
    return c


# The paper presets' clip ranges assume ~500-token responses. The demo's are ~20 tokens (~5 per
# subsentence), so a mean log-ratio over a unit moves much more: the subsentence- and
# sequence-level objectives get wider ranges here (token level keeps GRPO's 0.2). SSPO's was
# tuned on this demo (docs/training.md); GSPO's is scaled from it by unit length.
DEMO_CLIP = {"sspo": (0.05, 0.06), "sspo_fixed": (0.05, 0.06), "gspo": (0.02, 0.025)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The CPU demo: a tiny Qwen2 learns the synthetic arithmetic task, warm start then RL.

    `arg` picks the loss preset (`sspo` by default), as in `--config=configs/demo.py:grpo`.
    Tuned on a 2-core CPU (docs/training.md and the README have the measured runs).
    """
    c = base_config()
    c.loss.name = arg or "sspo"
    c.loss.clip_by_preset = ml_collections.ConfigDict(DEMO_CLIP)
    c.steps = 100
    c.model.tiny.hidden_size = 128
    c.model.tiny.intermediate_size = 384
    c.data.template = "plain"
    c.data.max_prompt_len = 48
    c.rollout.prompts_per_step = 16
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 40
    c.train.ppo_mini_batches = 4
    c.train.micro_batch_size = 32
    c.optimizer.lr = 1e-4
    c.optimizer.schedule = "cosine"
    c.checkpoint.every = 10
    c.eval.every = 10
    c.eval.num_prompts = 300
    c.eval.max_new_tokens = 40
    c.warm_start.steps = 300
    c.warm_start.examples = 4000
    return c


def loss_config(loss: ml_collections.ConfigDict) -> losses.LossConfig:
    """The LossConfig of `loss.name`'s preset with every field the config sets overridden; a
    clip bound the config leaves unset from `loss.clip_by_preset[loss.name]` when it has one."""
    overrides = {k: loss[k] for k in LOSS_OVERRIDES if loss.get(k) is not None}
    eps = (loss.get("clip_by_preset") or {}).get(loss.name)
    if eps is not None:
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"loss.clip_by_preset.{loss.name}: need (eps_low, eps_high), got {eps!r}")
        for field, value in zip(("eps_low", "eps_high"), eps):
            overrides.setdefault(field, float(value))
    return losses.preset(loss.name, **overrides)


def checkpoint_dir(c, workdir: str) -> str:
    """Where the run's checkpoints live: `checkpoint.dir`, or WORKDIR/checkpoints."""
    return c.checkpoint.dir or os.path.join(workdir, "checkpoints")


def check_workdir(workdir: str) -> None:
    """The workdir holds logs, metrics and plots written with plain file I/O: a local (or
    mounted) directory. A URL there would be created as a local folder named `gs:`."""
    if "://" in workdir:
        raise ValueError(f"bad --workdir={workdir}: it must be a local or mounted directory; put "
                         f"checkpoints on cloud storage with --config.checkpoint.dir={workdir}")
