"""Qwen2 / Qwen2.5 causal LM in Flax NNX, layers stacked on a leading axis and run by lax.scan.

Parameters keep HF's tensors, transposed to [in, out] (x @ W) and stacked over layers, so loading
and saving are a transpose; heads stay flattened in the parameters ([H, Nq*D]) and are split in
the activations.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from sspo_jax.model import cache as kv_cache
from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.layers import cpu_tuned, decoder_layer, rms_norm, rope_cos_sin
from sspo_jax.parallel import constrain, state_shardings

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# decode_weights: in a model of at least DECODE_SPLIT_MODEL_BYTES of weights (more than a CPU's
# last-level cache holds: each decode step streams them from DRAM), matrices of at least
# DECODE_SPLIT_BYTES come in DECODE_SPLIT_PARTS blocks (BENCHMARKS.md: "decode weights' output
# blocks" has the measurements behind the thresholds).
DECODE_SPLIT_MODEL_BYTES = 64 << 20
DECODE_SPLIT_BYTES = 1 << 20
DECODE_SPLIT_PARTS = 2


def _split_output(a: jax.Array, *, axis: int, split_bytes: float) -> jax.Array | tuple[jax.Array, ...]:
    """`a` as DECODE_SPLIT_PARTS blocks along `axis` (sizes differing by at most one) when it has
    `split_bytes` or more, else `a` itself."""
    if a.nbytes < split_bytes or a.shape[axis] < DECODE_SPLIT_PARTS:
        return a
    return tuple(jnp.array_split(a, DECODE_SPLIT_PARTS, axis=axis))


def layer_param_specs(cfg: Qwen2Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, logical axes) of ONE decoder layer's parameters, [in, out] layout."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "input_norm": ((h,), ("norm",)),
        "q_w": ((h, q), ("embed", "heads")),
        "q_b": ((q,), ("heads",)),
        "k_w": ((h, kv), ("embed", "kv_heads")),
        "k_b": ((kv,), ("kv_heads",)),
        "v_w": ((h, kv), ("embed", "kv_heads")),
        "v_b": ((kv,), ("kv_heads",)),
        "o_w": ((q, h), ("heads", "embed")),
        "post_norm": ((h,), ("norm",)),
        "gate_w": ((h, i), ("embed", "mlp")),
        "up_w": ((h, i), ("embed", "mlp")),
        "down_w": ((i, h), ("mlp", "embed")),
    }


def _param(value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
    # Logical names in flax's `out_sharding` metadata; placement is sspo_jax.parallel's job,
    # so no eager sharding at creation.
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def abstract_model(config: Qwen2Config, *, mesh: Mesh | None = None, **kwargs) -> "Qwen2ForCausalLM":
    """A Qwen2ForCausalLM that holds no data: every parameter a `jax.ShapeDtypeStruct` with
    the sharding it gets on `mesh` by its logical axes (on the first device without a mesh).
    What a checkpoint is read into; `kwargs` go to the constructor (dtype, param_dtype, remat)."""
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0), **kwargs))
    state = nnx.state(model)
    shardings = (state_shardings(state, mesh) if mesh is not None else
                 jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), state,
                              is_leaf=lambda x: isinstance(x, nnx.Variable)))
    nnx.update(model, jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                   state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


class DecoderStack(nnx.Module):
    """All decoder layers' parameters, each with a leading [L] axis."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs, param_dtype: Any):
        normal = nnx.initializers.normal(0.02)
        self.names = tuple(layer_param_specs(cfg))
        for name, (shape, axes) in layer_param_specs(cfg).items():
            full = (cfg.num_hidden_layers, *shape)
            if name.endswith("norm"):
                value = jnp.ones(full, param_dtype)
            elif name.endswith("_b"):
                value = jnp.zeros(full, param_dtype)
            else:
                value = normal(rngs.params(), full, param_dtype)
            setattr(self, name, _param(value, ("layers", *axes)))

    def stacked(self) -> dict[str, jax.Array]:
        """name -> [L, ...] array."""
        return {name: getattr(self, name)[...] for name in self.names}


