"""From sampled responses and their rewards to a `PolicyBatch` the update can train on.

Everything that must see the whole rollout batch happens here, once, before the batch is split
into mini-batches: group advantages (a group's samples must be together) and the
entropy-adaptive clip bounds (relative to the mean subsentence entropy of the whole batch), so
neither depends on how the batch is later split over mini-batches, micro-batches or devices.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sspo_jax.parallel import named_sharding, put_batch, to_numpy
from sspo_jax.rl import advantages, losses, segments


@struct.dataclass
class PolicyBatch:
    """Rollouts ready for the loss. B rows; P prompt slots (left padded) then R response slots.

    tokens / attention_mask: [B, P+R]; response_mask, old_logp, seg, eps_low, eps_high: [B, R];
    adv: [B]; ref_logp: [B, R] or None (only when the loss has a KL term).
    """
    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    old_logp: jax.Array
    adv: jax.Array
    seg: jax.Array
    eps_low: jax.Array
    eps_high: jax.Array
    ref_logp: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index) -> "PolicyBatch":
        """The rows `index` (an int array or slice) of every field."""
        return jax.tree.map(lambda x: x[index], self)


@dataclasses.dataclass(frozen=True)
class SegmentTables:
    """The tokenizer's subsentence tables, built once per run: `ends` is the `protect_math`
    rules' `MathTables` (decimal guard included), or with those rules off a `[V]` bool array
    with the decimal guard's two `[V]` arrays beside it."""
    ends: np.ndarray | segments.MathTables
    dot_end: np.ndarray | None
    digit_start: np.ndarray | None

    @classmethod
    def from_tokenizer(cls, tokenizer, loss_cfg: losses.LossConfig, vocab_size: int):
        if loss_cfg.protect_math:
            return cls(segments.math_tables(tokenizer, loss_cfg.delimiters, vocab_size,
                                            loss_cfg.decimal_guard), None, None)
        ends = segments.ends_table(tokenizer, loss_cfg.delimiters, vocab_size=vocab_size)
        if not loss_cfg.decimal_guard:
            return cls(ends, None, None)
        dot_end, digit_start = segments.decimal_guard_tables(tokenizer, loss_cfg.delimiters,
                                                             vocab_size=vocab_size)
        return cls(ends, dot_end, digit_start)


@functools.partial(jax.jit, static_argnames=("group_size", "loss_cfg", "filter_zero_variance"))
def _batch_statistics(tokens, mask, entropy, rewards, ends, dot_end, digit_start, *,
                      group_size: int, loss_cfg: losses.LossConfig, filter_zero_variance: bool):
    adv = advantages.group_advantages(rewards, group_size, loss_cfg.advantage, loss_cfg.adv_eps)
    grouped = rewards.reshape(-1, group_size)
    flat_group = jnp.repeat(grouped.max(axis=1) == grouped.min(axis=1), group_size)   # [B]
    if filter_zero_variance:
        # DAPO's dynamic sampling, with static shapes: the rows stay, but leave the loss entirely
        # (they would only add zero-advantage tokens to the normaliser).
        mask = jnp.where(flat_group[:, None], 0, mask)
    seg = segments.segment_ids(tokens, mask, ends, dot_end=dot_end, digit_start=digit_start,
                               min_subsentence_tokens=loss_cfg.min_subsentence_tokens)
    lo, hi = losses.clip_bounds(loss_cfg, mask, seg, entropy)
    return adv, mask, seg, lo, hi, flat_group


def assemble(prompt_ids, prompt_mask, sample, rewards, *, num_samples: int,
             loss_cfg: losses.LossConfig, tables: SegmentTables,
             filter_zero_variance: bool = False, ref_logp=None, mesh=None):
    """(PolicyBatch, rollout metrics) from one rollout batch.

    prompt_ids, prompt_mask: `[Bp, P]` left-padded prompts; sample: the sampler's output with
    `Bp * num_samples` prompt-major rows (`tokens, logprobs, mask, entropy, lengths, truncated`);
    rewards: `[Bp * num_samples]`. The sampler's log-probs become the old policy's. With a
    `mesh`, the host arrays (prompts, rewards: the same on every process) are placed on it with
    the batch split like the sampler's output.
    """
    def place(x):
        x = np.asarray(x)
        if mesh is None:
            return jnp.asarray(x)
        return put_batch(x, named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape))

    rewards = place(np.asarray(rewards, np.float32))
    n_rows = sample.tokens.shape[0]
    if n_rows != prompt_ids.shape[0] * num_samples or rewards.shape != (n_rows,):
        raise ValueError(f"rollout shapes disagree: {prompt_ids.shape[0]} prompts x {num_samples} "
                         f"samples, {n_rows} sampled rows, rewards {rewards.shape}")
    adv, mask, seg, lo, hi, flat_group = _batch_statistics(
        sample.tokens, sample.mask, sample.entropy, rewards, tables.ends, tables.dot_end,
        tables.digit_start, group_size=num_samples, loss_cfg=loss_cfg,
        filter_zero_variance=filter_zero_variance)
    prompts = place(np.repeat(np.asarray(prompt_ids), num_samples, axis=0))
    prompt_attn = place(np.repeat(np.asarray(prompt_mask), num_samples, axis=0))
    batch = PolicyBatch(
        tokens=jnp.concatenate([prompts, sample.tokens.astype(prompts.dtype)], axis=1),
        attention_mask=jnp.concatenate([prompt_attn.astype(jnp.int32),
                                        sample.mask.astype(jnp.int32)], axis=1),
        response_mask=mask.astype(jnp.int32),
        old_logp=sample.logprobs,
        adv=adv,
        seg=seg,
        eps_low=lo,
        eps_high=hi,
        ref_logp=ref_logp,
    )
    lengths = to_numpy(sample.lengths)
    r = to_numpy(rewards)
    metrics = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()),
        "groups/zero_variance_frac": float(to_numpy(flat_group).reshape(-1, num_samples)[:, 0].mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": int(lengths.max()),
        "response/truncated_frac": float(to_numpy(sample.truncated).mean()),
        "advantage/abs_mean": float(np.abs(to_numpy(adv)).mean()),
    }
    return batch, metrics


def minibatch_indices(num_rows: int, num_mini_batches: int, rng: np.random.Generator):
    """Row indices of each mini-batch: a seeded permutation split into equal parts.

    Shuffling mixes groups across mini-batches (so one optimizer step does not see only a few
    prompts); the seed makes a resumed run repeat the same split.
    """
    if num_rows % num_mini_batches:
        raise ValueError(f"rollout batch of {num_rows} rows is not divisible into "
                         f"{num_mini_batches} mini-batches")
    return np.split(rng.permutation(num_rows), num_mini_batches)
