"""The run configuration parsed once into frozen, typed specs, validated in one place.

A config file (ml_collections, `sspo_jax/run_config.py` and `configs/`) is what users write and
override on the command line; `parse(config)` turns it into a `RunSpec` whose blocks have the
config's names (`spec.rollout.num_samples` is `--config.rollout.num_samples`), raising a
ValueError that names the first bad field and the fix, before anything loads or compiles. Each
helper of the trainer takes only the spec it needs (`build_policy(spec.model, seed, mesh)`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from sspo_jax import run_config
from sspo_jax.rl.losses import LossConfig


def _block(cls, cfg, name: str):
    """`cls` from the config block `name` (a ConfigDict or a dict)."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"bad config: unknown field(s) {[f'{name}.{k}' for k in unknown]}; "
                         f"{name} has {sorted(fields)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    hf_dir: str
    tokenizer_dir: str
    dtype: str
    param_dtype: str
    remat: str
    attention: str
    tiny: tuple[tuple[str, Any], ...]   # the demo model's Qwen2Config fields (hf_dir == "")

    def __post_init__(self):
        if isinstance(self.tiny, dict):
            object.__setattr__(self, "tiny", tuple(sorted(self.tiny.items())))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str
    path: str
    problem_field: str
    answer_field: str
    template: str
    max_prompt_len: int
    long_prompts: str
    strict: bool
    synthetic_levels: tuple[int, ...]
    synthetic_train_size: int

    def __post_init__(self):
        object.__setattr__(self, "synthetic_levels", tuple(self.synthetic_levels))


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    prompts_per_step: int
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    old_logprobs: str
    grading_timeout: float
    filter_zero_variance_groups: bool
    sample_batch_size: int
    engine: str
    slots: int
    chunk_steps: int

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.num_samples


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    ppo_mini_batches: int
    ppo_epochs: int
    micro_batch_size: int
    logprob_chunk: int
    max_bad_steps: int
    packing: bool
    max_tokens_per_micro_batch: int


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    lr: float
    schedule: str
    warmup_steps: int
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    format_weight: float
    overlong_buffer: int

    @property
    def shaping(self) -> bool:
        return bool(self.format_weight or self.overlong_buffer)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every: int
    keep: int
    async_save: bool
    dir: str


@dataclasses.dataclass(frozen=True)
class CompileCacheSpec:
    dir: str
    min_compile_secs: float


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    every: int
    num_prompts: int
    max_new_tokens: int
    benchmarks: tuple[str, ...]
    data_dir: str
    num_samples: int
    temperature: float
    top_p: float
    batch_size: int

    def __post_init__(self):
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))


@dataclasses.dataclass(frozen=True)
class WarmStartSpec:
    steps: int
    lr: float
    batch_size: int
    examples: int


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int
    fsdp: int
    tensor: int
    dcn_data: int
    dcn_fsdp: int
    dcn_tensor: int
    devices: int
    sampler_reshard: bool


@dataclasses.dataclass(frozen=True)
class DebugSpec:
    inject_nan_step: int
    raise_at_step: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int
    steps: int
    model: ModelSpec
    data: DataSpec
    rollout: RolloutSpec
    loss: LossConfig
    train: TrainSpec
    optimizer: OptimizerSpec
    reward: RewardSpec
    checkpoint: CheckpointSpec
    compile_cache: CompileCacheSpec
    eval: EvalSpec
    warm_start: WarmStartSpec
    mesh: MeshSpec
    debug: DebugSpec

    @property
    def optimizer_steps(self) -> int:
        """Optimizer updates of the whole run (the learning-rate schedule's length)."""
        return self.steps * self.train.ppo_mini_batches * self.train.ppo_epochs


_BLOCKS = {"model": ModelSpec, "data": DataSpec, "rollout": RolloutSpec, "train": TrainSpec,
           "optimizer": OptimizerSpec, "reward": RewardSpec, "checkpoint": CheckpointSpec,
           "compile_cache": CompileCacheSpec, "eval": EvalSpec, "warm_start": WarmStartSpec,
           "mesh": MeshSpec, "debug": DebugSpec}


