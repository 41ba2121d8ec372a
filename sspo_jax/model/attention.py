"""Grouped-query attention: the reference (`xla`), the fused kernels (`splash`, `cudnn`), and the
cached form a decode step uses. Which one a model runs is its Backend's decision (backend.py).

Every self-attention path takes the same inputs: q [B, T, Nq, D]; k, v [B, T, Hkv, D] (this
call's tokens); segment_ids [B, T] int32, one id per sequence packed in a row and 0 for padding.
Key j is visible from query i when both are in the same segment and j <= i. Padding tokens are
a segment of their own too (they see the padding before them), so no query row is empty: every
path is finite everywhere and the paths agree at every position, padding included (no real
token reads a padding position). A segment is one contiguous run of a row; ids need not be
ordered. Query head n uses kv head n // (Nq // Hkv), as in HF's repeat_kv.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sspo_jax.model.backend import Backend
from sspo_jax.parallel import logical_to_spec

# Finite, so a query row with no visible key (a left-pad query of a cached prefill) softmaxes to
# uniform, not NaN.
MASK_VALUE = -1e30
SPLASH_BLOCK = 512    # splash's query/key block; shorter sequences use one block (a multiple of 128)
SPLASH_ALIGN = 128    # the TPU lane width: splash blocks are multiples of it
CUDNN_ALIGN = 8       # cudnn_attention pads T to a multiple of this


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> each token's index within its segment (its contiguous run of equal ids): the
    rotary positions of packed sequences, each starting at 0."""
    t = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> visible [B, T, T] bool: same segment, key not after the query."""
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal[None]


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """Attention over given key slots, scores materialised (float32): the decode step's form
    (one query: a [S] row of scores per head), and the `xla` reference.

    q: [B, T, Nq, D]; k, v: [B, Hkv, S, D] (heads before slots, the cache's layout: the dot's
    batch dims lead, so XLA needs no transpose of the cache); visible: [B, T, S] bool.
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


LIVE_PREFIXES = 4  # live_prefix_attention's static prefix lengths per cache


def live_prefix_lengths(max_len: int) -> tuple[int, ...]:
    """The static cache prefixes live_prefix_attention chooses from: j/LIVE_PREFIXES of the
    cache for j = 1..LIVE_PREFIXES, rounded up to 128 slots (8 for a cache under 1024)."""
    align = 128 if max_len >= 1024 else 8
    return tuple(sorted({min(max_len, -(-max_len * j // LIVE_PREFIXES // align) * align)
                         for j in range(1, LIVE_PREFIXES + 1)}))


def live_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array,
                          live: jax.Array) -> jax.Array:
    """cached_attention reading only the cache's first slots: the shortest static prefix that
    holds every slot before `live` (int32[]: no row sees a slot at or after it). A decode step's
    cost then follows the filled part of the cache (within 1/LIVE_PREFIXES of it), not its
    length; the numbers are those of the whole cache (an unseen slot has weight exactly 0)."""
    lengths = live_prefix_lengths(k.shape[2])
    if len(lengths) == 1:
        return cached_attention(q, k, v, visible)
    branches = [functools.partial(_prefix_attention, n=n) for n in lengths]
    which = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths, jnp.int32), live), len(lengths) - 1)
    return jax.lax.switch(which, branches, q, k, v, visible)


def _prefix_attention(q, k, v, visible, *, n: int):
    return cached_attention(q, k[:, :, :n], v[:, :, :n], visible[..., :n])


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The reference: [B, Hkv, G, T, T] float32 scores, masked and softmaxed."""
    return cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), segment_mask(segment_ids))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention (`jax.nn.dot_product_attention`, implementation="cudnn"): causal in
    the kernel, the segments as a [B, 1, T, T] mask (one per row, shared by the heads; jax turns
    it into an additive bias in the compute dtype, and the backward also writes its unused
    gradient: 2 B T^2 bytes each way per layer, against the `xla` path's 4-6 B heads T^2). No
    [T, T] scores per head exist, forward or backward. (cuDNN's packed layout, sequence offsets
    instead of a bias, is reachable only through JAX's private API; not used.)
    implementation="xla": the same call through JAX's reference (tests off a GPU).

    T is padded to a multiple of CUDNN_ALIGN (a segment of its own, sliced off): cuDNN's
    backward with a bias needs an even length."""
    t = q.shape[1]
    pad = -t % CUDNN_ALIGN
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=implementation)
    return out[:, :t]


def _splash_kernel(t: int, groups: int, block: int, interpret: bool):
    """The MQA splash kernel for one kv head's `groups` query heads over a causal [t, t] mask
    (built at trace time: it holds the mask's block structure as arrays of that trace)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * groups)
    return sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    """splash on arrays of one device: q [B, T, Hkv, G, D] (pre-scaled), k, v [B, T, Hkv, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    b, t, hkv, g, d = q.shape
    padded = -(-t // SPLASH_ALIGN) * SPLASH_ALIGN
    # The largest block of SPLASH_BLOCK, 256, 128 that divides the padded length (so T = 600
    # pads to 640 in blocks of 128, not to 1024).
    block = next(blk for blk in (SPLASH_BLOCK, 256, SPLASH_ALIGN) if padded % blk == 0) if padded > SPLASH_BLOCK else padded
    if padded != t:  # the tail is a segment no real token is in (id -1), sliced off below
        pad = padded - t
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    kernel = _splash_kernel(padded, g, block, interpret)
    qh = q.transpose(0, 2, 3, 1, 4)                      # [B, Hkv, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]

    def row(q_r, k_r, v_r, seg_r):
        ids = SegmentIds(q=seg_r, kv=seg_r)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(q_r, k_r, v_r)

    out = jax.vmap(row)(qh, kh, vh, segment_ids)         # [B, Hkv, G, T, D]
    return out.transpose(0, 3, 1, 2, 4)[:, :t]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas TPU splash attention (causal, segment ids, GQA as one MQA kernel per kv head).

    Under a mesh the kernel runs per device in `shard_map`: rows split like the batch axis, kv
    heads (with their query heads) like `kv_heads`, each where the mesh axis divides the size,
    else the query heads of each kv head like `heads` (2 kv heads on a 4-way tensor axis: each
    device runs its share of every group), else replicated; the sequence whole.
    interpret: through Pallas's interpreter (off a TPU; exact, slow)."""
    b, t, nq, d = q.shape
    hkv = k.shape[2]
    qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t, hkv, nq // hkv, d)
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        spec = logical_to_spec(("batch", None, "kv_heads", "heads", None), qg.shape, mesh)
        kv_spec = PartitionSpec(*spec[:3], None)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, kv_spec, kv_spec, PartitionSpec(spec[0], None)),
                              out_specs=spec, check_vma=False)
    return local(qg, k, v, segment_ids).reshape(b, t, nq, d)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                   backend: Backend) -> jax.Array:
    """Causal attention within segments, by the backend's implementation (see the module doc)."""
    if backend.attention == "splash":
        return splash_attention(q, k, v, segment_ids, interpret=backend.interpret)
    if backend.attention == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if backend.cpu_forms:
        from sspo_jax.model import cpu_forms
        return cpu_forms.causal_block_attention(q, k, v, segment_ids)
    return xla_attention(q, k, v, segment_ids)
