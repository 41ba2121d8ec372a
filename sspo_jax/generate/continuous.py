"""The continuous rollout engine: a pool of decode slots fed from the whole rollout batch.

The prompts are prefilled once ([B, P] -> their keys and values and last logits). Row r (prompt
r // n, sample r % n, prompt-major as in GenerateOutput) waits in a queue until a slot is free;
entering, it gets a copy of its prompt's keys and values and starts from its prompt's logits.
Each decode step samples one token for every occupied slot and runs all slots through the model
(a per-row cache index: every slot is at its own length). A row that emits an EOS or reaches
max_new_tokens leaves its slot at once and the next queued row takes it on the next step. The
loop ends when the queue and the slots are empty. Shapes are static (slots x cache length).

Row r draws column t with key fold_in(fold_in(rng, r), t), as the static engine does, so the two
engines sample the same tokens from the same logits.

Under a mesh the slots and rows split into groups, one per batch shard: group g holds prompts
g*B/G.., rows g*R/G.. and slots g*S/G.., and admits only its own rows. All bookkeeping (admission,
the prompt copy, sampling, writing the outputs) runs per group in `shard_map`, local to the
devices of its shard; only the model's forward is a global program. The host drives the loop in
chunks of `chunk_steps` decode steps (one small read per chunk: is anything left, which rows
finished), which is when finished rows can stream out to the grader. Once no row is queued the
pool narrows as it drains (SHRINK_SIZES); a chunk ends early when it could, so the drain runs at
the width of the rows still decoding from the step they fit a narrower pool.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import PartitionSpec

from sspo_jax.generate import filters
from sspo_jax.model import cache as kv_cache
from sspo_jax.parallel import logical_to_spec, using_mesh

log = logging.getLogger(__name__)

_compiles = 0


def compile_count() -> int:
    """How many times the continuous engine's decode chunk has been traced in this process."""
    return _compiles


@struct.dataclass
class Pool:
    """The engine's state between decode chunks. S slots, R rows, N = max_new_tokens."""
    steps: jax.Array         # int32[]: decode steps run
    busy: jax.Array          # int32[]: occupied slot-steps (sampled tokens)
    slot_steps: jax.Array    # int32[]: slots the decode steps ran (the pool shrinks as it drains)
    next_row: jax.Array      # [G] int32: each group's next queued row, local to the group
    slot_row: jax.Array      # [S] int32: global row in the slot, -1 when free
    slot_t: jax.Array        # [S] int32: tokens that row has written
    next_logits: jax.Array   # [S, V] float32: the model's prediction for the slot's next column
    cache: kv_cache.KVCache  # [L, S, Hkv, P + N, D], per-slot index
    tokens: jax.Array        # [R, N] int32, pad_id after EOS
    logprobs: jax.Array      # [R, N] float32
    entropy: jax.Array       # [R, N] float32
    mask: jax.Array          # [R, N] int32
    done: jax.Array          # [R] bool: emitted an EOS
    finished: jax.Array      # [R] bool: left its slot (EOS or max_new_tokens)


@struct.dataclass
class Prompts:
    """What the slots start from: the prefilled prompts (B of them, P columns)."""
    k: jax.Array        # [L, B, Hkv, P, D]
    v: jax.Array
    mask: jax.Array     # [B, P] bool
    logits: jax.Array   # [B, V] float32: the prediction after each prompt's last token


def groups_for(mesh, num_prompts: int) -> int:
    """Slot groups under `mesh`: one per batch shard when the prompts split evenly, else 1."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), (num_prompts,), mesh, report=False)[0]
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    return math.prod(mesh.shape[a] for a in axes)


def slots_per_group(slots: int, rows: int, groups: int) -> int:
    """Slots per group: `slots` per batch shard (0: one per row), at most the group's rows."""
    per_group = rows // groups
    return per_group if slots <= 0 else min(slots, per_group)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, params, ids, mask) -> Prompts:
    model = nnx.merge(graphdef, params)
    hidden, cache = model.prefill(ids, mask, ids.shape[1])
    return Prompts(k=cache.k, v=cache.v, mask=cache.mask, logits=model.decoder().head(hidden[:, -1]))