def parse(config, batch_shards: int = 1, *, training_data: bool = True) -> RunSpec:
    """The RunSpec of `config`, validated: raises ValueError naming the first bad field.

    batch_shards: how many ways the mesh splits the batch (data x fsdp, `parallel.batch_shards`).
    training_data: whether the run reads its training data (evaluation and export do not, so
    they need not find `data.path`).
    """
    blocks = {name: _block(cls, config[name], name) for name, cls in _BLOCKS.items()}
    spec = RunSpec(seed=int(config.seed), steps=int(config.steps),
                   loss=run_config.loss_config(config.loss), **blocks)
    _validate(spec, batch_shards, training_data)
    return spec


def _validate(c: RunSpec, batch_shards: int, training_data: bool) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(f"bad config: {msg}")

    need(c.steps >= 1, f"steps={c.steps} must be >= 1")
    r, t = c.rollout, c.train
    need(r.num_samples >= 2, f"rollout.num_samples={r.num_samples}: group advantages need >= 2 samples per prompt")
    need(r.prompts_per_step >= 1, f"rollout.prompts_per_step={r.prompts_per_step} must be >= 1")
    need(r.max_new_tokens >= 1, f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1")
    need(r.sample_batch_size >= 0 and (r.sample_batch_size == 0 or
                                        r.prompts_per_step % r.sample_batch_size == 0),
         f"rollout.sample_batch_size={r.sample_batch_size} must divide rollout.prompts_per_step="
         f"{r.prompts_per_step} (0 = all prompts in one sampler call)")
    from sspo_jax.generate.sampler import ENGINES
    need(r.engine in ENGINES, f"rollout.engine={r.engine!r}: choose one of {ENGINES}")
    need(r.slots >= 0, f"rollout.slots={r.slots} must be >= 0 (0 = one decode slot per row)")
    need(r.chunk_steps >= 1, f"rollout.chunk_steps={r.chunk_steps} must be >= 1")
    need(r.engine == "static" or r.sample_batch_size == 0,
         f"rollout.sample_batch_size={r.sample_batch_size} splits the static engine's batch into "
         "passes; the continuous engine queues every row and bounds memory by rollout.slots: "
         "set rollout.sample_batch_size=0 or rollout.engine='static'")
    need(r.engine == "continuous" or r.slots == 0,
         f"rollout.slots={r.slots} is the continuous engine's: set rollout.engine='continuous' "
         "(or rollout.slots=0)")
    # The sampler's and grader's values too, so a bad one fails here, not after the warm start.
    need(r.temperature >= 0, f"rollout.temperature={r.temperature} must be >= 0 (0 = greedy)")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1] (1 = no nucleus filter)")
    need(r.top_k >= 0, f"rollout.top_k={r.top_k} must be >= 0 (0 = no top-k filter)")
    need(r.grading_timeout > 0, f"rollout.grading_timeout={r.grading_timeout} must be > 0 seconds")
    need(r.old_logprobs in ("sampler", "recompute"),
         f"rollout.old_logprobs={r.old_logprobs!r}: choose 'sampler' or 'recompute'")
    rows = r.rows
    need(t.ppo_mini_batches >= 1 and rows % t.ppo_mini_batches == 0,
         f"the rollout batch of {rows} rows (prompts_per_step x num_samples) is not divisible "
         f"into train.ppo_mini_batches={t.ppo_mini_batches} mini-batches")
    mini = rows // max(t.ppo_mini_batches, 1)
    need(t.micro_batch_size >= 1 and mini % t.micro_batch_size == 0,
         f"a mini-batch of {mini} rows is not divisible into micro-batches of "
         f"train.micro_batch_size={t.micro_batch_size}")
    need(rows % batch_shards == 0 and t.micro_batch_size % batch_shards == 0,
         f"the batch is split {batch_shards} ways by the mesh (mesh.data x mesh.fsdp), but the "
         f"rollout batch has {rows} rows and train.micro_batch_size={t.micro_batch_size}: both "
         f"must be multiples of {batch_shards} (or change the mesh)")
    need(t.ppo_epochs >= 1, f"train.ppo_epochs={t.ppo_epochs} must be >= 1")
    need(t.logprob_chunk >= 1, f"train.logprob_chunk={t.logprob_chunk} must be >= 1")
    need(t.packing or t.max_tokens_per_micro_batch == 0,
         f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} applies to packed rows only: "
         "set train.packing=True, or leave it 0 (micro-batches of train.micro_batch_size rows)")
    row_len = c.data.max_prompt_len + c.rollout.max_new_tokens
    need(t.max_tokens_per_micro_batch == 0 or t.max_tokens_per_micro_batch >= row_len,
         f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} holds less than one packed "
         f"row of data.max_prompt_len + rollout.max_new_tokens = {row_len} slots: use 0 or at least {row_len}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    m = c.model
    need(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: float32 or bfloat16")
    need(m.param_dtype in ("float32", "bfloat16"), f"model.param_dtype={m.param_dtype!r}: float32 or bfloat16")
    from sspo_jax.model import REMAT_POLICIES
    need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    from sspo_jax.model import ATTENTION_CHOICES
    need(m.attention in ATTENTION_CHOICES,
         f"model.attention={m.attention!r}: choose one of {list(ATTENTION_CHOICES)} (auto: splash on "
         "TPU, cudnn on GPU, the CPU forms on CPU)")
    if m.hf_dir:
        need(os.path.isdir(m.hf_dir) or m.hf_dir.count("/") == 1,
             f"model.hf_dir={m.hf_dir!r} is not a directory (a local Hugging Face checkpoint)")
    d = c.data
    need(d.source in ("synthetic", "jsonl", "parquet", "hub"),
         f"data.source={d.source!r}: choose synthetic, jsonl, parquet or hub")
    if training_data and d.source in ("jsonl", "parquet"):
        need(bool(d.path) and os.path.exists(d.path),
             f"data.path={d.path!r} does not exist (data.source={d.source}); for "
             f"MATH write it with python -m sspo_jax.data.prepare_math --out={d.path}")
    need(d.long_prompts in ("drop", "truncate"),
         f"data.long_prompts={d.long_prompts!r}: choose 'drop' or 'truncate'")
    from sspo_jax.data.templates import TEMPLATE_NAMES
    need(d.template in TEMPLATE_NAMES, f"data.template={d.template!r}: choose one of {TEMPLATE_NAMES}")
    need(d.max_prompt_len >= 1, f"data.max_prompt_len={d.max_prompt_len} must be >= 1")
    o = c.optimizer
    need(o.schedule in ("constant", "cosine"), f"optimizer.schedule={o.schedule!r}: choose 'constant' or 'cosine'")
    need(o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0,
         f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1) and eps={o.eps} > 0")
    need(o.warmup_steps >= 0 and o.weight_decay >= 0 and o.grad_clip >= 0,
         f"optimizer.warmup_steps={o.warmup_steps}, weight_decay={o.weight_decay} and grad_clip="
         f"{o.grad_clip} must be >= 0 (grad_clip 0 = no clipping)")
    need(c.checkpoint.every >= 1 and c.checkpoint.keep >= 1,
         "checkpoint.every and checkpoint.keep must be >= 1")
    e = c.eval
    need(e.every >= 0, f"eval.every={e.every} must be >= 0 (0 = never)")
    need(e.num_prompts >= 0 and e.batch_size >= 1 and e.max_new_tokens >= 1,
         f"eval.num_prompts={e.num_prompts} (>= 0), eval.batch_size={e.batch_size} and "
         f"eval.max_new_tokens={e.max_new_tokens} (>= 1)")
    need(e.num_samples >= 1 and (e.num_samples == 1 or e.temperature > 0) and 0 < e.top_p <= 1,
         f"eval.num_samples={e.num_samples} must be >= 1, sampled (> 1) at eval.temperature="
         f"{e.temperature} > 0, with eval.top_p={e.top_p} in (0, 1]")
    from sspo_jax.data.benchmarks import BENCHMARKS
    unknown = [b for b in e.benchmarks if b not in BENCHMARKS and b != "synthetic"]
    need(not unknown, f"eval.benchmarks: unknown {unknown}; choose from {sorted(BENCHMARKS)} or 'synthetic'")
    w = c.warm_start
    need(w.steps >= 0 and (w.steps == 0 or (w.lr > 0 and 1 <= w.batch_size <= w.examples)),
         f"warm_start.steps={w.steps} (>= 0) needs lr={w.lr} > 0 and 1 <= batch_size={w.batch_size} "
         f"<= examples={w.examples}")
    need(c.reward.format_weight >= 0, f"reward.format_weight={c.reward.format_weight} must be >= 0")
    need(0 <= c.reward.overlong_buffer <= r.max_new_tokens,
         f"reward.overlong_buffer={c.reward.overlong_buffer} must be in [0, rollout.max_new_tokens="
         f"{r.max_new_tokens}] (0 = no overlong penalty)")
    need(c.compile_cache.min_compile_secs >= 0,
         f"compile_cache.min_compile_secs={c.compile_cache.min_compile_secs} must be >= 0")
