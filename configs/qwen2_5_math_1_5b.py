"""Qwen2.5-Math-1.5B, the paper-scale comparison: `--config=configs/qwen2_5_math_1_5b.py:sspo`
(or :gspo, :grpo, :sspo_fixed, :dapo, :dr_grpo).

The reproduction settings of docs/sspo-spec (see docs/reproduce.md): MATH levels 3-5, the
qwen25-math-cot template, 128 prompts x 8 samples per step, lr 1e-6 constant, no KL (beta 0),
3000 new tokens in a 4k context, 4 mini-batches per rollout batch, evaluation on the five
benchmarks. Every objective uses the same aggregation (seq-mean-token-mean) for a fair
comparison; the clip ranges are each preset's own.
"""
from sspo_jax.data.benchmarks import FIVE_BENCHMARKS
from sspo_jax.run_config import base_config

MODEL = "Qwen/Qwen2.5-Math-1.5B"


def get_config(arg: str | None = None):
    c = base_config()
    c.loss.name = arg or "sspo"
    c.seed = 0
    c.steps = 500
    c.model.hf_dir = MODEL
    c.model.dtype = "bfloat16"        # compute
    c.model.param_dtype = "float32"   # master weights (Adam updates of 1e-6 vanish in bf16)
    c.model.remat = "full"
    c.data.source = "jsonl"
    c.data.path = "data/math_level3to5.jsonl"  # python -m sspo_jax.data.prepare_math
    c.data.template = "qwen25-math-cot"
    c.data.max_prompt_len = 1024
    c.rollout.prompts_per_step = 128
    c.rollout.num_samples = 8
    c.rollout.max_new_tokens = 3000
    c.rollout.temperature = 1.0
    # Continuous batching: 128 decode slots per batch shard fed from a queue of all 1024 rows, so
    # a short response frees its slot for the next row instead of idling until the longest one
    # ends; memory is bounded by the slots (docs/design.md, "Sampler"; docs/scaling.md).
    c.rollout.engine = "continuous"
    c.rollout.slots = 128
    c.train.ppo_mini_batches = 4
    c.train.ppo_epochs = 1
    c.train.micro_batch_size = 8
    c.train.logprob_chunk = 256
    # Padding-free update: RL responses are mostly far shorter than 3000 tokens, so padded rows
    # are mostly padding; packed rows of 4024 slots, micro-batches of 8 rows' worth (the padded
    # micro-batch's memory). docs/design.md, "Padding-free training".
    c.train.packing = True
    c.optimizer.lr = 1e-6
    c.optimizer.schedule = "constant"
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    c.eval.every = 50
    c.eval.benchmarks = FIVE_BENCHMARKS
    c.eval.data_dir = "data/benchmarks"
    c.eval.num_prompts = 0            # all problems
    c.eval.max_new_tokens = 3000
    c.eval.batch_size = 64
    c.warm_start.steps = 0
    # FSDP over every device of the slice: weights and Adam moments split N ways, the batch too
    # (docs/scaling.md has the memory plan per TPU slice: python -m sspo_jax.plan).
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # Decode from a copy gathered over fsdp once per RL step, in bf16: without it every decode
    # step all-gathers every layer, and the plan puts the decode 1.4-6x slower (ICI-bound) on the
    # slices of docs/scaling.md, all of which still fit with the copy.
    c.mesh.sampler_reshard = True
    return c
