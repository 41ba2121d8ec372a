"""Pure per-step sampling math: temperature, top-k, top-p (nucleus), greedy, logprob, entropy.

Conventions (the trainer relies on them):
- The policy is `pi = softmax(logits / temperature)` over the FULL vocabulary. The sampler returns
  `log pi(token)` and the entropy of `pi`; top-k / top-p only restrict WHICH token is drawn, they
  do not change the returned logprob or entropy. That is the quantity the trainer recomputes from
  one forward pass, so sampler logprobs can serve as old-policy logprobs.
- Temperature 0 means greedy (argmax); its logprob and entropy are those of `softmax(logits)`.
- Filter order is that of `transformers`: temperature, then top-k, then top-p applied to the
  top-k-renormalised distribution. Top-p keeps the smallest prefix of the sorted tokens whose
  mass reaches `top_p` (a token is kept when the mass of the tokens strictly before it is
  `< top_p`, so the most likely token is always kept). Tokens tied with the last kept value are
  kept too (thresholds compare values, not ranks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def policy_logprobs(logits: jax.Array, temperature: float) -> jax.Array:
    """`log softmax(logits / temperature)` in float32 (`temperature == 0`: of the raw logits). [..., V]"""
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        logits = logits / temperature
    return jax.nn.log_softmax(logits, axis=-1)


def entropy_from_logprobs(logp: jax.Array) -> jax.Array:
    """Entropy `-sum p log p` of each distribution given by normalised log-probabilities. [...]"""
    p = jnp.exp(logp)
    # p * logp is 0 * -inf = nan where p underflows to 0; those terms are 0.
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def filter_logits(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / top-p allowed set to -inf. `scaled`: [..., V], temperature applied.

    `top_k == 0` and `top_p == 1.0` disable their filter; with both disabled `scaled` comes back
    unchanged and nothing is sorted. Both are static Python numbers.
    """
    vocab = scaled.shape[-1]
    if top_k >= vocab:
        top_k = 0
    if top_k == 0 and top_p >= 1.0:
        return scaled
    # Sorted (descending) candidate values: only the top k when top-k is on, so top-p after
    # top-k never sorts the whole vocabulary.
    if top_k > 0:
        sorted_vals, _ = jax.lax.top_k(scaled, top_k)  # [..., k]
    else:
        sorted_vals = -jnp.sort(-scaled, axis=-1)  # [..., V]
    if top_p < 1.0:
        probs = jax.nn.softmax(sorted_vals, axis=-1)  # renormalised over the top-k candidates
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: mass_before[0] = 0
    else:
        num_kept = jnp.full(scaled.shape[:-1] + (1,), sorted_vals.shape[-1])
    threshold = jnp.take_along_axis(sorted_vals, num_kept - 1, axis=-1)  # [..., 1]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_step(rng: jax.Array, logits: jax.Array, *, temperature: float, top_k: int, top_p: float):
    """One draw per row. `logits`: [R, V]. Returns `(token [R] int32, logp [R], entropy [R])`.

    `logp` and `entropy` are of the full temperature-scaled policy (see the module docstring).
    `temperature`, `top_k`, `top_p` are static.
    """
    logp_all = policy_logprobs(logits, temperature)  # [R, V]
    if temperature == 0:
        token = jnp.argmax(logits, axis=-1)
    else:
        # log-softmax differs from logits / T by a per-row constant, so filtering and drawing
        # from it is the same as from the scaled logits.
        token = jax.random.categorical(rng, filter_logits(logp_all, top_k, top_p), axis=-1)
    token = token.astype(jnp.int32)
    logp = jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]
    return token, logp, entropy_from_logprobs(logp_all)


def sample_rows(keys: jax.Array, logits: jax.Array, *, temperature: float, top_k: int, top_p: float):
    """sample_step with one key per row (`keys` [R]): row r's draw depends only on its key and
    its logits, so engines that run a row at different steps or beside different rows draw the
    same token."""
    if temperature == 0:
        return sample_step(keys[0], logits, temperature=0.0, top_k=top_k, top_p=top_p)

    def one(key, row):
        token, logp, ent = sample_step(key, row[None], temperature=temperature, top_k=top_k, top_p=top_p)
        return token[0], logp[0], ent[0]

    return jax.vmap(one)(keys, logits)