def _init_pool(model, cfg, prompts: Prompts, groups: int, slots: int) -> Pool:
    b, p = prompts.mask.shape
    rows, n_new = b * cfg.num_samples, cfg.max_new_tokens
    cache = model.init_cache(slots, p + n_new)
    cache = cache.replace(index=jnp.zeros((slots,), jnp.int32))
    return Pool(
        steps=jnp.zeros((), jnp.int32), busy=jnp.zeros((), jnp.int32), slot_steps=jnp.zeros((), jnp.int32),
        next_row=jnp.zeros((groups,), jnp.int32),
        slot_row=jnp.full((slots,), -1, jnp.int32), slot_t=jnp.zeros((slots,), jnp.int32),
        next_logits=jnp.zeros((slots, prompts.logits.shape[-1]), jnp.float32),
        cache=cache,
        tokens=jnp.full((rows, n_new), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, n_new), jnp.float32), entropy=jnp.zeros((rows, n_new), jnp.float32),
        mask=jnp.zeros((rows, n_new), jnp.int32),
        done=jnp.zeros((rows,), jnp.bool_), finished=jnp.zeros((rows,), jnp.bool_))


def _admit(pool: Pool, prompts: Prompts, num_samples: int, row_base: jax.Array) -> Pool:
    """One group's free slots take its next queued rows (local arrays of one group)."""
    rows = pool.tokens.shape[0]
    free = pool.slot_row < 0
    local = pool.next_row[0] + jnp.cumsum(free, dtype=jnp.int32) - 1   # the row each free slot would take
    admit = free & (local < rows)
    count = admit.sum(dtype=jnp.int32)
    prompt = jnp.clip(local, 0, rows - 1) // num_samples                # local prompt index
    order = jnp.argsort(~admit, stable=True)                          # admitted slots first
    n_new = pool.tokens.shape[1]

    def copy_prompt(i, cache):
        s = order[i]
        p = prompt[s]
        at = (0, s, 0, 0, 0)
        k = jax.lax.dynamic_update_slice(cache.k, jax.lax.dynamic_slice_in_dim(prompts.k, p, 1, 1), at)
        v = jax.lax.dynamic_update_slice(cache.v, jax.lax.dynamic_slice_in_dim(prompts.v, p, 1, 1), at)
        row_mask = jnp.concatenate([jax.lax.dynamic_index_in_dim(prompts.mask, p, 0),
                                    jnp.zeros((1, n_new), jnp.bool_)], axis=1)
        return cache.replace(k=k, v=v, mask=jax.lax.dynamic_update_slice(cache.mask, row_mask, (s, 0)))

    cache = jax.lax.fori_loop(0, count, copy_prompt, pool.cache)
    cache = cache.replace(index=jnp.where(admit, prompts.mask.shape[1], cache.index))
    return pool.replace(
        next_row=pool.next_row + count, cache=cache,
        slot_row=jnp.where(admit, row_base + local, pool.slot_row),
        slot_t=jnp.where(admit, 0, pool.slot_t),
        next_logits=jnp.where(admit[:, None], prompts.logits[prompt], pool.next_logits))


