"""Token log-probabilities and entropies from final hidden states, chunked over the sequence.

The full logits `[B, T, V]` never exist: a `lax.scan` walks T in chunks, each chunk's body is
rematerialised (`jax.checkpoint`), so the backward pass recomputes one chunk's `[B, c, V]` logits
at a time instead of storing all of them. For Qwen2.5 (V = 151936) at B = 8, T = 4096 the full
float32 logits would be 20 GB; measured peaks are in docs/algorithms.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128


def _chunk_logprobs_entropy(hidden, lm_head, targets, temperature, flat_tokens):
    """hidden `[B, c, H]`, lm_head `[H, V]`, targets `[B, c]` -> (logp, entropy) `[B, c]` f32."""
    b, c, h = hidden.shape
    if flat_tokens:
        # One [B*c, H] @ [H, V] matmul: the head's gradient then contracts one token axis; XLA
        # CPU lowers the two-axis (B, c) contraction of the 3-D form by first transposing the
        # whole [B, c, V] logits gradient. Same numbers (tests/test_update_speed_paths.py).
        hidden, targets = hidden.reshape(b * c, h), targets.reshape(b * c)
    # float32 accumulation and softmax even for bfloat16 weights; no float32 copy of the head.
    logits = jnp.einsum("...h,hv->...v", hidden, lm_head,
                        preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)                                   # [B, c]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)                          # -sum p log p
    return (target_logit - lse).reshape(b, c), entropy.reshape(b, c)


def token_logprobs_and_entropy(hidden, lm_head, targets, temperature=1.0, chunk=DEFAULT_CHUNK,
                               flat_tokens=False):
    """`(logp [B, T], entropy [B, T])`, float32, of `softmax(hidden @ lm_head / temperature)`.

    hidden: `[B, T, H]` final hidden states (after the final norm); lm_head: `[H, V]`;
    targets: `[B, T]` int token ids in [0, V) (the next tokens: the trainer passes
    `hidden[:, :-1]` and `tokens[:, 1:]`); temperature: the sampler's, so logp matches the
    sampling distribution; chunk: tokens of T per step (peak memory ~ a few B*chunk*V floats);
    flat_tokens: the head as one 2-D matmul per chunk, the form for XLA CPU (the model's backend
    says when: `model.backend.cpu_forms`).
    Differentiable w.r.t. hidden and lm_head; T need not be a multiple of chunk (zero padded).
    """
    hidden, lm_head, targets = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets)
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[2] != lm_head.shape[0]:
        raise ValueError(f"need hidden [B, T, H] and lm_head [H, V] with the same H, got "
                         f"{hidden.shape} and {lm_head.shape}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {hidden.shape[:2]}, got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (the sampler's), got {temperature}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, T, H = hidden.shape
    c = min(int(chunk), T)
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, H).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, c).swapaxes(0, 1)
    # Rematerialised so the backward holds one chunk's logits at a time. A single chunk's are
    # all of them either way (alive from the forward's head to the backward's, which follows
    # it at once), and recomputing them would only cost one more [B*T, H] @ [H, V] matmul.
    body = jax.checkpoint(_chunk_logprobs_entropy, static_argnums=(4,)) if n > 1 else _chunk_logprobs_entropy

    def step(carry, xs):
        h_c, t_c = xs
        return carry, body(h_c, lm_head, t_c, temperature, bool(flat_tokens))

    _, (logp, entropy) = jax.lax.scan(step, None, (h, t))                    # [n, B, c]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * c)[:, :T]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def selected_logprobs_and_entropy(hidden, lm_head, tokens, head_pos, head_slots: int,
                                  group_rows: int, temperature=1.0, chunk=DEFAULT_CHUNK,
                                  flat_tokens=False):
    """`(logp [N, L], entropy [N, L])` of `tokens[:, j]` given `hidden[:, j - 1]`, computed only
    at the slots `head_pos` marks (0 elsewhere): the LM head on a packed batch's loss tokens.

    hidden `[N, L, H]`; tokens, head_pos `[N, L]`: head_pos numbers the marked slots of each
    group of `group_rows` consecutive rows 0, 1, ... (below `head_slots`; -1: not computed).
    Each group's marked slots are gathered into `head_slots` predictor rows, so the head costs
    N / group_rows x head_slots token rows instead of N x L. A marked slot is never a row's first
    (a sequence starts with a prompt token)."""
    n, length, h = hidden.shape
    if n % group_rows:
        raise ValueError(f"{n} rows do not split into the head's groups of {group_rows} rows")
    groups, width = n // group_rows, group_rows * length
    flat = lambda x: x.reshape(groups, width, *x.shape[2:])  # noqa: E731
    pos = flat(head_pos)

    def gather(pos, hidden, tokens):
        # slot[k]: the flat slot of the group's k-th marked token (1 for unused places, so that
        # its predictor is a real slot); -1 marks go past the end and are dropped. Per group
        # (vmapped), so the gathers batch over groups and stay on each group's device.
        slot = jnp.ones(head_slots, jnp.int32).at[jnp.where(pos >= 0, pos, head_slots)].set(
            jnp.arange(width, dtype=jnp.int32), mode="drop")
        return hidden[jnp.maximum(slot - 1, 0)], tokens[slot]

    predictors, targets = jax.vmap(gather)(pos, flat(hidden), flat(tokens))    # [G, K, H], [G, K]
    # Up to chunk x group_rows tokens of each group per step (the [N, c] rows of the head on
    # every slot: the same peak logits), in equal steps that tile head_slots (padding: under
    # one row per step).
    steps = -(-head_slots // (chunk * group_rows))
    logp, entropy = token_logprobs_and_entropy(predictors, lm_head, targets, temperature,
                                               -(-head_slots // steps), flat_tokens)  # [G, K]
    # A place past head_slots (a count the host got wrong) reads NaN, which the update's finite
    # check refuses, rather than another token's value.
    read = jax.vmap(lambda v, p: v.at[p].get(mode="fill", fill_value=jnp.nan))
    back = lambda x: jnp.where(pos >= 0, read(x, jnp.maximum(pos, 0)), 0.0).reshape(n, length)  # noqa: E731
    return back(logp), back(entropy)
