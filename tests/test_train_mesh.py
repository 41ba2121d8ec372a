"""Training on a device mesh: the same step, the same numbers, whatever the layout.

One optimizer step on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices gives the parameters of
the same step on one device; the trainer on 8 devices in one process, and in two processes of 4
devices each (gloo collectives), produces the same metrics and parameters; a checkpoint written
by the two processes restores in one.
"""
import json
import os

import jax
import jax.numpy as jnp
import multiproc as mp
import numpy as np
import pytest
from flax import nnx

from sspo_jax import model as M
from sspo_jax import parallel
from sspo_jax.rl import losses, train_batch
from sspo_jax.train import update as PU

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
    return train_batch.PolicyBatch(
        tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
        response_mask=jnp.asarray(resp_mask),
        old_logp=jnp.asarray(-4.6 + 0.3 * rng.standard_normal((B, R)), jnp.float32) * resp_mask,
        adv=jnp.asarray(rng.standard_normal(B), jnp.float32), seg=jnp.asarray(seg),
        eps_low=jnp.asarray(rng.uniform(0.1, 0.3, (B, R)), jnp.float32),
        eps_high=jnp.asarray(rng.uniform(0.1, 0.3, (B, R)), jnp.float32))


def _one_step(mesh):
    model = M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(3))
    if mesh is not None:
        parallel.shard_model(model, mesh)
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
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
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
    # Adam's first step moves each weight by lr * u, u = mu_hat / (sqrt(nu_hat) + 1e-8) ~ g / (|g| + 1e-8),
    # plus decay. Where g is a near-cancelling sum of size ~1e-8, the reordering difference in g
    # (checked above through the moments) changes u by a large fraction of 1, so a fixed bound on
    # the parameters would only test luck. Instead: the parameters of the two runs differ by no
    # more than lr times the difference of the u each run's own moments give, plus float32
    # rounding (u computed in float32: 1e-6 of lr; the weight: 4 ulp); most weights agree to rounding.
    def direction(state):
        adam = state[1][0]
        mu_hat = [np.asarray(m, np.float64) / (1 - 0.9) for m in jax.tree.leaves(adam.mu)]
        nu_hat = [np.asarray(v, np.float64) / (1 - 0.999) for v in jax.tree.leaves(adam.nu)]
        return [m / (np.sqrt(v) + 1e-8) for m, v in zip(mu_hat, nu_hat)]
    diffs = []
    for a, b, u1, u8 in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), direction(s1), direction(s8)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.abs(b - a)
        bound = 1e-3 * (np.abs(u8 - u1) + 1e-6) + 4 * np.spacing(np.abs(a).astype(np.float32))
        assert np.all(diff <= bound), np.max(diff - bound)
        diffs.append(diff.ravel())
    assert np.median(np.concatenate(diffs)) < 1e-8
    # Parameters and Adam moments stay where they were placed (no silent replication).
    params_in = nnx.split(parallel.shard_model(M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(3)), mesh))[1]
    for before, after in zip(jax.tree.leaves(params_in), jax.tree.leaves(p8)):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim)
    mu = s8[1][0].mu  # adamw's ScaleByAdamState after the global-norm clip
    for before, moment in zip(jax.tree.leaves(params_in), jax.tree.leaves(mu)):
        assert moment.sharding.is_equivalent_to(before.sharding, moment.ndim)


def test_adam_moments_start_sharded_like_the_parameters_and_resume_into_that_layout():
    """optax makes the moments with zeros_like, which never reads the parameters: left to jit
    they would land on one device and be replicated (every device holding all the float32
    moments). init_optimizer shards each like its parameter, and the abstract state a resumed
    run restores into has exactly init_optimizer's layout (so the update compiles once)."""
    from sspo_jax.train.setup import abstract_opt_state
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    _, params = nnx.split(parallel.shard_model(M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(3)), mesh))
    opt = PU.make_optimizer(1e-3, weight_decay=0.01)
    state = PU.init_optimizer(opt, params)
    adam = state[1][0]
    for moments in (adam.mu, adam.nu):
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
            assert m.sharding.is_equivalent_to(p.sharding, m.ndim), (m.sharding.spec, p.sharding.spec)
    assert any("fsdp" in str(m.sharding.spec) for m in jax.tree.leaves(adam.mu))
    counts = [x for x in jax.tree.leaves(state) if x.ndim == 0]
    assert counts and all(c.sharding.is_fully_replicated and c.sharding.mesh == mesh for c in counts)
    abstract = abstract_opt_state(opt, parallel.abstract(params))
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding.is_equivalent_to(x.sharding, x.ndim)


