"""The memory plan: every array an RL step holds, per phase (sampling, training, optimizer
update, ...) on top of the state that lives through the whole run, with its formula and what
makes it smaller (docs/scaling.md has the formulas)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sspo_jax import parallel
from sspo_jax.model.backend import resolve as resolve_backend
from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.qwen2 import layer_param_specs
from sspo_jax.plan.mesh import SAMPLER_RULES, MeshPlan, param_arrays, per_device, shard_divisor
from sspo_jax.plan.shapes import rollout_shapes
from sspo_jax.plan.tables import DTYPE_BYTES, FEWER_ROWS, FEWER_SLOTS, SHARD_MORE


@dataclasses.dataclass(frozen=True)
class Item:
    phase: str
    name: str
    bytes: float
    formula: str
    fix: str = ""  # what makes it smaller


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Model:
    """Per-device byte counts of one architecture on one mesh (formulas: docs/scaling.md)."""

    def __init__(self, cfg: Qwen2Config, mesh: MeshPlan, dtype: str, param_dtype: str,
                 attention: str = "auto"):
        self.cfg, self.mesh, self.sizes = cfg, mesh, mesh.sizes
        # The plan is for TPU slices: auto is splash there (model/backend.py).
        self.attention_impl = resolve_backend(attention, "tpu", DTYPES[dtype], cfg.head_dim).attention
        self.fused = self.attention_impl != "xla"
        self.c, self.p = DTYPE_BYTES[dtype], DTYPE_BYTES[param_dtype]
        t = self.sizes["tensor"]
        self.q = cfg.num_attention_heads * cfg.head_dim
        self.kv = cfg.num_key_value_heads * cfg.head_dim
        split = lambda n: t if n % t == 0 else 1  # noqa: E731  tensor splits it, or replicates
        self.t_q, self.t_kv, self.t_mlp = split(self.q), split(self.kv), split(cfg.intermediate_size)
        self.t_heads, self.t_vocab = split(cfg.num_attention_heads), split(cfg.vocab_size)

    def params(self, rules=parallel.LOGICAL_RULES) -> float:
        return sum(per_device(axes, shape, self.sizes, rules) for shape, axes in param_arrays(self.cfg))

    def gathered_layer(self, matrices_only: bool = False) -> float:
        """One layer's weights all-gathered over fsdp (split over tensor only), compute dtype;
        matrices_only: without the norm weights and biases."""
        specs = layer_param_specs(self.cfg).items()
        return self.c * sum(per_device(axes, shape, self.sizes, SAMPLER_RULES)
                            for name, (shape, axes) in specs if name.endswith("_w") or not matrices_only)

    def gathered_head(self) -> float:
        return self.c * self.cfg.vocab_size * self.cfg.hidden_size / self.t_vocab

    def batch_rows(self, rows: int) -> int:
        """Rows one device computes: the batch split over data x fsdp where they divide it."""
        return rows // shard_divisor(("batch",), (rows,), self.sizes)

    def kv_cache(self, rows: int, slots: int) -> float:
        cfg = self.cfg
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, slots, cfg.head_dim)
        kv = 2 * self.c * per_device(("layers", "batch", "kv_heads", "kv_seq", "head_dim"), shape, self.sizes)
        return kv + per_device(("batch", "kv_seq"), (rows, slots), self.sizes)  # + the bool mask

    def token_bytes(self) -> float:
        """Live bytes per token of one decoder layer's forward (no gradient): 7 residual-width
        arrays (replicated over tensor), q/k/v before and after rotary and the attention output
        (3q + 3kv), gate, up and their product (3 x intermediate)."""
        cfg = self.cfg
        return self.c * (7 * cfg.hidden_size + 3 * self.q / self.t_q + 3 * self.kv / self.t_kv
                         + 3 * cfg.intermediate_size / self.t_mlp)

    def attention(self, b: int, tq: int, tk: int, per_element: float) -> float:
        """b rows' attention scores of one layer in HBM: [b, heads, tq, tk] with `xla` (the
        whole square, masked); none with a fused kernel (splash holds one block at a time in
        on-chip memory, forward and backward)."""
        if self.fused:
            return 0.0
        return b * self.cfg.num_attention_heads / self.t_heads * tq * tk * per_element

    def layer_forward(self, b: int, tq: int, tk: int) -> float:
        """One layer's forward working set: activations + f32 scores and compute-dtype probs."""
        return b * tq * self.token_bytes() + self.attention(b, tq, tk, 4 + self.c)

    def layer_residuals(self, b: int, t: int) -> float:
        """What autodiff keeps of one layer for its backward pass without remat, as JAX lists it
        (jax.ad_checkpoint.print_saved_residuals on the model; tests/test_plan.py checks it):
        per token the float32 input and normalised value of both RMSNorms (16h bytes) and their
        statistics, the two norm outputs, q (twice) and k, v after rotary, six intermediate-width
        MLP arrays, the softmax's float32 max and sum per head; the float32 scores and
        compute-dtype probabilities; the layer's weights cast to the compute dtype (gathered over
        fsdp) and its two norm weights in float32."""
        cfg = self.cfg
        heads = cfg.num_attention_heads / self.t_heads
        per_token = 16 * cfg.hidden_size + 16 + 8 * heads + self.c * (
            2 * cfg.hidden_size + 2 * self.q / self.t_q + 2 * self.kv / self.t_kv
            + 6 * cfg.intermediate_size / self.t_mlp)
        return (b * t * per_token + self.attention(b, t, t, 4 + self.c)
                + self.gathered_layer(matrices_only=True) + 8 * cfg.hidden_size)

    def saved_per_layer(self, b: int, t: int, remat: str) -> float:
        """What the scanned forward keeps per layer for the backward pass."""
        cfg = self.cfg
        if remat == "none":
            return self.layer_residuals(b, t)
        if remat == "full":  # the layer's input (the scan carry)
            return self.c * b * t * cfg.hidden_size
        if remat == "dots_saveable":  # outputs of the weight matmuls: q, k, v, o, gate, up, down
            return self.c * b * t * (self.q / self.t_q + 2 * self.kv / self.t_kv + 2 * cfg.hidden_size
                                     + 2 * cfg.intermediate_size / self.t_mlp)
        raise ValueError(f"model.remat={remat!r}: none, full or dots_saveable")

    def activations(self, b: int, t: int, remat: str) -> float:
        """Training activations of b rows of t tokens: L layers' saved arrays; during the
        backward of one layer its recomputed residuals (with remat) and its cotangents (token
        arrays and float32 score gradients); the attention mask (without remat, broadcast over
        heads with its float32 fill); the final norm's float32 input and output."""
        cfg = self.cfg
        layers = cfg.num_hidden_layers * self.saved_per_layer(b, t, remat)
        recompute = 0 if remat == "none" else self.layer_residuals(b, t)
        cotangents = b * t * self.token_bytes() + self.attention(b, t, t, 4 + self.c)
        mask = 0 if self.fused else self.attention(b, t, t, 1 + 4) if remat == "none" else b * t * t
        return layers + recompute + cotangents + mask + 8 * b * t * cfg.hidden_size

    def logprob_head(self, b: int, t: int, chunk: int, grad: bool) -> float:
        """Chunked LM-head log-probs: [b, chunk, V] float32 logits, their softmax (and with a
        gradient the two gradients), never [b, t, V]; plus the final hidden states (and grad)."""
        copies = 4 if grad else 2
        hidden = (2 if grad else 1) * self.c * b * t * self.cfg.hidden_size
        return copies * 4 * b * min(chunk, t) * self.cfg.vocab_size / self.t_vocab + hidden


