"""The Qwen2 decoder math as pure functions over arrays (the module in qwen2.py holds the state).

Dtype policy: matmuls run in the compute dtype; norms, rotary, softmax in float32. These are the
general forms; on CPU the model traces model/cpu_forms.py's instead (its Backend decides).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sspo_jax.model import cpu_forms
from sspo_jax.parallel import constrain


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


# attend(q [B, T, Nq, D], k, v [B, T, Hkv, D]) -> (out [B, T, Nq, D], aux): the layer's attention
# over whatever keys its caller holds (its own tokens, or a cache it writes k, v into: aux).
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def decoder_layer(p: dict[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array, attend: Attend, *,
                  num_heads: int, num_kv_heads: int, head_dim: int, eps: float, dtype: Any,
                  cpu: bool = False) -> tuple[jax.Array, Any]:
    """One pre-norm block: x [B, T, H] in `dtype` -> (x, what `attend` returned besides its output).

    p: this layer's parameters (no layer axis; on CPU a matrix may be a tuple of column blocks,
    `cpu_forms.decode_weights`). cpu: trace cpu_forms' projections and rotary.
    """
    b, t, _ = x.shape
    w = {name: tuple(part.astype(dtype) for part in a) if isinstance(a, tuple) else a.astype(dtype)
         for name, a in p.items()}
    mm = (lambda a, name: cpu_forms.dense(a, w[name])) if cpu else (lambda a, name: a @ w[name])
    rope = cpu_forms.apply_rope if cpu else apply_rope

    h = rms_norm(x, p["input_norm"], eps)
    q = mm(h, "q_w") + w["q_b"]
    k = mm(h, "k_w") + w["k_b"]
    val = mm(h, "v_w") + w["v_b"]
    q = constrain(q, ("batch", "seq", "heads")).reshape(b, t, num_heads, head_dim)
    k = constrain(k, ("batch", "seq", "kv_heads")).reshape(b, t, num_kv_heads, head_dim)
    val = val.reshape(b, t, num_kv_heads, head_dim)
    q, k = rope(q, cos, sin), rope(k, cos, sin)

    attn, aux = attend(q, k, val)
    x = x + constrain(mm(attn.reshape(b, t, num_heads * head_dim), "o_w"), ("batch", "seq", "act_embed"))

    h = rms_norm(x, p["post_norm"], eps)
    gate = constrain(mm(h, "gate_w"), ("batch", "seq", "mlp"))
    up = mm(h, "up_w")
    x = x + constrain(mm(jax.nn.silu(gate) * up, "down_w"), ("batch", "seq", "act_embed"))
    return x, aux
