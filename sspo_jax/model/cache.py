"""The KV cache for incremental decoding (contract in docs/design.md)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Logical axes of the cache arrays, for sharding (see sspo_jax.parallel.LOGICAL_RULES).
KV_AXES = ("layers", "batch", "kv_heads", "kv_seq", "head_dim")
MASK_AXES = ("batch", "kv_seq")


@struct.dataclass
class KVCache:
    """k, v: [L, B, Hkv, S, Dh] (heads before slots: the layout attention reads without a
    transpose); mask: [B, S] bool (slot holds a real token);
    index: int32[] (next slot to write, shared by all rows: left-padded rows advance together)
    or int32[B] (each row's own next slot: the continuous engine's decode slots, each holding a
    row that started at its own step)."""
    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32, per_row: bool = False) -> KVCache:
    """An empty cache: zeros, nothing masked in, index 0 (per_row: one index per row)."""
    shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_len), jnp.bool_),
        index=jnp.zeros((batch_size,) if per_row else (), jnp.int32),
    )
