"""Rollouts: one batched prefill of left-padded prompts, then a jitted `lax.while_loop` decode.

`generate` validates everything on the host, pads the prompts to a length bucket, and calls one
jitted program per (model structure, sampler settings, batch shape). Inside it: prefill into a
preallocated KV cache, repeat every cache row `num_samples` times (the prefill is shared), then
decode one token per step until every row has emitted an EOS or `max_new_tokens` are written.

Logprobs and entropy are those of the full temperature-scaled policy softmax(logits / T) (greedy:
softmax(logits)), whatever top-k / top-p allow to be drawn: see `sspo_jax.generate.filters`.
This is what the trainer recomputes from a forward pass over prompt + response.

The model follows the contract in docs/design.md (`m(ids, attention_mask=, cache=)`,
`m.init_cache(batch, max_len)`, KVCache with k, v [L, B, Hkv, S, Dh], mask [B, S], index []).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from sspo_jax.generate import filters
from sspo_jax.parallel import mesh_of, named_sharding, put_batch, using_mesh

log = logging.getLogger(__name__)

MIN_BUCKET = 16
POW2_LIMIT = 512  # prompt buckets: powers of two up to this, then multiples of it


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings: hashable, a static argument of the jitted loop (a change recompiles)."""
    max_new_tokens: int
    num_samples: int
    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    eos_ids: tuple[int, ...]  # empty: every row runs to max_new_tokens
    pad_id: int


ENGINES = ("static", "continuous")


class GenerateOutput(NamedTuple):
    """Rows prompt-major: rows i*n .. i*n+n-1 are the n samples of prompt i. N = max_new_tokens.
    The same contract whatever the engine."""
    tokens: jax.Array  # [B*n, N] int32; pad_id after EOS
    logprobs: jax.Array  # [B*n, N] float32; log pi(token) of the full scaled policy, 0 where mask is 0
    mask: jax.Array  # [B*n, N] int32; 1 up to and including the EOS
    lengths: jax.Array  # [B*n] int32; mask.sum(-1)
    truncated: jax.Array  # [B*n] bool; no EOS within max_new_tokens
    entropy: jax.Array  # [B*n, N] float32; entropy of the full scaled policy, 0 where mask is 0
    decode_steps: jax.Array  # int32[]: decode steps run (static: the longest row's length)
    slot_steps: jax.Array  # int32[]: rows the decode steps ran (static: steps x rows; continuous:
    #                        steps x slots); minus lengths.sum() = the padding row-steps


@struct.dataclass
class _LoopState:
    step: jax.Array  # int32[]: tokens written so far
    next_logits: jax.Array  # [R, V] float32: the model's prediction for column `step`
    tokens: jax.Array  # [R, N] int32
    logprobs: jax.Array  # [R, N] float32
    entropy: jax.Array  # [R, N] float32
    mask: jax.Array  # [R, N] int32
    done: jax.Array  # [R] bool: has emitted an EOS
    cache: object  # the model's KVCache
    rng: jax.Array


_compiles = 0


def compile_count() -> int:
    """How many times the generation program has been traced and compiled in this process."""
    return _compiles