def _sampler_items(model: Model, phase: str, prompts: int, samples: int, prompt_len: int,
                   new_tokens: int, reshard: bool, what: str, decode_rows: int | None = None) -> list[Item]:
    """One sampler call (`generate`) over `prompts` x `samples` rows, as two phases: the prefill
    of the prompts, then the decode loop over the repeated cache. `what`: the config field that
    sets the number of prompts per call. decode_rows: the continuous engine's slots (global);
    its prompts' cache (prompt_len slots each) lives through the decode, each slot copying its
    row's prompt from it."""
    cfg, c = model.cfg, model.c
    slots, rows = prompt_len + new_tokens, decode_rows or prompts * samples
    b_p = model.batch_rows(prompts)
    prefill, decode = f"{phase}: prefill", f"{phase}: decode"
    fewer = FEWER_SLOTS if decode_rows else FEWER_ROWS.format(what=what)
    prompt_cache = model.kv_cache(prompts, prompt_len if decode_rows else slots)

    def weights(phase):
        if reshard:
            return Item(phase, "sampler weights (gathered over fsdp)", c * model.params(SAMPLER_RULES),
                        f"a copy in the compute dtype ({c} B), split over tensor only",
                        "mesh.sampler_reshard=False (decode from the fsdp-sharded weights), or "
                        "mesh.tensor > 1")
        gathered = Item(phase, "gathered weights (2 layers + LM head)",
                        2 * model.gathered_layer() + model.gathered_head(),
                        "each forward all-gathers every layer over fsdp", "mesh.tensor > 1")
        if model.c == model.p:
            return gathered
        # The sampler casts the sharded master weights to the compute dtype once per rollout.
        return [gathered, Item(phase, "sampler weights (compute-dtype copy, sharded like the parameters)",
                               c * model.params(), f"the parameters in {c} B, cast once per rollout",
                               SHARD_MORE)]

    logits = 4.0 * b_p * cfg.vocab_size / model.t_vocab

    def prefill_logits(phase):
        return Item(phase, "prefill logits [prompts, V] float32", logits,
                    f"{b_p} prompts/device x V x 4 B (the last prompt position only); alive until "
                    f"the repeated cache is built", fewer)

    items = [
        Item(prefill, "prompt KV cache", prompt_cache,
             f"2 x L x {prompts} prompts x {slots} slots x kv_heads x head_dim x {c} B / shards", fewer),
        prefill_logits(prefill),
        *_as_list(weights(prefill)),
        Item(prefill, "prefill layer working set", model.layer_forward(b_p, prompt_len, prompt_len),
             "one layer over the prompts, attending among themselves"
             + (f" ({model.attention_impl}: no scores in HBM)" if model.fused else "; float32 scores + probabilities"),
             ("a shorter data.max_prompt_len or fewer rollout.prompts_per_step (the continuous "
              "engine prefills all of a step's prompts at once)") if decode_rows else
             f"fewer prompts per sampler call (a smaller {what}) or a shorter data.max_prompt_len"),
        Item(decode, "KV cache", model.kv_cache(rows, slots),
             f"2 x L x {rows} rows x {slots} slots x kv_heads x head_dim x {c} B / shards", fewer),
    ]
    if decode_rows:
        items += [Item(decode, "prompt KV cache (the slots copy from it)", prompt_cache,
                       f"{prompts} prompts x {prompt_len} slots", FEWER_ROWS.format(what="rollout.prompts_per_step")),
                  prefill_logits(decode)]
    elif samples > 1:  # XLA builds the repeated cache while the prompts' cache and logits live
        items += [Item(decode, "prompt KV cache (while it is repeated per sample)", prompt_cache,
                       f"the cache of {prompts} prompts", fewer), prefill_logits(decode)]
    items += [
        Item(decode, "decode logits and sampling buffers",
             4 * 4.0 * model.batch_rows(rows) * cfg.vocab_size / model.t_vocab,
             "4 x [rows/device, V] float32 (logits, log-softmax, probabilities, filtered)", fewer),
        *_as_list(weights(decode)),
    ]
    return items