def _sample_and_record(pool: Pool, rng, cfg, row_base: jax.Array) -> tuple[Pool, jax.Array, jax.Array]:
    """Every occupied slot draws its next token and writes it to its row; rows that end leave
    their slot. Returns the pool, the tokens to run through the model [S] and which slots drew."""
    rows, n_new = pool.tokens.shape
    active = pool.slot_row >= 0
    row = jnp.maximum(pool.slot_row, 0)
    keys = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(row, pool.slot_t)
    token, logp, ent = filters.sample_rows(keys, pool.next_logits, temperature=cfg.temperature,
                                           top_k=cfg.top_k, top_p=cfg.top_p)
    token = jnp.where(active, token, cfg.pad_id)
    is_eos = (jnp.isin(token, jnp.asarray(cfg.eos_ids, jnp.int32)) if cfg.eos_ids
              else jnp.zeros_like(active)) & active
    local = jnp.where(active, pool.slot_row - row_base, rows)  # out of range: dropped
    at = (local, pool.slot_t)
    ends = active & (is_eos | (pool.slot_t + 1 >= n_new))
    ended_row = jnp.where(ends, local, rows)
    pool = pool.replace(
        tokens=pool.tokens.at[at].set(token, mode="drop"),
        logprobs=pool.logprobs.at[at].set(logp, mode="drop"),
        entropy=pool.entropy.at[at].set(ent, mode="drop"),
        mask=pool.mask.at[at].set(1, mode="drop"),
        done=pool.done.at[jnp.where(is_eos, local, rows)].set(True, mode="drop"),
        finished=pool.finished.at[ended_row].set(True, mode="drop"),
        slot_t=pool.slot_t + active,
        slot_row=jnp.where(ends, -1, pool.slot_row),
        # A free slot's forward is unused: it stays at index 0, so it never widens the live
        # prefix the decode step reads.
        cache=pool.cache.replace(index=jnp.where(ends | ~active, 0, pool.cache.index)))
    return pool, token, active


def _group_specs(mesh, pool: Pool, groups: int):
    """shard_map specs that give each device its group's part of the pool and prompts."""
    batch = logical_to_spec(("batch",), (groups,), mesh, report=False)[0]
    kv = logical_to_spec(kv_cache.KV_AXES, pool.cache.k.shape, mesh, report=False)
    kv = PartitionSpec(kv[0], batch, *kv[2:])
    row = PartitionSpec(batch)
    pool_spec = Pool(steps=PartitionSpec(), busy=PartitionSpec(), slot_steps=PartitionSpec(), next_row=row, slot_row=row, slot_t=row,
                     next_logits=PartitionSpec(batch, None),
                     cache=kv_cache.KVCache(k=kv, v=kv, mask=PartitionSpec(batch, None), index=row),
                     tokens=PartitionSpec(batch, None), logprobs=PartitionSpec(batch, None),
                     entropy=PartitionSpec(batch, None), mask=PartitionSpec(batch, None),
                     done=row, finished=row)
    prompt_spec = Prompts(k=kv, v=kv, mask=PartitionSpec(batch, None), logits=PartitionSpec(batch, None))
    return pool_spec, prompt_spec, row


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(7,))
def _run_chunk(graphdef, cfg, chunk_steps: int, groups: int, stream: bool, narrower: int, params,
               pool: Pool, prompts: Prompts, row_base: jax.Array, rng):
    """Up to `chunk_steps` decode steps, fewer once nothing is queued and every group's rows
    fit `narrower` slots (the host's `_narrower`: a static argument, so the program and the
    host agree); returns (pool, anything left, (queued, busiest, steps run), with `stream`
    copies of (finished, tokens, mask) the host can read while the pool goes on)."""
    global _compiles
    _compiles += 1
    log.info("sampling: compiling the continuous engine for %d slots, prompts %s, %s",
             pool.slot_row.shape[0], prompts.mask.shape, cfg)
    model = nnx.merge(graphdef, params)
    decoder = model.decoder()
    n = cfg.num_samples
    mesh = jax.sharding.get_abstract_mesh()
    sharded = groups > 1 and mesh is not None and not mesh.empty

    def bookkeeping(pool, prompts, row_base, rng):
        # Skipping admission when no slot is free keeps the common step cheap.
        pool = jax.lax.cond(jnp.any(pool.slot_row < 0) & jnp.any(pool.next_row < pool.tokens.shape[0]),
                            lambda p: _admit(p, prompts, n, row_base), lambda p: p, pool)
        return _sample_and_record(pool, rng, cfg, row_base)

    if sharded:
        pool_spec, prompt_spec, row = _group_specs(mesh, pool, groups)
        bookkeeping = jax.shard_map(bookkeeping, mesh=mesh,
                                    in_specs=(pool_spec, prompt_spec, row, PartitionSpec()),
                                    out_specs=(pool_spec, row, row), check_vma=False)

    rows_per_group = pool.tokens.shape[0] // groups

    def more(pool):
        return jnp.any(pool.slot_row >= 0) | jnp.any(pool.next_row < rows_per_group)

    def queued_and_busiest(pool):
        return (jnp.any(pool.next_row < rows_per_group),
                (pool.slot_row >= 0).reshape(groups, -1).sum(1).max())

    def can_shrink(pool):
        # The chunk ends as soon as the pool could run narrower (nothing queued, every group's
        # rows fit the next smaller width), so the host shrinks it then, not a chunk later.
        queued, busiest = queued_and_busiest(pool)
        return ~queued & (busiest <= narrower)

    def step(carry):
        pool, i = carry
        pool, token, active = bookkeeping(pool, prompts, row_base, rng)
        logits, cache = decoder(token[:, None], pool.cache)
        pool = pool.replace(next_logits=logits[:, 0], cache=cache, steps=pool.steps + 1,
                            busy=pool.busy + active.sum(dtype=jnp.int32),
                            slot_steps=pool.slot_steps + active.shape[0])
        return pool, i + 1

    pool, ran = jax.lax.while_loop(lambda c: (c[1] < chunk_steps) & more(c[0]) & ~can_shrink(c[0]),
                                   step, (pool, 0))
    view = (jnp.copy(pool.finished), jnp.copy(pool.tokens), jnp.copy(pool.mask)) if stream else None
    # What the host needs to shrink the pool: is any row still queued, the most occupied slots
    # of any group, and the steps this chunk ran.
    return pool, more(pool), (*queued_and_busiest(pool), ran), view