def bucket_length(n: int) -> int:
    """Padded prompt length for a longest prompt of `n` tokens: the next power of two (at least
    MIN_BUCKET) up to POW2_LIMIT, then the next multiple of POW2_LIMIT."""
    if n <= POW2_LIMIT:
        return max(MIN_BUCKET, 1 << (n - 1).bit_length())
    return -(-n // POW2_LIMIT) * POW2_LIMIT


def _record(state: _LoopState, logits: jax.Array, cfg: SamplerConfig) -> _LoopState:
    """Draws the token for column `state.step` from `logits` [R, V] and writes it. Row r draws
    with key fold_in(fold_in(rng, r), step), as the continuous engine does."""
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(state.rng, r), state.step))(rows)
    token, logp, ent = filters.sample_rows(
        keys, logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    active = ~state.done  # [R]
    token = jnp.where(active, token, cfg.pad_id)
    is_eos = jnp.isin(token, jnp.asarray(cfg.eos_ids, jnp.int32)) if cfg.eos_ids else jnp.zeros_like(active)
    col = state.step

    def put(buf, value):  # writes column `col` of a [R, N] buffer
        return jax.lax.dynamic_update_slice(buf, value[:, None].astype(buf.dtype), (0, col))

    return state.replace(
        step=state.step + 1,
        tokens=put(state.tokens, token),
        logprobs=put(state.logprobs, jnp.where(active, logp, 0.0)),
        entropy=put(state.entropy, jnp.where(active, ent, 0.0)),
        mask=put(state.mask, active),
        done=state.done | (active & is_eos),
    )


def _repeat_rows(cache, n: int):
    """Each cache row repeated n times, prompt-major (k, v batch axis 1; mask batch axis 0)."""
    if n == 1:
        return cache
    return cache.replace(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                         mask=jnp.repeat(cache.mask, n, axis=0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate_jit(graphdef, cfg: SamplerConfig, params, prompt_ids, prompt_mask, rng) -> GenerateOutput:
    global _compiles
    _compiles += 1  # runs once per trace, i.e. once per compilation
    log.info("sampling: compiling generate for prompts %s, %s", prompt_ids.shape, cfg)
    model = nnx.merge(graphdef, params)
    b, p = prompt_ids.shape
    rows, n_new = b * cfg.num_samples, cfg.max_new_tokens

    # The prompts attend by the model's backend (a fused kernel on TPU/GPU); each decode step
    # attends to the cache (one query row). On CPU the decoder reads weights sliced per layer.
    decoder = model.decoder()
    hidden, cache = model.prefill(prompt_ids, prompt_mask, p + n_new)
    # Left padded: the last column is a real token in every row, and the only one whose logits
    # are needed (the LM head over all P positions would be a [B, P, V] float32 array). The same
    # head form as the decode steps.
    last = decoder.head(hidden[:, -1])                                       # [B, V]
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        next_logits=jnp.repeat(last, cfg.num_samples, axis=0),
        tokens=jnp.full((rows, n_new), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, n_new), jnp.float32),
        entropy=jnp.zeros((rows, n_new), jnp.float32),
        mask=jnp.zeros((rows, n_new), jnp.int32),
        done=jnp.zeros((rows,), jnp.bool_),
        cache=_repeat_rows(cache, cfg.num_samples),
        rng=rng,
    )

    def not_finished(s: _LoopState):
        return (s.step < n_new) & ~jnp.all(s.done)

    def sample_and_advance(s: _LoopState):
        # Draw column `step`, then run it through the model for the next step's logits. The
        # forward after the last column is unused: one extra step buys a single copy of the
        # sampling code in the program (XLA CPU compile time roughly halves).
        s = _record(s, s.next_logits, cfg)
        token = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [R, 1]
        logits, cache = decoder(token, s.cache)
        return s.replace(next_logits=logits[:, 0], cache=cache)

    state = jax.lax.while_loop(not_finished, sample_and_advance, state)
    return GenerateOutput(tokens=state.tokens, logprobs=state.logprobs, mask=state.mask,
                          lengths=state.mask.sum(-1), truncated=~state.done, entropy=state.entropy,
                          decode_steps=state.step, slot_steps=state.step * rows)


def _validate(cfg: SamplerConfig, ids: np.ndarray, mask: np.ndarray, vocab: int, max_positions: int) -> int:
    """Raises ValueError naming the problem and the fix; returns the longest real prompt length."""
    if cfg.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: must be at least 1")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples={cfg.num_samples}: must be at least 1")
    if not cfg.temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={cfg.temperature}: must be >= 0 (0 means greedy)")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p={cfg.top_p}: must be in (0, 1] (1 disables nucleus filtering)")
    if cfg.top_k < 0:
        raise ValueError(f"top_k={cfg.top_k}: must be >= 0 (0 disables top-k filtering)")
    bad_eos = [e for e in cfg.eos_ids if not 0 <= e < vocab]
    if bad_eos:
        raise ValueError(f"eos_ids {bad_eos} are outside the vocabulary [0, {vocab}); pass the tokenizer's EOS ids")
    if not 0 <= cfg.pad_id < vocab:
        raise ValueError(f"pad_id={cfg.pad_id} is outside the vocabulary [0, {vocab})")
    if cfg.pad_id in cfg.eos_ids:
        raise ValueError(f"pad_id={cfg.pad_id} is also an EOS id {cfg.eos_ids}; choose a pad id that is not an EOS")
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [batch, length]")
    if ids.shape[0] == 0:
        raise ValueError("empty batch: prompt_ids has no rows")
    lengths = mask.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"empty prompt in rows {np.flatnonzero(lengths == 0).tolist()}; every prompt needs a token")
    not_left = np.flatnonzero((np.diff(mask, axis=1) < 0).any(-1))
    if len(not_left):
        raise ValueError(f"prompt rows {not_left.tolist()} are not left padded (a 1 before a 0 in prompt_mask); "
                         "pad on the left, e.g. tokenizer.padding_side = 'left'")
    real = ids[mask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"prompt token ids outside the vocabulary [0, {vocab}): min {real.min()}, max {real.max()}")
    longest = int(lengths.max())
    if longest + cfg.max_new_tokens > max_positions:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
            f"max_position_embeddings={max_positions}; shorten the prompt or lower max_new_tokens")
    return longest


