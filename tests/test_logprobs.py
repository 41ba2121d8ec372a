"""Chunked log-probs and entropies against a float64 NumPy log-softmax with a hand gradient.

Tolerance: the JAX side runs in float32 (its contract); 2e-5 relative on values and gradients
is float32 rounding over sums of V = 50 terms, far below any indexing or temperature mistake.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sspo_jax.rl.logprobs import token_logprobs_and_entropy

B, T, H, V, TEMP = 2, 13, 8, 50, 0.7


def reference(hidden, head, targets, temp, cot_logp, cot_ent):
    """float64: logp, entropy, and d(sum(cot_logp*logp + cot_ent*entropy))/d(hidden, head)."""
    z = np.einsum("bth,hv->btv", hidden, head) / temp
    logq = z - z.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))               # log-softmax
    p = np.exp(logq)
    logp = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    ent = -(p * logq).sum(-1)
    onehot = np.eye(z.shape[-1])[targets]
    # d logp/dz = onehot - p ; d entropy/dz_k = -p_k (log p_k + entropy)
    dz = cot_logp[..., None] * (onehot - p) - cot_ent[..., None] * p * (logq + ent[..., None])
    dz /= temp
    return logp, ent, np.einsum("btv,hv->bth", dz, head), np.einsum("btv,bth->hv", dz, hidden)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, H))
    head = rng.normal(size=(H, V)) * 0.7
    targets = rng.integers(0, V, size=(B, T))
    return hidden, head, targets, rng.normal(size=(B, T)), rng.normal(size=(B, T))


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
def test_values_and_gradients_match_float64(chunk):
    hidden, head, targets, a, c = inputs()
    want = reference(hidden, head, targets, TEMP, a, c)

    def f(h, w):
        logp, ent = token_logprobs_and_entropy(h, w, jnp.asarray(targets), TEMP, chunk)
        return jnp.sum(logp * a + ent * c), (logp, ent)

    h32, w32 = jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32)
    (_, (logp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        h32, w32)
    assert logp.dtype == ent.dtype == jnp.float32
    for got, ref in zip((logp, ent, dh, dw), want):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_bfloat16_inputs_give_float32_outputs():
    hidden, head, targets, _, _ = inputs(1)
    logp, ent = token_logprobs_and_entropy(jnp.asarray(hidden, jnp.bfloat16),
                                           jnp.asarray(head, jnp.bfloat16), targets, 1.0, 4)
    assert logp.dtype == ent.dtype == jnp.float32
    # bfloat16 inputs: the reference sees the same rounded inputs, so only accumulation differs.
    h = np.asarray(jnp.asarray(hidden, jnp.bfloat16), np.float64)
    w = np.asarray(jnp.asarray(head, jnp.bfloat16), np.float64)
    want_logp, want_ent, _, _ = reference(h, w, targets, 1.0, np.zeros((B, T)), np.zeros((B, T)))
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-4, atol=1e-4)


def test_backward_never_holds_full_logits():
    """Compiled forward+backward scratch memory stays far below one [B, T, V] float32 array."""
    b, t, h, v, chunk = 2, 512, 32, 8192, 16
    full_logits = b * t * v * 4

    def loss(hid, w, tgt):
        logp, ent = token_logprobs_and_entropy(hid, w, tgt, 1.0, chunk)
        return jnp.sum(logp) + jnp.sum(ent)

    args = (jax.ShapeDtypeStruct((b, t, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))
    mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis()
    assert mem.temp_size_in_bytes < full_logits / 4, (mem.temp_size_in_bytes, full_logits)


def test_errors_are_clear():
    hidden, head, targets, _, _ = inputs()
    with pytest.raises(ValueError, match="same H"):
        token_logprobs_and_entropy(hidden, head.T, targets)
    with pytest.raises(ValueError, match="targets must be"):
        token_logprobs_and_entropy(hidden, head, targets[:, :3])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs_and_entropy(hidden, head, targets.astype(float))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(hidden, head, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk"):
        token_logprobs_and_entropy(hidden, head, targets, chunk=0)
