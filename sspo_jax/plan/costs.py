"""The memory plan and cost model of a training config on a TPU slice, on paper.

    python -m sspo_jax.plan --config=configs/qwen2_5_math_1_5b.py:sspo --slice=v5e-8 \
        [--config.mesh.fsdp=4 --config.train.micro_batch_size=16 ...]

Nothing is compiled or allocated: the model's shapes come from its config.json (or the table of
known hub models in sspo_jax.plan.tables, with the TPU chips, the advice and the report), the
per-device shares from the same logical-axis rules the trainer shards with (sspo_jax.parallel,
through sspo_jax.plan.mesh, which also counts the parameters and resolves the mesh),
and every figure from the formulas in docs/scaling.md, which also says what each formula
assumes. The memory is counted per phase of an RL step (sampling,
training, optimizer update, ...) on top of the state that lives through the whole run; the peak
is the largest phase. Estimates, not measurements: XLA's buffer assignment adds its own
temporaries (and may hoist or fuse differently), so treat >= 90% of HBM as not fitting.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sspo_jax.model.config import Qwen2Config
from sspo_jax.plan.memory import Item, Model, memory_plan, phase_totals
from sspo_jax.plan.mesh import SAMPLER_RULES, MeshPlan, matmul_params, param_count, resolve_mesh
from sspo_jax.plan.shapes import Shapes, rollout_shapes
from sspo_jax.plan.tables import (DECODE_EFFICIENCY, FIT_FRACTION, PACKED_RESPONSE_FRACTION, TRAIN_MFU,
                                  Chip, Slice, model_config, problems, report)


# ---------------------------------------------------------------- cost model

@dataclasses.dataclass(frozen=True)
class Costs:
    prompt_tokens: int
    sampled_tokens: int
    trained_tokens: int
    prefill_flops: float
    decode_flops: float
    train_model_flops: float   # 6 N per token + attention: the MFU basis
    train_flops: float         # executed, with rematerialisation
    recompute_flops: float     # old log-probs / KL reference forwards
    decode_steps: int          # static: sampler passes x max_new_tokens; continuous: Shapes.decode_steps
    decode_step_bytes: float   # per device, one decode step
    decode_step_ici_bytes: float  # per device, fsdp weight all-gathers


def forward_flops(cfg: Qwen2Config, rows: int, tokens: int, keys: int, head_tokens: int) -> float:
    """rows x (2 x layer weights x tokens + 4 x q_dim x L x tokens x keys + 2 x V x H x head_tokens)."""
    layers, head = matmul_params(cfg)
    attn = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * tokens * keys
    return rows * (2 * layers * tokens + attn + 2 * head * head_tokens)


def cost_model(config, cfg: Qwen2Config, mesh: MeshPlan) -> Costs:
    from sspo_jax.run_config import loss_config
    s, t = rollout_shapes(config), config.train
    model = Model(cfg, mesh, config.model.dtype, config.model.param_dtype, config.model.attention)
    # A fused kernel skips the blocks above the causal diagonal: about half the square executed.
    attn_executed = 0.5 if model.fused else 1.0
    # Training runs the dense padded [rows, prompt + response] arrays; the LM head only the
    # response positions.
    fwd = forward_flops(cfg, s.rows, s.seq, s.seq, s.new_tokens)
    layers_fwd = fwd - forward_flops(cfg, s.rows, 0, 0, s.new_tokens)
    attn_fwd = forward_flops(cfg, s.rows, s.seq, s.seq, 0) - forward_flops(cfg, s.rows, s.seq, 0, 0)
    head_fwd = fwd - layers_fwd
    skipped = (1 - attn_executed) * attn_fwd
    trained = s.rows * s.seq
    if config.train.packing:
        # Real tokens only: each row's prompt and an assumed mean response (PACKED_RESPONSE_FRACTION
        # of max_new_tokens); every sequence attends to its own tokens (model FLOPs), executed as
        # packed rows of `seq` slots, the whole square of each row (masked by segment).
        resp = PACKED_RESPONSE_FRACTION * s.new_tokens
        real = s.prompt_len + resp
        trained = int(s.rows * real)
        packed_rows = s.rows * real / s.seq
        # The LM head runs on the loss tokens only (packing.plan's head groups): `resp` per row,
        # a lower bound (the groups' head slots are bucketed and set by the most loaded group).
        fwd = forward_flops(cfg, s.rows, real, real, resp)
        layers_fwd = fwd - forward_flops(cfg, s.rows, 0, 0, resp)
        attn_row = forward_flops(cfg, packed_rows, s.seq, s.seq, 0) - forward_flops(cfg, packed_rows, s.seq, 0, 0)
        model_attn = forward_flops(cfg, s.rows, real, real, 0) - forward_flops(cfg, s.rows, real, 0, 0)
        head_fwd = fwd - layers_fwd
        skipped = model_attn - attn_executed * attn_row  # negative: a packed row computes more
        attn_fwd = model_attn
    recompute = {"none": 0.0, "full": layers_fwd - skipped,
                 "dots_saveable": attn_fwd - skipped}[config.model.remat]
    passes = t.ppo_epochs
    forwards = int(config.rollout.old_logprobs == "recompute") + int(loss_config(config.loss).kl_beta > 0)
    reshard = config.mesh.sampler_reshard
    # A decode step reads every weight once: the resharded compute-dtype copy, or each device's
    # shard of the compute-dtype copy (cast once per rollout) plus, with fsdp > 1, the layers it
    # all-gathers.
    fsdp = mesh.sizes["fsdp"]
    gathered = model.c * model.params(SAMPLER_RULES)
    weights_read = gathered if reshard else model.c * model.params() + (gathered if fsdp > 1 else 0)
    ici = 0.0 if reshard else gathered * (fsdp - 1) / fsdp
    # Each sampler pass decodes N steps over its own rows: every step reads all the weights, so
    # the weight traffic is paid once per step of every pass; the cache and logits are the pass's.
    shards = mesh.batch_shards
    decode_rows = s.decode_rows(shards)
    decode_logits = 3 * 4.0 * model.batch_rows(decode_rows) * cfg.vocab_size / model.t_vocab
    # A decode step reads the cache's live prefix (attention.live_prefix_attention): static rows
    # advance together, so on average the prompt and half the response (plus the prefix rounding
    # up to a quarter of the cache, 1/8 on average); a continuous pool almost always holds a
    # long row, so the whole cache.
    live = (s.seq if s.engine == "continuous" else
            min(s.seq, s.prompt_len + s.new_tokens / 2 + s.seq / 8))
    return Costs(
        prompt_tokens=s.prompts * s.prompt_len,
        sampled_tokens=s.rows * s.new_tokens,
        trained_tokens=passes * trained,
        # the prompts attend among themselves; the LM head runs on the last prompt position only
        prefill_flops=forward_flops(cfg, s.prompts, s.prompt_len, s.prompt_len, 1),
        decode_flops=s.decode_steps(shards) * forward_flops(cfg, decode_rows, 1, live, 1),
        train_model_flops=passes * 3 * fwd,
        # the head's chunks are always rematerialised
        train_flops=passes * (3 * (fwd - skipped) + recompute + head_fwd),
        recompute_flops=forwards * fwd,
        decode_steps=s.decode_steps(shards),
        decode_step_bytes=weights_read + model.kv_cache(decode_rows, live) + decode_logits,
        decode_step_ici_bytes=ici,
    )


@dataclasses.dataclass(frozen=True)
class Times:
    """Seconds per RL step, (fast, slow) at the assumed utilisation ranges."""
    prefill: tuple[float, float]
    decode_roofline: float
    decode: tuple[float, float]
    train: tuple[float, float]
    recompute: tuple[float, float]

    @property
    def total(self) -> tuple[float, float]:
        parts = (self.prefill, self.decode, self.train, self.recompute)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


def step_times(costs: Costs, chip: Chip, devices: int) -> Times:
    """Compute-bound parts at TRAIN_MFU of the slice's peak; decoding at DECODE_EFFICIENCY of the
    per-step roofline max(HBM bytes / bandwidth, FLOPs / peak, ICI bytes / all-gather bandwidth),
    times every step of every sampler pass. The ICI bytes are what each device receives of the
    fsdp all-gathers; they arrive over the two links of one torus dimension
    (`Chip.ici_gather_bandwidth`), not over all of the chip's ports."""
    decode_steps = costs.decode_steps
    peak = devices * chip.peak_flops
    at_mfu = lambda flops: (flops / (peak * TRAIN_MFU[1]), flops / (peak * TRAIN_MFU[0]))  # noqa: E731
    per_step = max(costs.decode_step_bytes / chip.hbm_bandwidth,
                   costs.decode_flops / decode_steps / peak,
                   costs.decode_step_ici_bytes / chip.ici_gather_bandwidth)
    roofline = decode_steps * per_step
    return Times(prefill=at_mfu(costs.prefill_flops), decode_roofline=roofline,
                 decode=(roofline / DECODE_EFFICIENCY[1], roofline / DECODE_EFFICIENCY[0]),
                 train=at_mfu(costs.train_model_flops), recompute=at_mfu(costs.recompute_flops))


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the report shows (sspo_jax.plan.tables.report)."""
    config: Any
    config_name: str
    slice: Slice
    model_name: str
    cfg: Qwen2Config
    params: int
    mesh: MeshPlan
    shapes: Shapes
    items: list[Item]
    totals: dict[str, float]
    issues: list[str]
    fits: bool
    costs: Costs
    times: Times
    attention: str   # the implementation the model runs on the slice (model/backend.py)


def analyse(config, config_name: str, slice_: Slice) -> Plan:
    name, cfg = model_config(config)
    mesh = resolve_mesh(config.mesh, slice_)
    items, shapes = memory_plan(config, cfg, mesh), rollout_shapes(config)
    totals, costs = phase_totals(items), cost_model(config, cfg, mesh)
    return Plan(config, config_name, slice_, name, cfg, param_count(cfg), mesh, shapes,
                items, totals, problems(shapes, mesh, items, totals, slice_.chip.hbm_bytes),
                max(totals.values()) <= FIT_FRACTION * slice_.chip.hbm_bytes, costs,
                step_times(costs, slice_.chip, mesh.devices),
                Model(cfg, mesh, config.model.dtype, config.model.param_dtype, config.model.attention).attention_impl)


def render(config, config_name: str, slice_: Slice, show_items: bool = True) -> str:
    """The markdown report: setup, memory per item (show_items) and per phase, fit verdict,
    cost model."""
    return report(analyse(config, config_name, slice_), show_items)