def make_config(vocab_size: int, *, max_new_tokens: int, num_samples: int = 1, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (), pad_id: int) -> SamplerConfig:
    """A canonical SamplerConfig (top_k >= vocab means no top-k filter, stored as 0)."""
    top_k = int(top_k)
    return SamplerConfig(max_new_tokens=int(max_new_tokens), num_samples=int(num_samples),
                         temperature=float(temperature), top_k=0 if top_k >= vocab_size else top_k,
                         top_p=float(top_p), eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))


def generate(model, prompt_ids, prompt_mask, rng, *, num_samples: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_ids: Sequence[int] = (),
             pad_id: int, engine: str = "static", slots: int = 0, chunk_steps: int = 64,
             on_finished=None) -> GenerateOutput:
    """Samples `num_samples` continuations of each left-padded prompt; see GenerateOutput.

    prompt_ids, prompt_mask: [B, T] (mask 1 on real tokens, left padded). rng: a jax.random key.
    engine: "static" (one batch of B*n rows decoded together until the longest is done) or
    "continuous" (generate/continuous.py: `slots` decode slots per batch shard, 0 = one per row,
    fed from a queue of the rows; the host checks in every `chunk_steps` steps and hands the rows
    finished by then to on_finished(rows, tokens, mask), one process only). Both engines give
    the same rows for the same rng.
    Raises ValueError on bad input before anything is compiled.
    """
    mcfg = model.config
    cfg = make_config(mcfg.vocab_size, max_new_tokens=max_new_tokens, num_samples=num_samples,
                      temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose one of {ENGINES}")
    if slots < 0 or chunk_steps < 1:
        raise ValueError(f"slots={slots} must be >= 0 (0: one per row) and chunk_steps={chunk_steps} >= 1")
    if on_finished is not None and engine != "continuous":
        raise ValueError("on_finished streams rows as they finish: it needs engine='continuous'")
    ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask).astype(np.int32)
    longest = _validate(cfg, ids, mask, mcfg.vocab_size, mcfg.max_position_embeddings)
    # Keep the last `longest` columns (all real tokens, rows are left padded), then left pad to the bucket.
    width = bucket_length(longest)
    ids = np.where(mask == 1, ids, cfg.pad_id)[:, -longest:].astype(np.int32)
    pad = ((0, 0), (width - longest, 0))
    ids, mask = np.pad(ids, pad, constant_values=cfg.pad_id), np.pad(mask[:, -longest:], pad)
    graphdef, params = nnx.split(model)
    mesh = mesh_of(params)
    if mesh is not None:  # on the mesh of the weights: the batch over its data axes
        ids = put_batch(ids, named_sharding(mesh, ("batch", "seq"), ids.shape))
        mask = put_batch(mask, named_sharding(mesh, ("batch", "seq"), mask.shape))
    if engine == "continuous":
        from sspo_jax.generate import continuous
        pool = continuous.run(model, cfg, ids, mask, rng, slots=slots, chunk_steps=chunk_steps,
                              mesh=mesh, on_finished=on_finished)
        return GenerateOutput(tokens=pool.tokens, logprobs=pool.logprobs, mask=pool.mask,
                              lengths=pool.mask.sum(-1), truncated=~pool.done, entropy=pool.entropy,
                              decode_steps=pool.steps, slot_steps=pool.slot_steps)
    with using_mesh(mesh):
        return _generate_jit(graphdef, cfg, params, ids, mask, rng)


_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen stops on either


def default_eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's eos_token_id plus Qwen's `<|im_end|>` / `<|endoftext|>` where in its vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab.get(t) for t in _STOP_TOKENS]
    return tuple(sorted({i for i in ids if i is not None}))


def default_pad_id(tokenizer, eos_ids: Sequence[int]) -> int:
    """The tokenizer's pad id unless missing or an EOS (Qwen pads with `<|endoftext|>`); then the
    smallest id that is no EOS. Pad positions are masked, so any non-EOS id is correct."""
    pad = tokenizer.pad_token_id
    if pad is not None and pad not in eos_ids:
        return int(pad)
    return next(i for i in range(len(eos_ids) + 1) if i not in eos_ids)