# Three steps of the demo config (smaller batches and a short warm start, so it runs in minutes)
# on a (data=2, fsdp=2, tensor=2) mesh: weights and Adam moments sharded across the processes.
MESH_RUN = {
    "steps": 3, "warm_start.steps": 20, "warm_start.examples": 256,
    "rollout.prompts_per_step": 8, "rollout.num_samples": 4, "rollout.max_new_tokens": 24,
    "train.ppo_mini_batches": 2, "train.micro_batch_size": 8, "eval.every": 3,
    "eval.num_prompts": 16, "eval.batch_size": 8, "eval.max_new_tokens": 24,
    "checkpoint.every": 1, "data.synthetic_train_size": 400,
    "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
    # The continuous engine: 4 slots per batch shard for its 8 rows, so rows queue in each group.
    "rollout.engine": "continuous", "rollout.slots": 4,
}
def _train_args(workdir):
    return ["--config=configs/demo.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in MESH_RUN.items()]]


def _final_params(workdir):
    """The run's newest checkpoint, restored here: one process, the 8 devices of conftest."""
    step, model = mp.restored_policy(mp.config_with(MESH_RUN), workdir)
    return step, nnx.state(model)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_their_checkpoint_restores_in_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    logs = [tmp_path / "two_0.log", tmp_path / "two_1.log", tmp_path / "one.log"]
    procs = mp.start_processes("sspo_jax.train", _train_args(two), 2, 4, logs)
    procs.append(mp.start("sspo_jax.train", _train_args(one), 8, logs[2]))
    mp.finish(procs, logs)

    info = json.load(open(os.path.join(two, "run_info.json")))
    assert info["process_count"] == 2 and info["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    rows_one, rows_two = mp.metric_rows(one), mp.metric_rows(two)
    assert [r["step"] for r in rows_two] == [0, 1, 2, 3]
    assert rows_two[-1]["reward/mean"] > 0 or rows_two[1]["reward/mean"] > 0  # it really graded
    # 2e-6 absolute: float32 log-probs of size ~5 round at ~5e-7 per token, and statistics
    # like approx_kl are near-cancelling means of their differences.
    mp.assert_same_metrics(rows_one, rows_two, steps={0, 1, 2, 3}, rel=1e-4, abs_=2e-6)
    # Only process 0 wrote the logs (one line per step, no duplicates from process 1).
    assert len(rows_two) == 4

    step_one, params_one = _final_params(one)
    step_two, params_two = _final_params(two)
    assert step_one == step_two == 3
    # 6 AdamW steps at lr <= 1e-4 (sum of steps <= 6e-4). Adam divides each gradient entry by its
    # own magnitude, so entries whose gradient is a near-cancelling sum (~1e-8) turn the
    # reordering of sums into up to a few % of a step (see the one-step test): every entry
    # within 5% of the total step budget, and 99.9% of them within float32 rounding.
    diffs = np.concatenate([np.abs(np.asarray(b) - np.asarray(a)).ravel()
                            for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two))])
    assert diffs.max() < 0.05 * 6e-4
    assert np.quantile(diffs, 0.999) < 1e-7


def test_recomputed_logprobs_go_micro_batch_by_micro_batch_with_the_same_result():
    model = M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(5))
    batch = _policy_batch(seed=2)
    graphdef, params = nnx.split(model)
    settings = lambda mbs: PU.UpdateSettings(loss=losses.preset("grpo"), temperature=0.8,
                                             micro_batch_size=mbs, logprob_chunk=5)
    whole = PU.batch_logprobs(params, batch, graphdef=graphdef, settings=settings(B))
    logp, _ = PU.response_logprobs(model, batch.tokens, batch.attention_mask, P, 0.8, 5)
    np.testing.assert_allclose(np.asarray(whole), np.asarray(logp * batch.response_mask), atol=1e-6)
    micro = PU.batch_logprobs(params, batch, graphdef=graphdef, settings=settings(4))
    np.testing.assert_allclose(np.asarray(micro), np.asarray(whole), atol=1e-6)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef8, params8 = nnx.split(parallel.shard_model(M.Qwen2ForCausalLM(TINY, rngs=nnx.Rngs(5)), mesh))
    sharded = PU.batch_logprobs(params8, batch, graphdef=graphdef8, settings=settings(8))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(whole), atol=1e-5)
