"""The forms tuned for XLA's CPU backend give the general forms' results.

A model built for platform "cpu" traces model/cpu_forms.py (2-D projections, rope without a
concatenate, query-blocked attention, the unrolled layer scan, per-layer decode weights), and
the log-prob head multiplies [B*c, H] instead of [B, c, H] (`flat_tokens`). A model built for
"gpu" with attention="xla" traces the general forms; both run here on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
from flax import nnx

from sspo_jax import model as M
from sspo_jax.model import cpu_forms
from sspo_jax.model.layers import apply_rope, rope_cos_sin
from sspo_jax.rl import logprobs, losses, train_batch
from sspo_jax.train import update as PU

P, R = 6, 8


def _scan_unrolls(jaxpr):
    """The `unroll` of every scan in a closed jaxpr (top level: the layer scan)."""
    return [e.params["unroll"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def _max_rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf.make_qwen2(path, seed=5, tie_word_embeddings=request.param)
    ids, mask = tiny_hf.left_padded_batch([3, 6, 5, 1], tiny_hf.BASE["vocab_size"], total=P, seed=4)
    resp = np.random.default_rng(0).integers(1, tiny_hf.BASE["vocab_size"], (4, R))
    tokens = np.concatenate([ids.numpy(), resp], 1)
    attn = np.concatenate([mask.numpy(), np.ones_like(resp)], 1)
    return path, jnp.asarray(tokens, jnp.int32), jnp.asarray(attn, jnp.int32)


def _policy_batch(tokens, attn):
    b = tokens.shape[0]
    rng = np.random.default_rng(1)
    return train_batch.PolicyBatch(
        tokens=tokens, attention_mask=attn, response_mask=attn[:, P:],
        old_logp=jnp.asarray(-rng.random((b, R)) * 5, jnp.float32),
        adv=jnp.asarray([1.0, -0.5, 2.0, -1.5], jnp.float32),
        seg=jnp.arange(b * R, dtype=jnp.int32).reshape(b, R),
        eps_low=jnp.full((b, R), 0.2), eps_high=jnp.full((b, R), 0.2))


def _hidden_and_grads(path, tokens, attn, platform):
    """Hidden states and the gradient of the GRPO loss (the trainer's loss function) w.r.t. every
    parameter, for a model built for `platform`."""
    graphdef, params = nnx.split(M.from_pretrained(path, platform=platform, attention="xla"))
    batch = _policy_batch(tokens, attn)
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=0.7, micro_batch_size=4,
                                 logprob_chunk=3)
    n_tok = jnp.sum(batch.response_mask.astype(jnp.float32))

    def loss(params):
        return PU._micro_loss(params, graphdef, batch, n_tok, jnp.float32(4), settings)[0]

    def hidden(params):
        return nnx.merge(graphdef, params).hidden_states(tokens, attention_mask=attn)

    unrolls = _scan_unrolls(jax.make_jaxpr(hidden)(params))
    return unrolls, jax.jit(hidden)(params), jax.jit(jax.grad(loss))(params)


def test_cpu_forms_give_the_general_forward_and_gradient(case):
    path, tokens, attn = case
    cpu_unrolls, cpu_hidden, cpu_grads = _hidden_and_grads(path, tokens, attn, "cpu")
    gen_unrolls, gen_hidden, gen_grads = _hidden_and_grads(path, tokens, attn, "gpu")
    layers = tiny_hf.BASE["num_hidden_layers"]
    assert cpu_unrolls == [layers] and gen_unrolls == [1]  # the two paths really differ
    assert _max_rel_err(cpu_hidden, gen_hidden) < 1e-5  # padding positions included
    for (name, a), b in zip(jax.tree_util.tree_leaves_with_path(cpu_grads), jax.tree.leaves(gen_grads)):
        assert np.abs(np.asarray(b)).max() > 0, name  # every parameter gets a gradient
        assert _max_rel_err(a, b) < 1e-5, jax.tree_util.keystr(name)


def test_cpu_forms_give_the_general_prefill_and_decode(case):
    path, tokens, attn = case
    outs = []
    for platform in ("cpu", "gpu"):
        m = M.from_pretrained(path, platform=platform, attention="xla")

        @nnx.jit
        def run(m, prompt, prompt_mask, token):
            decoder = m.decoder()
            hidden, cache = m.prefill(prompt, prompt_mask, P + 2)
            nxt, cache = decoder(token, cache)
            return decoder.head(hidden[:, -1]), nxt, cache.k

        outs.append(run(m, tokens[:, :P], attn[:, :P], tokens[:, P:P + 1]))
        assert (m.decoder().weights is not None) == (platform == "cpu")  # the paths really differ
    for a, b in zip(*outs):
        assert _max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_flat_head_gives_the_general_logprobs_and_gradient(temperature):
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((16, 29)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 29, (3, 7)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)

    def run(flat):
        def f(h, w):
            logp, ent = logprobs.token_logprobs_and_entropy(h, w, targets, temperature, chunk=3,
                                                            flat_tokens=flat)
            return jnp.sum(logp * weights), (logp, ent)
        hlo = jax.jit(f).lower(hidden, head).as_text()
        (_, outs), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hidden, head)
        return hlo, outs, grads

    cpu_hlo, cpu_outs, cpu_grads = run(True)
    gen_hlo, gen_outs, gen_grads = run(False)
    assert cpu_hlo != gen_hlo  # the two paths really differ
    for a, b in zip(jax.tree.leaves((cpu_outs, cpu_grads)), jax.tree.leaves((gen_outs, gen_grads))):
        assert _max_rel_err(a, b) < 1e-5


def test_rope_without_concatenate_gives_rope():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)
    cos, sin = rope_cos_sin(jnp.asarray([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]), 8, 1e4)
    np.testing.assert_allclose(np.asarray(jax.jit(cpu_forms.apply_rope)(x, cos, sin)),
                               np.asarray(jax.jit(apply_rope)(x, cos, sin)), rtol=1e-6, atol=1e-6)
