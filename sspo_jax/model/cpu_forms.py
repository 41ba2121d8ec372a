"""The forms tuned for XLA's CPU backend, in one place (used when `Backend.cpu_forms`).

Each gives the general form's numbers (tests/test_update_speed_paths.py checks the model both
ways); they exist because XLA CPU has no fused attention and lowers some layouts with slow
copies (profiles and measurements: BENCHMARKS.md). The model also unrolls its layer scan on CPU
and decodes from `decode_weights` (qwen2.py reads both from the Backend).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from sspo_jax.model.attention import MASK_VALUE, segment_mask

CAUSAL_BLOCKS = 4  # query blocks of causal_block_attention

# decode_weights: in a model of at least DECODE_SPLIT_MODEL_BYTES of weights (more than a CPU's
# last-level cache holds: each decode step streams them from DRAM), matrices of at least
# DECODE_SPLIT_BYTES come in DECODE_SPLIT_PARTS blocks (BENCHMARKS.md: "decode weights' output
# blocks" has the measurements behind the thresholds).
DECODE_SPLIT_MODEL_BYTES = 64 << 20
DECODE_SPLIT_BYTES = 1 << 20
DECODE_SPLIT_PARTS = 2


def dense(x: jax.Array, w: jax.Array | tuple[jax.Array, ...]) -> jax.Array:
    """x [..., in] @ w [in, out] as one 2-D matmul over all leading axes; w may be a tuple of
    column blocks [in, out_i] (decode weights): their products side by side.

    The flat form: w's gradient then contracts one token axis instead of two (B and T), and XLA
    CPU lowers the two-axis contraction by first transposing the whole [B, T, out] gradient in a
    slow strided copy (in a profile of the 5m benchmark's update, about a third of the time).
    """
    if isinstance(w, tuple):
        return jnp.concatenate([dense(x, block) for block in w], axis=-1)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`layers.apply_rope` without a concatenate, from the same products and sums.

    x is viewed as its two halves [..., 2, D/2]: out = halves * cos + swapped halves * (-sin,
    +sin), i.e. x1*cos + x2*(-sin) and x2*cos + x1*sin. XLA CPU runs the concatenate as a slow
    per-element fusion, and its gradient as pads and another concatenate.
    """
    x32 = x.astype(jnp.float32)
    halves = x32.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    signed_sin = jnp.stack([-sin, sin], axis=-2)  # [B, T, 1, 2, D/2]: small, once per call
    out = halves * cos[..., None, :] + halves[..., ::-1, :] * signed_sin
    return out.reshape(x.shape).astype(x.dtype)


def _heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """`attention.cached_attention` with the query heads moved before the tokens ([B, Hkv, G*T,
    D]): both dots are plain batched matmuls, and XLA CPU copies no [.., T, S] scores to transpose.
    k, v: [B, Hkv, S, D]."""
    b, t, nq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = nq // hkv
    qh = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(visible[:, None, None], scores.reshape(b, hkv, g, t, s), MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, nq, d)


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                           num_blocks: int = CAUSAL_BLOCKS) -> jax.Array:
    """`attention.xla_attention` (same inputs) in query blocks: no query of a block sees a key
    after the block's last token, so the block skips those keys. With 4 blocks that is 3/8 of
    the scores, and of their matmuls, softmax and gradient. The same numbers: a skipped key has
    weight exp(MASK_VALUE - max) = 0 in the full form."""
    t = q.shape[1]
    visible = segment_mask(segment_ids)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, T, D]
    size = -(-t // num_blocks)
    outs = []
    for lo in range(0, t, size):
        hi = min(t, lo + size)
        outs.append(_heads_major_attention(q[:, lo:hi], kh[:, :, :hi], vh[:, :, :hi], visible[:, lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


def _split_output(a: jax.Array, *, axis: int, split_bytes: float) -> jax.Array | tuple[jax.Array, ...]:
    """`a` as DECODE_SPLIT_PARTS blocks along `axis` (sizes differing by at most one) when it has
    `split_bytes` or more, else `a` itself."""
    if a.nbytes < split_bytes or a.shape[axis] < DECODE_SPLIT_PARTS:
        return a
    return tuple(jnp.array_split(a, DECODE_SPLIT_PARTS, axis=axis))


def decode_weights(stacked: dict[str, jax.Array], head_vh: jax.Array, total_bytes: int,
                   split_bytes: float | None = None) -> dict[str, Any]:
    """The weights as a decode loop reads them fastest on XLA CPU: "layers", a tuple of per-layer
    parameter dicts (no layer axis), and "head_vh" [V, H] (the LM head vocabulary-major, so each
    logit is one contiguous row). A matrix of `split_bytes` or more comes as a tuple of
    DECODE_SPLIT_PARTS blocks of its output axis; by default DECODE_SPLIT_BYTES in a model of
    DECODE_SPLIT_MODEL_BYTES (`total_bytes`) or more, else none.

    Built once before a decode loop: XLA CPU copies a layer's slice out of the stacked [L, ...]
    parameters on every use, so slicing once outside the loop saves a full weight copy per token.
    The blocks are independent dots that XLA's thunk executor runs on two threads at once, which
    helps a model whose weights stream from DRAM every step; a model that fits the cache only
    pays for the extra dots, hence the model-size threshold.
    """
    if split_bytes is None:
        split_bytes = DECODE_SPLIT_BYTES if total_bytes >= DECODE_SPLIT_MODEL_BYTES else math.inf
    num_layers = next(iter(stacked.values())).shape[0]
    layers = tuple({name: _split_output(a[i], axis=-1, split_bytes=split_bytes) if a.ndim == 3 else a[i]
                    for name, a in stacked.items()} for i in range(num_layers))
    return {"layers": layers, "head_vh": _split_output(head_vh, axis=0, split_bytes=split_bytes)}


def head_logits(hidden: jax.Array, head_vh: jax.Array | tuple[jax.Array, ...]) -> jax.Array:
    """hidden [..., H] -> float32 logits [..., V] from a vocabulary-major head (or its blocks)."""
    blocks = head_vh if isinstance(head_vh, tuple) else (head_vh,)
    logits = [jnp.einsum("...h,vh->...v", hidden, b, preferred_element_type=jnp.float32) for b in blocks]
    return logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)