def _as_list(x):
    return x if isinstance(x, list) else [x]


def memory_plan(config, cfg: Qwen2Config, mesh: MeshPlan) -> list[Item]:
    """Every per-device memory item of a run, by phase ("state" lives through every phase)."""
    from sspo_jax.run_config import loss_config
    model = Model(cfg, mesh, config.model.dtype, config.model.param_dtype, config.model.attention)
    s, t, r, e = rollout_shapes(config), config.train, config.rollout, config.eval
    remat, chunk, pbytes = config.model.remat, t.logprob_chunk, model.p
    params = pbytes * model.params()
    items = [
        Item("state", f"parameters ({config.model.param_dtype})", params, "sharded by the logical rules",
             SHARD_MORE),
        Item("state", "Adam moments (mu, nu)", 2 * params, "2 x parameters (optax keeps the param dtype)",
             SHARD_MORE),
    ]
    kl = loss_config(config.loss).kl_beta > 0
    if kl:
        items.append(Item("state", "KL reference parameters", params, "a second copy of the policy",
                          "loss.kl_beta=0 (no reference policy)"))
    reshard = config.mesh.sampler_reshard
    continuous = s.engine == "continuous"
    items += _sampler_items(model, "sampling", s.per_pass, s.samples, s.prompt_len, s.new_tokens,
                            reshard, "rollout.sample_batch_size",
                            s.decode_rows(mesh.batch_shards) if continuous else None)
    eval_rows = e.batch_size * max(1, e.num_samples)
    items += _sampler_items(model, "evaluation", e.batch_size, max(1, e.num_samples), s.prompt_len,
                            e.max_new_tokens, reshard, "eval.batch_size",
                            min(eval_rows, s.slots * mesh.batch_shards) if continuous and s.slots else None)
    b = model.batch_rows(s.micro_rows)
    smaller_micro = ("" if remat == "full" else "model.remat=full, ") + (
        "a smaller train.micro_batch_size (down to one row per device), or a shorter context "
        "(the attention scores grow with its square)")
    items += [
        Item("training", "gradient accumulator", params, "zeros_like(params)", SHARD_MORE),
        Item("training", "one micro-batch's gradients", params, "before they are added", SHARD_MORE),
        Item("training", f"activations (remat={remat})", model.activations(b, s.seq, remat),
             f"{b} rows/device x {s.seq} tokens; see docs/scaling.md", smaller_micro),
        Item("training", "LM-head log-probs", model.logprob_head(b, s.new_tokens, chunk, grad=True),
             f"chunks of {chunk} tokens x V, float32", "a smaller train.logprob_chunk"),
        Item("training", "gathered weights (3 layers + LM head and its gradient)",
             3 * model.gathered_layer() + 2 * model.gathered_head(),
             "fsdp all-gathers one layer at a time", "mesh.tensor > 1"),
        Item("training", "rollout batch arrays", model.batch_rows(s.rows) * (8 * s.seq + 20 * s.new_tokens),
             "tokens, masks, old log-probs, segments, clip bounds", "more batch shards"),
        Item("update", "gradients", params, "the accumulated mini-batch gradient", SHARD_MORE),
        Item("update", "AdamW updates", params, "one params-sized temporary", SHARD_MORE),
    ]
    if r.old_logprobs == "recompute" or kl:
        fix = "a smaller train.micro_batch_size"
        items += [
            Item("recompute", "layer working set, one micro-batch",
                 model.layer_forward(b, s.seq, s.seq),
                 f"batch_logprobs runs micro-batches of {s.micro_rows} rows ({b}/device)", fix),
            Item("recompute", "LM-head log-probs", model.logprob_head(b, s.new_tokens, chunk, grad=False),
                 f"chunks of {chunk} tokens", "a smaller train.logprob_chunk"),
            Item("recompute", "gathered weights", 2 * model.gathered_layer() + model.gathered_head(),
                 "", "mesh.tensor > 1"),
        ]
    return items


def phase_totals(items: list[Item]) -> dict[str, float]:
    """Bytes per device in each phase, the run-long state included."""
    state = sum(i.bytes for i in items if i.phase == "state")
    phases = dict.fromkeys(i.phase for i in items if i.phase != "state")
    return {p: state + sum(i.bytes for i in items if i.phase == p) for p in phases}
