"""The per-step sampling math against an independent float64 NumPy computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sspo_jax.generate import filters as F

sample_step = jax.jit(F.sample_step, static_argnames=("temperature", "top_k", "top_p"))


def np_allowed(logits, temperature, top_k, top_p):
    """The allowed set as a bool [V], by the textbook definition, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    # Smallest n whose first n probabilities reach top_p.
    n = len(order) if top_p >= 1.0 else int(np.searchsorted(np.cumsum(p), top_p) + 1)
    allowed = np.zeros(z.shape, bool)
    allowed[order[:min(n, len(order))]] = True
    return allowed


def np_renormalised(logits, temperature, allowed):
    z = np.asarray(logits, np.float64) / temperature
    p = np.where(allowed, np.exp(z - z.max()), 0.0)
    return p / p.sum()


def np_logprobs(logits, temperature):
    z = np.asarray(logits, np.float64) / (temperature or 1.0)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
def test_policy_logprobs_and_entropy_match_numpy(temperature):
    logits = np.random.default_rng(0).normal(0, 3, (4, 37)).astype(np.float32)
    logp = F.policy_logprobs(jnp.asarray(logits), temperature)
    ref = np_logprobs(logits, temperature)
    np.testing.assert_allclose(np.asarray(logp), ref, atol=1e-5)
    ent = F.entropy_from_logprobs(logp)
    np.testing.assert_allclose(np.asarray(ent), -(np.exp(ref) * ref).sum(-1), atol=1e-5)


def test_entropy_is_finite_when_probabilities_underflow():
    logp = F.policy_logprobs(jnp.array([[0.0, -1e4, -1e4]]), 1.0)
    ent = F.entropy_from_logprobs(logp)
    assert np.isfinite(np.asarray(ent)).all() and abs(float(ent[0])) < 1e-6


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.3), (0, 0.9), (8, 0.6), (1, 1.0), (0, 1e-6),
                                         (200, 0.8)])
def test_filter_keeps_exactly_the_numpy_allowed_set(top_k, top_p):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (16, 50)).astype(np.float32)
    temperature = 0.8
    scaled = jnp.asarray(logits) / temperature
    kept = np.isfinite(np.asarray(F.filter_logits(scaled, top_k, top_p)))
    for row in range(logits.shape[0]):
        np.testing.assert_array_equal(kept[row], np_allowed(logits[row], temperature, top_k, top_p), err_msg=f"row {row}")


def test_filter_leaves_logits_untouched_when_disabled():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 11)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(F.filter_logits(x, 0, 1.0)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(F.filter_logits(x, 11, 1.0)), np.asarray(x))


def test_greedy_is_argmax_with_raw_logprob():
    logits = np.random.default_rng(3).normal(0, 2, (6, 29)).astype(np.float32)
    tok, logp, ent = sample_step(jax.random.key(0), jnp.asarray(logits), temperature=0.0, top_k=3, top_p=0.5)
    np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))
    ref = np_logprobs(logits, 0.0)
    np.testing.assert_allclose(np.asarray(logp), ref[np.arange(6), logits.argmax(-1)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -(np.exp(ref) * ref).sum(-1), atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.2, 0, 0.7), (0.9, 10, 0.8)])
def test_sample_frequencies_match_renormalised_distribution(temperature, top_k, top_p):
    """Chi-square goodness of fit of 40k draws of one row; logprob/entropy of the full scaled policy."""
    vocab, draws = 24, 40_000
    logits = np.random.default_rng(4).normal(0, 1.5, vocab).astype(np.float32)
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
    tok, logp, ent = sample_step(jax.random.key(7), batch, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = np.asarray(tok)
    allowed = np_allowed(logits, temperature, top_k, top_p)
    assert allowed[tok].all(), "a sampled token lies outside the allowed set"
    expected = np_renormalised(logits, temperature, allowed)[allowed] * draws
    observed = np.bincount(tok, minlength=vocab)[allowed]
    assert allowed.sum() > 2  # the test has something to discriminate
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, f"chi-square p = {p_value}"
    ref = np_logprobs(logits, temperature)
    np.testing.assert_allclose(np.asarray(logp), ref[tok], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.full(draws, -(np.exp(ref) * ref).sum()), atol=1e-5)


def test_chi_square_test_detects_a_wrong_distribution():
    """The frequency test has power: the same draws fail against a slightly wrong target."""
    vocab, draws = 24, 40_000
    logits = np.random.default_rng(4).normal(0, 1.5, vocab).astype(np.float32)
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
    tok = np.asarray(sample_step(jax.random.key(7), batch, temperature=1.0, top_k=0, top_p=1.0)[0])
    observed = np.bincount(tok, minlength=vocab)
    everything = np.ones(vocab, bool)
    right = np_renormalised(logits, 1.0, everything) * draws
    wrong = np_renormalised(logits, 1.1, everything) * draws
    assert stats.chisquare(observed, right).pvalue > 1e-3
    assert stats.chisquare(observed, wrong).pvalue < 1e-6


def test_sampling_is_deterministic_per_key():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(64, 40)), jnp.float32)
    a = sample_step(jax.random.key(1), logits, temperature=1.0, top_k=0, top_p=0.9)[0]
    b = sample_step(jax.random.key(1), logits, temperature=1.0, top_k=0, top_p=0.9)[0]
    c = sample_step(jax.random.key(2), logits, temperature=1.0, top_k=0, top_p=0.9)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
