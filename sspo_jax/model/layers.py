"""The Qwen2 decoder math as pure functions over arrays (the module in qwen2.py holds the state).

Dtype policy: matmuls run in the compute dtype; norms, rotary, softmax in float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sspo_jax.parallel import constrain

# Finite, so a query row with no visible key (a left-pad position) softmaxes to uniform, not NaN.
MASK_VALUE = -1e30
CAUSAL_BLOCKS = 4  # query blocks of causal_block_attention


def cpu_tuned() -> bool:
    """Whether to trace the forms tuned for XLA's CPU backend (`dense` with flat tokens,
    `apply_rope_no_concat`, `causal_block_attention`, the unrolled layer scan in qwen2.py).
    Read at trace time; other backends keep the general forms, and
    tests/test_update_speed_paths.py checks that both give the same results."""
    return jax.default_backend() == "cpu"


def dense(x: jax.Array, w: jax.Array, flat_tokens: bool) -> jax.Array:
    """x [..., in] @ w [in, out]; flat_tokens: as one 2-D matmul over all leading axes.

    The same product either way. The flat form is for XLA CPU: w's gradient then contracts one
    token axis instead of two (B and T), and XLA CPU lowers the two-axis contraction by first
    transposing the whole [B, T, out] gradient in a slow strided copy (in a profile of the 5m
    benchmark's update, about a third of the time went to those copies).
    """
    if not flat_tokens:
        return x @ w
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def dense_blocks(x: jax.Array, w: jax.Array | tuple[jax.Array, ...], flat_tokens: bool) -> jax.Array:
    """`dense` where w may be a tuple of column blocks [in, out_i] (decode weights): the blocks'
    products side by side, i.e. x @ concatenate(w, axis=1)."""
    if not isinstance(w, tuple):
        return dense(x, w, flat_tokens)
    return jnp.concatenate([dense(x, block, flat_tokens) for block in w], axis=-1)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, 1, head_dim/2] float32 (broadcast over heads)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, N, D] (halves convention of HF `rotate_half`), in float32."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope_no_concat(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` without a concatenate (the CPU form), from the same products and sums.

    x is viewed as its two halves [..., 2, D/2]: out = halves * cos + swapped halves * (-sin,
    +sin), i.e. x1*cos + x2*(-sin) and x2*cos + x1*sin. XLA CPU runs `apply_rope`'s concatenate
    as a slow per-element fusion, and its gradient as pads and another concatenate.
    """
    x32 = x.astype(jnp.float32)
    halves = x32.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    signed_sin = jnp.stack([-sin, sin], axis=-2)  # [B, T, 1, 2, D/2]: small, once per call
    out = halves * cos[..., None, :] + halves[..., ::-1, :] * signed_sin
    return out.reshape(x.shape).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Grouped-query attention without copying k/v per query head.

    q: [B, T, Nq, D]; k, v: [B, Hkv, S, D] (heads before slots: the dot's batch dims lead, so
    XLA needs no transpose of the cache); visible: [B, T, S] bool. Returns [B, T, Nq, D].
    Query head n uses kv head n // (Nq // Hkv), as in HF's repeat_kv.
    """
    b, t, nq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, t, hkv, nq // hkv, d)  # [B, T, Hkv, G, D]
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, Hkv, G, T, S]
    # Batch dims leading in the output too: XLA CPU then runs this dot in its YNNPACK fusion;
    # with the "btkgd" output it fell back to a slower generic batched dot (BENCHMARKS.md). The
    # transpose is of the small result.
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d)


def _heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """`attention`, with the query heads moved before the tokens first ([B, Hkv, G*T, D]): both
    dots are then plain batched matmuls, and XLA CPU copies no [.., T, S] scores to transpose."""
    b, t, nq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = nq // hkv
    qh = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(visible[:, None, None], scores.reshape(b, hkv, g, t, s), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d)


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                           num_blocks: int = CAUSAL_BLOCKS) -> jax.Array:
    """`attention` when the keys are the queries' own T tokens in order (no cache), in query blocks.

    `visible` must hide every later token (key j from query i when j > i): then no query of a
    block sees a key after the block's last token, and the block skips those keys. With 4 blocks
    that is 3/8 of the scores, and of their matmuls, softmax and gradient (XLA CPU has no fused
    attention to skip them). A query that sees no key at all (a left pad) gets the mean of the
    values up to its block's end instead of all T: a different number, in a position that no
    real token reads.
    """
    t = q.shape[1]
    size = -(-t // num_blocks)
    outs = []
    for lo in range(0, t, size):
        hi = min(t, lo + size)
        outs.append(_heads_major_attention(q[:, lo:hi], k[:, :, :hi], v[:, :, :hi], visible[:, lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


def decoder_layer(p: dict[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array,
                  visible: jax.Array, kv: tuple[jax.Array, jax.Array] | None,
                  slot: tuple[jax.Array, jax.Array] | None, *, num_heads: int, num_kv_heads: int,
                  head_dim: int, eps: float, dtype: Any,
                  cpu_forms: bool = False) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block. x: [B, T, H] in `dtype`; p: this layer's parameters (no layer axis;
    a matrix may be a tuple of column blocks, as in `Qwen2ForCausalLM.decode_weights`).

    Without a cache (kv None) the keys are this call's T tokens. With a cache, kv = (k, v) are
    ALL layers' caches, each [L, B, Hkv, S, D], and slot = (layer, index): the T new keys are
    written at [layer, :, :, index:index + T] and the updated pair is returned. Only those T slots
    change, so XLA updates the (carried) buffers in place instead of copying the cache.
    cpu_forms: the forms for XLA CPU (`cpu_tuned`): 2-D projections (`dense`),
    `apply_rope_no_concat` and, without a cache, `causal_block_attention`.
    """
    b, t, _ = x.shape
    w = {name: tuple(part.astype(dtype) for part in a) if isinstance(a, tuple) else a.astype(dtype)
         for name, a in p.items()}

    mm = lambda a, name: dense_blocks(a, w[name], cpu_forms)  # noqa: E731
    h = rms_norm(x, p["input_norm"], eps)
    q = mm(h, "q_w") + w["q_b"]
    k = mm(h, "k_w") + w["k_b"]
    val = mm(h, "v_w") + w["v_b"]
    q = constrain(q, ("batch", "seq", "heads")).reshape(b, t, num_heads, head_dim)
    k = constrain(k, ("batch", "seq", "kv_heads")).reshape(b, t, num_kv_heads, head_dim)
    val = val.reshape(b, t, num_kv_heads, head_dim)
    rope = apply_rope_no_concat if cpu_forms else apply_rope
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, val = jnp.swapaxes(k, 1, 2), jnp.swapaxes(val, 1, 2)  # [B, Hkv, T, D]

    new_kv = None
    if kv is not None:
        layer, index = slot
        at = (layer, 0, 0, index, 0)
        k_all = jax.lax.dynamic_update_slice(kv[0], k[None].astype(kv[0].dtype), at)
        v_all = jax.lax.dynamic_update_slice(kv[1], val[None].astype(kv[1].dtype), at)
        new_kv = (k_all, v_all)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dtype)  # [B, Hkv, S, D]
        val = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dtype)

    attend = causal_block_attention if cpu_forms and kv is None else attention
    attn = attend(q, k, val, visible).reshape(b, t, num_heads * head_dim)
    x = x + constrain(mm(attn, "o_w"), ("batch", "seq", "act_embed"))

    h = rms_norm(x, p["post_norm"], eps)
    gate = constrain(mm(h, "gate_w"), ("batch", "seq", "mlp"))
    up = mm(h, "up_w")
    x = x + constrain(mm(jax.nn.silu(gate) * up, "down_w"), ("batch", "seq", "act_embed"))
    return x, new_kv