@functools.partial(jax.jit, static_argnums=(0, 1))
def _shrink(groups: int, keep: int, pool: Pool) -> Pool:
    """The pool with `keep` slots per group: each group's occupied slots first (their caches,
    indices and next logits), the rest dropped. Only once no row is queued and every group has
    at most `keep` occupied slots: the drain then runs at the width of the rows still decoding,
    not of the pool the queue needed."""
    def local(pool):
        order = jnp.argsort(pool.slot_row < 0, stable=True)[:keep]
        take = functools.partial(jnp.take, indices=order)
        cache = pool.cache.replace(k=take(pool.cache.k, axis=1), v=take(pool.cache.v, axis=1),
                                   mask=take(pool.cache.mask, axis=0), index=take(pool.cache.index, axis=0))
        return pool.replace(slot_row=take(pool.slot_row, axis=0), slot_t=take(pool.slot_t, axis=0),
                            next_logits=take(pool.next_logits, axis=0), cache=cache)

    mesh = jax.sharding.get_abstract_mesh()
    if groups > 1 and mesh is not None and not mesh.empty:
        spec = _group_specs(mesh, pool, groups)[0]
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False)
    return local(pool)


def run(model, cfg, ids, mask, rng, *, slots: int, chunk_steps: int, mesh=None,
        on_finished: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> Pool:
    """Runs the engine over bucketed, validated prompts (sampler.generate prepares them) and
    returns the final Pool. on_finished(rows, tokens, mask): called on the host after each chunk
    with the rows that finished in it (their [k, N] tokens and mask), while the next chunk
    decodes; one process only (the rows must be addressable here)."""
    if on_finished is not None and jax.process_count() > 1:
        raise ValueError("streaming finished rows (on_finished) needs a single process")
    graphdef, params = nnx.split(model)
    b = ids.shape[0]
    rows = b * cfg.num_samples
    groups = groups_for(mesh, b)
    per_group = slots_per_group(slots, rows, groups)
    with using_mesh(mesh):
        prompts = _prefill(graphdef, params, ids, mask)
        pool = _init_pool_jit(graphdef, cfg, groups, per_group * groups, params, prompts)
        stream = on_finished is not None

        row_bases = {}  # per pool width: it changes only when the pool shrinks

        def chunk(pool):
            width = pool.slot_row.shape[0] // groups
            if width not in row_bases:
                row_bases[width] = _row_base(groups, width, rows // groups)
            return _run_chunk(graphdef, cfg, chunk_steps, groups, stream, _narrower(width), params,
                              pool, prompts, row_bases[width], rng)

        pool, left, state, view = chunk(pool)
        ran_at = pool.slot_row.shape[0] // groups  # the width the chunk of `state` ran at
        seen = np.zeros(rows, bool)
        while True:
            # The next chunk is dispatched before this one's results are read: the device never
            # waits for the host (after the last chunk, one more finds nothing to do). Shrinking
            # acts on the previous chunk's counts, which can only have fallen since (a chunk
            # that ended to let the pool shrink is followed by one that runs no step).
            ahead_at = pool.slot_row.shape[0] // groups
            pool, more, ahead_state, ahead = chunk(pool)
            if stream:
                seen = _stream(view, seen, on_finished)
            view = ahead
            if not bool(left):
                break
            left = more
            queued, busiest, ran = (int(x) for x in state)
            width = pool.slot_row.shape[0] // groups
            keep = _shrunk_width(width, busiest) if not queued else width
            if keep < width:
                pool = _shrink(groups, keep, pool)
            elif ran == 0 and ran_at == width:
                # A chunk ends at once only when its pool can narrow (or it follows one that
                # did, at the width before): anything else would loop here for ever.
                raise RuntimeError(f"continuous engine: a decode chunk ran no step at {width} slots "
                                   f"per group ({busiest} busy, queued: {bool(queued)})")
            state, ran_at = ahead_state, ahead_at
    if on_finished is not None:
        _stream(view, seen, on_finished)
    return pool


def _stream(view, seen: np.ndarray, on_finished) -> np.ndarray:
    finished, tokens, mask = (np.asarray(a) for a in view)
    new = np.flatnonzero(finished & ~seen)
    if len(new):
        on_finished(new, tokens[new], mask[new])
    return seen | finished


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_pool_jit(graphdef, cfg, groups: int, slots: int, params, prompts: Prompts) -> Pool:
    return _init_pool(nnx.merge(graphdef, params), cfg, prompts, groups, slots)


# The widths a draining pool takes: 1, 2, 3, 4, 6, 8, 12, ... (two per doubling), so it runs at
# most 1.5x wider than the rows still decoding, and compiles a few programs, each once.
SHRINK_SIZES = sorted({1, *(m << k for m in (2, 3) for k in range(30))})


def _narrower(width: int) -> int:
    """The next smaller width a pool of `width` slots per group can shrink to (0: none). A decode
    chunk ends once the busiest group fits it: then `_shrunk_width` is below `width`."""
    return max((w for w in SHRINK_SIZES if w < width), default=0)


def _shrunk_width(width: int, busiest: int) -> int:
    """The slots per group a draining pool keeps: the smallest of SHRINK_SIZES that holds the
    busiest group, if below `width`, never below 1."""
    return min(width, next(w for w in SHRINK_SIZES if w >= max(busiest, 1)))


def _row_base(groups: int, per_group: int, rows_per_group: int) -> jax.Array:
    """[S]: the first global row of each slot's group."""
    return jnp.repeat(jnp.arange(groups, dtype=jnp.int32) * rows_per_group, per_group)