class Qwen2ForCausalLM(nnx.Module):
    """Qwen2 decoder + LM head. See docs/design.md (Model) for the calling contract."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: str = "none"):
        """dtype: compute dtype; remat: one of REMAT_POLICIES (per-layer jax.checkpoint policy).
        The model holds no mesh: its activations are constrained to the context mesh
        (`parallel.using_mesh`), which the sampler and the update take from the parameters."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        normal = nnx.initializers.normal(0.02)
        self.embed = _param(normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
                            ("vocab", "embed"))
        self.layers = DecoderStack(cfg, rngs=rngs, param_dtype=param_dtype)
        self.final_norm = _param(jnp.ones((cfg.hidden_size,), param_dtype), ("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype),
                                  ("embed", "vocab"))

    def lm_head_weight(self) -> jax.Array:
        """[H, V] in the compute dtype: the embedding transposed when tied."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T.astype(self.dtype)
        return self.lm_head[...].astype(self.dtype)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> kv_cache.KVCache:
        """An empty KVCache (dtype default: the compute dtype), laid out on the context mesh if any."""
        cfg = self.config
        cache = kv_cache.init_cache(cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads,
                                    cfg.head_dim, dtype or self.dtype)
        return cache.replace(k=constrain(cache.k, kv_cache.KV_AXES), v=constrain(cache.v, kv_cache.KV_AXES),
                             mask=constrain(cache.mask, kv_cache.MASK_AXES))

    def decode_weights(self, split_bytes: float | None = None) -> dict[str, Any]:
        """The weights as a decode loop reads them fastest on XLA CPU: "layers", a tuple of L
        per-layer parameter dicts (no layer axis), and "lm_head_vh" [V, H] in the compute dtype
        (the head vocabulary-major: the tied embedding as it is, an untied head transposed once).
        A matrix of `split_bytes` or more comes as a tuple of DECODE_SPLIT_PARTS blocks of its
        output axis (columns of a [in, out] weight, rows of the [V, H] head); by default
        DECODE_SPLIT_BYTES in a model of DECODE_SPLIT_MODEL_BYTES or more, else none.

        Build this once before a decode loop and pass it as `weights=` to every step: XLA on CPU
        copies a layer's slice out of the stacked [L, ...] parameters on every use, so slicing
        once outside the loop saves a full weight copy per token. The head vocabulary-major makes
        each logit one contiguous row of the weights. The blocks are independent dots that XLA's
        thunk executor runs on two threads at once, which helps a model whose weights stream
        from DRAM every step; a model that fits the cache only pays for the extra dots, hence
        the model-size threshold (the measurements: BENCHMARKS.md).
        """
        stacked = self.layers.stacked()
        if split_bytes is None:
            total = sum(a.nbytes for a in jax.tree.leaves(nnx.state(self, nnx.Param)))
            split_bytes = DECODE_SPLIT_BYTES if total >= DECODE_SPLIT_MODEL_BYTES else math.inf
        split = functools.partial(_split_output, split_bytes=split_bytes)
        layers = tuple({name: split(a[i], axis=-1) if a.ndim == 3 else a[i] for name, a in stacked.items()}
                       for i in range(self.config.num_hidden_layers))
        head_vh = (self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...].T)
        return {"layers": layers, "lm_head_vh": split(head_vh.astype(self.dtype), axis=0)}

    def head_logits(self, hidden: jax.Array, weights: dict[str, Any] | None = None) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]; with `decode_weights()`, from their
        vocabulary-major head (the same products, in the layout XLA CPU reads fastest)."""
        if weights is None:
            return jnp.einsum("...h,hv->...v", hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)
        head = weights["lm_head_vh"]
        blocks = head if isinstance(head, tuple) else (head,)
        logits = [jnp.einsum("...h,vh->...v", hidden, b, preferred_element_type=jnp.float32) for b in blocks]
        return logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      cache: kv_cache.KVCache | None = None, layers: tuple[dict, ...] | None = None):
        """[B, T, H] after the final norm (in the compute dtype); with a cache, (hidden, cache).

        layers: `decode_weights()["layers"]`; with it (a cache is required) the layers run unrolled
        from those arrays instead of scanning the stacked parameters.
        """
        cfg = self.config
        b, t = input_ids.shape
        mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        real_before = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1  # [B, T]
        if layers is not None and cache is None:
            raise ValueError("per-layer decode weights need a cache; call without weights= for a plain forward")
        if cache is None:
            positions = jnp.maximum(real_before, 0)
            key_mask, q_slot, k_slot, index, kv = mask, jnp.arange(t), jnp.arange(t), None, None
        else:
            if t > cache.max_len:
                raise ValueError(f"{t} tokens do not fit a KV cache of max_len {cache.max_len}")
            if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + t > cache.max_len:
                raise ValueError(f"KV cache full: index {int(cache.index)} + {t} tokens > max_len {cache.max_len}")
            positions = jnp.maximum(cache.mask.sum(-1, dtype=jnp.int32)[:, None] + real_before, 0)
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            q_slot, k_slot, kv = index + jnp.arange(t), jnp.arange(cache.max_len), (cache.k, cache.v)
        visible = key_mask[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])  # [B, T, S]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        # Gather from a table whole along the vocabulary (still FSDP-split along embed): XLA
        # cannot partition a gather over a vocab-sharded table and would replicate it entirely.
        table = constrain(self.embed[...], (None, "embed"))
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))
        # On XLA CPU: the forms of layers.cpu_tuned, and the layer scan fully unrolled.
        cpu = cpu_tuned()
        layer = functools.partial(
            decoder_layer, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, dtype=self.dtype,
            cpu_forms=cpu)

        remat = (lambda f: f) if self.remat == "none" else functools.partial(
            jax.checkpoint, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stacked = self.layers.stacked()
        if cache is None:
            @remat
            def step(x, params):
                return layer(params, x, cos, sin, visible, None, None)[0], None

            # Unrolled on CPU: a rolled loop's backward reads every saved activation from a
            # stacked [L, ...] buffer (zero-filled, then one slice written and one read per
            # layer), which XLA CPU does as separate copies. Still one scan in the jaxpr.
            x, _ = jax.lax.scan(step, x, stacked, unroll=cfg.num_hidden_layers if cpu else 1)
        elif layers is not None:
            new_kv = kv
            for i, params in enumerate(layers):  # unrolled: each layer's weights are their own arrays
                x, new_kv = layer(params, x, cos, sin, visible, new_kv, (i, index))
        else:
            # The whole cache is a scan CARRY, not xs/ys: each layer writes only its T new slots
            # in place (ys would materialise and copy a fresh [L, ...] cache every call).
            @remat
            def step(carry, xs):
                x, layer_kv = carry
                params, i = xs
                return layer(params, x, cos, sin, visible, layer_kv, (i, index)), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, new_kv), _ = jax.lax.scan(step, (x, kv), (stacked, layer_ids))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if cache is None:
            return x
        k, v = (constrain(a, kv_cache.KV_AXES) for a in new_kv)
        key_mask = constrain(key_mask, kv_cache.MASK_AXES)
        return x, cache.replace(k=k, v=v, mask=key_mask, index=cache.index + t)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: kv_cache.KVCache | None = None, weights: dict[str, Any] | None = None):
        """logits [B, T, V] float32; with a cache, (logits, updated cache).

        weights: `decode_weights()`, built once outside a decode loop (needs a cache); same result.
        """
        out = self.hidden_states(input_ids, attention_mask, cache, None if weights is None else weights["layers"])
        hidden, new_cache = (out, None) if cache is None else out
        logits = constrain(self.head_logits(hidden, weights), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, new_cache)
