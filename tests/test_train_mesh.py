"""Training on a device mesh: the same step, the same numbers, whatever the layout.

One optimizer step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices gives the parameters of
the same step on one device; the trainer on 8 devices in one process, and in two processes of 4
devices each (gloo collectives), produces the same metrics and parameters; a checkpoint written
by the two processes restores in one.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sspo_jax import losses, model as M, policy_update as PU, sharding

B, P, R = 16, 8, 12
TINY = M.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=64, tie_word_embeddings=False)


def _policy_batch(seed=0):
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, P + 1, B)
    resp_len = rng.integers(0, R + 1, B)
    tokens = rng.integers(1, TINY.vocab_size, (B, P + R)).astype(np.int32)
    attn = np.concatenate([np.arange(P)[None] >= P - prompt_len[:, None],
                           np.arange(R)[None] < resp_len[:, None]], 1).astype(np.int32)
    resp_mask = attn[:, P:]
    seg = (np.arange(B)[:, None] * R + np.arange(R)[None] // 3).astype(np.int32)  # 3-token units
    return PU.PolicyBatch(
        tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
        response_mask=jnp.asarray(resp_mask),
        old_logp=jnp.asarray(-4.6 + 0.3 * rng.standard_normal((B, R)), jnp.float32) * resp_mask,
        adv=jnp.asarray(rng.standard_normal(B), jnp.float32), seg=jnp.asarray(seg),
        eps_low=jnp.asarray(rng.uniform(0.1, 0.3, (B, R)), jnp.float32),
        eps_high=jnp.asarray(rng.uniform(0.1, 0.3, (B, R)), jnp.float32))


def _one_step(mesh):
    model = M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(3))
    if mesh is not None:
        sharding.shard_model(model, mesh)
    graphdef, params = nnx.split(model)
    opt = PU.make_optimizer(1e-3, weight_decay=0.01)
    opt_state = PU.init_optimizer(opt, params)
    settings = PU.UpdateSettings(loss=losses.preset("sspo", eps_low=0.2, eps_high=0.28),
                                 temperature=1.0, micro_batch_size=8, logprob_chunk=5)
    params, opt_state, metrics, grad_norm, finite = PU.update_step(
        params, opt_state, _policy_batch(), graphdef=graphdef, optimizer=opt, settings=settings)
    assert bool(finite)
    return params, opt_state, metrics, float(grad_norm)


def test_one_step_on_a_2x2x2_mesh_equals_one_device():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p1, s1, m1, g1 = _one_step(None)
    p8, s8, m8, g8 = _one_step(mesh)
    # The mesh run really is sharded: FSDP over the embed axis, tensor over heads / mlp.
    specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(p8)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
    # float32; sums split over devices add in another order. Loss metrics and the gradient norm
    # agree to 1e-5 relative; Adam's moments (0.1 g and 0.001 g^2: the gradient itself) to 1e-5
    # of each array's largest entry (small entries are near-cancelling sums).
    assert g8 == pytest.approx(g1, rel=1e-5)
    for k in m1:
        np.testing.assert_allclose(np.asarray(m8[k]), np.asarray(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-30))
    # Adam's first step moves each weight by ~lr * g / (|g| + 1e-8): where g is a near-cancelling
    # sum of size ~1e-8, a reordering difference in g moves the step by up to ~1% of lr. So the
    # parameters (lr 1e-3) agree to 2% of lr; the median difference is at float32 rounding.
    diffs = [np.abs(np.asarray(b) - np.asarray(a)) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8))]
    assert max(d.max() for d in diffs) < 0.02 * 1e-3
    assert np.median(np.concatenate([d.ravel() for d in diffs])) < 1e-8
    # Parameters and Adam moments stay where they were placed (no silent replication).
    params_in = nnx.split(sharding.shard_model(M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(3)), mesh))[1]
    for before, after in zip(jax.tree.leaves(params_in), jax.tree.leaves(p8)):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim)
    mu = s8[1][0].mu  # adamw's ScaleByAdamState after the global-norm clip
    for before, moment in zip(jax.tree.leaves(params_in), jax.tree.leaves(mu)):
        assert moment.sharding.is_equivalent_to(before.sharding, moment.ndim)
