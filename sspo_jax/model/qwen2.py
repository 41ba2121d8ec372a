"""Qwen2 / Qwen2.5 causal LM in Flax NNX, layers stacked on a leading axis and run by lax.scan.

Parameters keep HF's tensors, transposed to [in, out] (x @ W) and stacked over layers, so loading
and saving are a transpose; heads stay flattened in the parameters ([H, Nq*D]) and are split in
the activations.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from sspo_jax.model import attention as attention_lib
from sspo_jax.model import backend as backend_lib
from sspo_jax.model import cache as kv_cache
from sspo_jax.model import cpu_forms
from sspo_jax.model.config import Qwen2Config
from sspo_jax.model.layers import decoder_layer, rms_norm, rope_cos_sin
from sspo_jax.parallel import constrain, state_shardings

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    What a checkpoint is read into; `kwargs` go to the constructor (dtype, param_dtype, remat,
    attention); the platform is the mesh's unless `platform` is given."""
    if mesh is not None:
        kwargs.setdefault("platform", backend_lib.platform_of(mesh))
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
                 param_dtype: Any = jnp.float32, remat: str = "none", attention: str = "auto",
                 platform: str | None = None):
        """dtype: compute dtype; remat: one of REMAT_POLICIES (per-layer jax.checkpoint policy);
        attention: one of backend.ATTENTION_CHOICES, for `platform` (cpu | gpu | tpu; None: the
        first JAX device's). The two make the model's one platform decision (`self.backend`).
        The model holds no mesh: its activations are constrained to the context mesh
        (`parallel.using_mesh`), which the sampler and the update take from the parameters."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat
        self.backend = backend_lib.resolve(attention, platform, dtype, cfg.head_dim)
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

    def head_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        return jnp.einsum("...h,hv->...v", hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> kv_cache.KVCache:
        """An empty KVCache (dtype default: the compute dtype), laid out on the context mesh if any."""
        cfg = self.config
        cache = kv_cache.init_cache(cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads,
                                    cfg.head_dim, dtype or self.dtype)
        return _constrain_cache(cache)

    # -- forward without a cache (training, scoring) -------------------------------------------

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      cache: kv_cache.KVCache | None = None, *, segment_ids: jax.Array | None = None):
        """[B, T, H] after the final norm (in the compute dtype); with a cache, (hidden, cache).

        attention_mask [B, T]: 1 for real tokens (one sequence per row, positions counting the
        real tokens before); or segment_ids [B, T] int: one id per packed sequence (a contiguous
        run), 0 for padding; each sequence's positions start at 0 (no cache).
        """
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for a forward without a cache; a cached call takes "
                                 "attention_mask")
            return self._cached_hidden(input_ids, attention_mask, cache, None)
        x, _ = self._self_attending(input_ids, attention_mask, segment_ids, keep_kv=False)
        return x

    def _self_attending(self, input_ids, attention_mask, segment_ids, keep_kv: bool):
        """(hidden [B, T, H], per-layer (k, v) [L, B, Hkv, T, D] when keep_kv) of the tokens
        attending among themselves, by the backend's attention."""
        cfg = self.config
        if attention_mask is not None and segment_ids is not None:
            raise ValueError("pass attention_mask or segment_ids, not both")
        if segment_ids is None:
            mask = (jnp.ones(input_ids.shape, jnp.bool_) if attention_mask is None
                    else attention_mask.astype(jnp.bool_))
            segments = mask.astype(jnp.int32)
            positions = jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)
        else:
            segments = segment_ids.astype(jnp.int32)
            positions = attention_lib.segment_positions(segments)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        def attend(q, k, v):
            out = attention_lib.self_attention(q, k, v, segments, self.backend)
            return out, ((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) if keep_kv else None)

        layer = self._layer()

        @self._remat
        def step(x, params):
            return layer(params, x, cos, sin, attend)

        # Unrolled on CPU for training: a rolled loop's backward reads every saved activation
        # from a stacked [L, ...] buffer (zero-filled, then one slice written and one read per
        # layer), which XLA CPU does as separate copies. Still one scan in the jaxpr. A prefill
        # (keep_kv: no backward) stays rolled, which halves the sampler's compile time.
        unroll = cfg.num_hidden_layers if self.backend.cpu_forms and not keep_kv else 1
        x, kv = jax.lax.scan(step, self._embed(input_ids), self.layers.stacked(), unroll=unroll)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), kv

    # -- with a KV cache (generation) ----------------------------------------------------------

    def prefill(self, input_ids: jax.Array, attention_mask: jax.Array, max_len: int,
                cache_dtype: Any = None) -> tuple[jax.Array, kv_cache.KVCache]:
        """(hidden [B, T, H], a new cache of max_len slots holding these T tokens): the prompts
        attend among themselves by the backend's attention (a fused kernel on TPU/GPU), as in a
        forward without a cache, and their keys and values fill the cache's first T slots."""
        b, t = input_ids.shape
        if t > max_len:
            raise ValueError(f"{t} tokens do not fit a KV cache of max_len {max_len}")
        mask = attention_mask.astype(jnp.bool_)
        hidden, (k, v) = self._self_attending(input_ids, mask, None, keep_kv=True)
        cache = self.init_cache(b, max_len, cache_dtype)
        cache = cache.replace(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0,) * 5),
                              v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0,) * 5),
                              mask=jax.lax.dynamic_update_slice(cache.mask, mask, (0, 0)),
                              index=jnp.asarray(t, jnp.int32))
        return hidden, _constrain_cache(cache)

    def decoder(self) -> "Decoder":
        """What a decode loop calls, built once before the loop (inside the jitted program):
        `logits, cache = decoder(token_ids, cache)`, `decoder.head(hidden)`."""
        return Decoder(self, self._cpu_decode_weights() if self.backend.cpu_forms else None)

    def _cpu_decode_weights(self, split_bytes: float | None = None) -> dict[str, Any]:
        """cpu_forms.decode_weights of this model (split_bytes: its default, or given)."""
        total = sum(a.nbytes for a in jax.tree.leaves(nnx.state(self, nnx.Param)))
        head_vh = self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...].T
        return cpu_forms.decode_weights(self.layers.stacked(), head_vh.astype(self.dtype), total, split_bytes)

    def _cached_hidden(self, input_ids, attention_mask, cache, layers):
        """hidden_states with a cache: the T new tokens attend to the cache's real slots and to
        each other, scores materialised (cheap for a decode step: one query row per head), over
        the cache's live prefix only (attention_lib.live_prefix_attention).
        A per-row cache index ([B]) writes each row at its own slot (the continuous engine).
        layers: per-layer weights (cpu_forms.decode_weights) to run unrolled, or None (scan)."""
        cfg = self.config
        b, t = input_ids.shape
        mask = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        if t > cache.max_len:
            raise ValueError(f"{t} tokens do not fit a KV cache of max_len {cache.max_len}")
        if not isinstance(cache.index, jax.core.Tracer) and int(jnp.max(cache.index)) + t > cache.max_len:
            raise ValueError(f"KV cache full: index {int(jnp.max(cache.index))} + {t} tokens > max_len {cache.max_len}")
        real_before = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
        positions = jnp.maximum(cache.mask.sum(-1, dtype=jnp.int32)[:, None] + real_before, 0)
        index = cache.index
        per_row = index.ndim == 1
        if per_row:
            # Each row writes its T new slots at its own index (a scatter, in place in the
            # carried buffers).
            key_mask = jax.vmap(lambda m, u, i: jax.lax.dynamic_update_slice(m, u, (i,)))(cache.mask, mask, index)
            q_slot = index[:, None] + jnp.arange(t)                                  # [B, T]
        else:
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            q_slot = jnp.broadcast_to(index + jnp.arange(t), (b, t))
        k_slot = jnp.arange(cache.max_len)
        visible = key_mask[:, None, :] & (k_slot[None, None, :] <= q_slot[:, :, None])  # [B, T, S]
        live = jnp.max(index) + t  # slots at or after this hold nothing any row can see
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        layer = self._layer()

        def attend_cache(kv, i):
            def attend(q, k, v):
                # Only the T new slots of the (carried) buffers change: updated in place.
                if per_row:
                    # One scatter straight into the [L, B, Hkv, S, D] buffer (slicing the
                    # layer out and back would copy it twice per step).
                    rows = jnp.arange(b)[:, None]
                    slots = q_slot                                                   # [B, T]
                    k_all = kv[0].at[i, rows, :, slots].set(k.astype(kv[0].dtype), mode="drop")
                    v_all = kv[1].at[i, rows, :, slots].set(v.astype(kv[1].dtype), mode="drop")
                else:
                    k_new, v_new = (jnp.swapaxes(a, 1, 2).astype(kv[0].dtype) for a in (k, v))  # [B, Hkv, T, D]
                    at = (i, 0, 0, index, 0)
                    k_all = jax.lax.dynamic_update_slice(kv[0], k_new[None], at)
                    v_all = jax.lax.dynamic_update_slice(kv[1], v_new[None], at)
                k_i = jax.lax.dynamic_index_in_dim(k_all, i, 0, keepdims=False).astype(self.dtype)
                v_i = jax.lax.dynamic_index_in_dim(v_all, i, 0, keepdims=False).astype(self.dtype)
                return attention_lib.live_prefix_attention(q, k_i, v_i, visible, live), (k_all, v_all)
            return attend

        x = self._embed(input_ids)
        kv = (cache.k, cache.v)
        if layers is not None:
            for i, params in enumerate(layers):  # unrolled: each layer's weights are their own arrays
                x, kv = layer(params, x, cos, sin, attend_cache(kv, i))
        else:
            # The whole cache is a scan CARRY, not xs/ys: each layer writes only its T new slots
            # in place (ys would materialise and copy a fresh [L, ...] cache every call).
            @self._remat
            def step(carry, xs):
                x, layer_kv = carry
                params, i = xs
                return layer(params, x, cos, sin, attend_cache(layer_kv, i)), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, kv), _ = jax.lax.scan(step, (x, kv), (self.layers.stacked(), layer_ids))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return x, _constrain_cache(cache.replace(k=kv[0], v=kv[1], mask=key_mask, index=cache.index + t))

    # -- pieces --------------------------------------------------------------------------------

    def _embed(self, input_ids):
        # Gather from a table whole along the vocabulary (still FSDP-split along embed): XLA
        # cannot partition a gather over a vocab-sharded table and would replicate it entirely.
        table = constrain(self.embed[...], (None, "embed"))
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "seq", "act_embed"))

    def _layer(self):
        cfg = self.config
        return functools.partial(
            decoder_layer, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, dtype=self.dtype, cpu=self.backend.cpu_forms)

    def _remat(self, f):
        if self.remat == "none":
            return f
        return jax.checkpoint(f, policy=REMAT_POLICIES[self.remat], prevent_cse=False)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 cache: kv_cache.KVCache | None = None, *, segment_ids: jax.Array | None = None):
        """logits [B, T, V] float32; with a cache, (logits, updated cache)."""
        out = self.hidden_states(input_ids, attention_mask, cache, segment_ids=segment_ids)
        hidden, new_cache = (out, None) if cache is None else out
        logits = constrain(self.head_logits(hidden), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, new_cache)


class Decoder:
    """A decode loop's view of the model (`Qwen2ForCausalLM.decoder()`): the same numbers as the
    model's cached call and head; on CPU from weights sliced per layer once (cpu_forms)."""

    def __init__(self, model: Qwen2ForCausalLM, weights: dict[str, Any] | None = None):
        self.model, self.weights = model, weights

    def __call__(self, input_ids: jax.Array, cache: kv_cache.KVCache,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, kv_cache.KVCache]:
        layers = None if self.weights is None else self.weights["layers"]
        hidden, cache = self.model._cached_hidden(input_ids, attention_mask, cache, layers)
        return constrain(self.head(hidden), ("batch", "seq", "vocab")), cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        if self.weights is None:
            return self.model.head_logits(hidden)
        return cpu_forms.head_logits(hidden, self.weights["head_vh"])


def _constrain_cache(cache: kv_cache.KVCache) -> kv_cache.KVCache:
    return cache.replace(k=constrain(cache.k, kv_cache.KV_AXES), v=constrain(cache.v, kv_cache.KV_AXES),
                         mask=constrain(cache.mask, kv_cache.MASK_AXES))
