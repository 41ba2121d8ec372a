"""Padding-free training: the sequences of a `PolicyBatch` packed into rows without padding.

A padded PolicyBatch row is [left padding | prompt | response | right padding] of P + R slots;
with RL's skewed response lengths most of those slots are padding, and the update's forward and
backward pay for every slot. Packing lays each sequence's real tokens (prompt + response, one
contiguous run of the padded row) end to end into rows of the same P + R slots (so no row's
attention costs more than a padded row's), first-fit decreasing, and the model sees segment ids
(one per sequence, 0 for padding): positions restart at 0 and attention stays inside each
sequence (model/attention.py). The layout is computed on the host from the lengths alone (a
`PackPlan`: for every packed slot, the flat index of its source slot, or -1); the arrays are
gathered on the device, so no token crosses to the host.

Everything the loss needs travels per token (`PackedBatch`): the response mask, old and
reference log-probs, the clip bounds, the advantage broadcast, subsentence and response ids
renumbered to the packed rows (`row * L + first slot of the unit in the row`: unique, below
N * L, and what `losses.rebase_segments` expects), so `losses.policy_loss` gives the padded
batch's loss on the packed rows.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sspo_jax.parallel import named_sharding, put_batch, to_numpy
from sspo_jax.rl.train_batch import PolicyBatch

# Packed row counts are rounded up to a multiple of the micro-batch, then of its number to one
# of these (x a power of two): a run compiles a few update programs, not one per batch. Eight
# per doubling: the padding rows (at most 1/8) cost every step, an extra program compiles once
# (and is kept by the compilation cache); with four, 33 rows of 4-row micro-batches became 40.
BUCKET_STEPS = tuple(1.0 + k / 8 for k in range(8))
# The LM head's slots per group: in units of HEAD_SLOT_UNIT, at four sizes per doubling (at most
# 25% more head rows, on the head alone). Coarser than the rows: a program is keyed by both
# counts, and the head count drifts with the response lengths during a run.
HEAD_SLOT_UNIT = 16
HEAD_BUCKET_STEPS = (1.0, 1.25, 1.5, 1.75)


@struct.dataclass
class PackedBatch:
    """N packed rows of L slots; every array [N, L].

    tokens; segment_ids (sequence within the row, 1..; 0 = padding); response_mask (1 on the
    response tokens the loss uses: the padded batch's response_mask); old_logp, eps_low,
    eps_high, adv, ref_logp (None without a KL term): per token, at the token's own slot
    (slot j holds the log-prob of tokens[j] given the slots before it); seg, resp: subsentence
    and response ids (`row * L + the unit's first slot in the row`)."""
    tokens: jax.Array
    segment_ids: jax.Array
    response_mask: jax.Array
    old_logp: jax.Array
    adv: jax.Array
    seg: jax.Array
    resp: jax.Array
    eps_low: jax.Array
    eps_high: jax.Array
    ref_logp: jax.Array | None = None
    # The LM head on the loss tokens only: rows go in groups of `group_rows` (one batch shard's
    # rows of a micro-batch, so the gather stays on its device); head_pos [N, L] is each loss
    # token's place among its group's `head_slots` head slots (-1: not computed). None: the head
    # runs on every slot.
    head_pos: jax.Array | None = None
    head_slots: int = struct.field(pytree_node=False, default=0)
    group_rows: int = struct.field(pytree_node=False, default=0)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """The layout: `source` [N, L] int32, each packed slot's flat index into the padded
    [B, P + R] slots (-1: padding); `row_of` [N, L] its padded row (-1); `segment_ids` [N, L]
    the sequence's number within its packed row (1.., 0 = padding); `resp` [N, L] response ids
    (`row * L + the sequence's first slot`; padding: its own slot); head_slots, group_rows: the
    LM head's slots per group of rows (0, 0: the head runs on every slot)."""
    source: np.ndarray
    row_of: np.ndarray
    segment_ids: np.ndarray
    resp: np.ndarray
    real_tokens: int
    sequences: int
    head_slots: int = 0
    group_rows: int = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.source.size


def bucket_rows(rows: int, multiple: int, steps: tuple[float, ...] = BUCKET_STEPS) -> int:
    """`rows` rounded up to a multiple of `multiple` whose count of multiples is one of
    `steps` x a power of two that is whole (BUCKET_STEPS: 1, 2, ..., 16, 18, 20, ..., 32, 36,
    40, ...: at most 8 programs per doubling, at most 12.5% padding rows)."""
    units = max(1, -(-rows // multiple))
    power = 1
    while True:
        for step in steps:
            if step * power >= units and float(step * power).is_integer():
                return int(step * power) * multiple
        power *= 2


def plan(lengths: np.ndarray, starts: np.ndarray, *, padded_len: int, row_len: int | None = None,
         rows_multiple: int = 1, order: np.ndarray | None = None,
         loss_tokens: np.ndarray | None = None, group_rows: int = 0) -> PackPlan:
    """First-fit-decreasing packing of the padded rows' sequences into rows of `row_len` slots
    (default `padded_len`, the padded P + R: every sequence fits, and no packed row's attention
    costs more than a padded row's).

    lengths [B]: each padded row's real tokens (0 leaves the row out); starts [B]: the column of
    its first real token (its tokens are the columns starts .. starts + length); order: the rows
    in the order to try (default: longest first, ties by row). The number of packed rows is
    rounded up by `bucket_rows(., rows_multiple)`.

    loss_tokens [B] (each row's loss tokens) and group_rows > 0 (dividing rows_multiple): the LM
    head runs on the loss tokens only, `head_slots` of them per group of `group_rows` packed
    rows; the rows are dealt to the groups so that their loss tokens are even (the most loaded
    group sets head_slots for all).
    """
    lengths, starts = np.asarray(lengths, np.int64), np.asarray(starts, np.int64)
    row_len = padded_len if row_len is None else row_len
    if (lengths > row_len).any():
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit packed rows of "
                         f"{row_len} slots")
    if ((starts + lengths) > padded_len).any() or (starts < 0).any():
        raise ValueError("a sequence reaches outside its padded row")
    if order is None:
        order = np.lexsort((np.arange(len(lengths)), -lengths))
    free: list[int] = []
    placed: list[list[int]] = []
    for i in order:
        if lengths[i] == 0:
            continue
        for r, room in enumerate(free):
            if room >= lengths[i]:
                free[r] -= lengths[i]
                placed[r].append(int(i))
                break
        else:
            free.append(row_len - int(lengths[i]))
            placed.append([int(i)])
    # Bucketed, but never past the padded rows (rounded to the multiple): packing must not cost more.
    n = min(bucket_rows(len(placed), rows_multiple), -(-len(lengths) // rows_multiple) * rows_multiple)
    n = max(n, rows_multiple)
    head_slots = 0
    if group_rows:
        if loss_tokens is None or rows_multiple % group_rows:
            raise ValueError(f"the head's groups need every row's loss tokens and a group size "
                             f"dividing rows_multiple={rows_multiple}, got {group_rows}")
        loss_tokens = np.asarray(loss_tokens, np.int64)
        placed, head_slots = _balance(placed + [[]] * (n - len(placed)),
                                      [int(loss_tokens[seqs].sum()) for seqs in placed], group_rows)
        head_slots = min(bucket_rows(head_slots, HEAD_SLOT_UNIT, HEAD_BUCKET_STEPS), group_rows * row_len)
    source = np.full((n, row_len), -1, np.int32)
    row_of = np.full((n, row_len), -1, np.int32)
    segment_ids = np.zeros((n, row_len), np.int32)
    resp = (np.arange(n, dtype=np.int32)[:, None] * row_len
            + np.arange(row_len, dtype=np.int32)[None, :])
    for r, seqs in enumerate(placed):
        at = 0
        for k, i in enumerate(seqs):
            span = slice(at, at + int(lengths[i]))
            source[r, span] = i * padded_len + starts[i] + np.arange(lengths[i])
            row_of[r, span] = i
            segment_ids[r, span] = k + 1
            resp[r, span] = r * row_len + at
            at += int(lengths[i])
    return PackPlan(source, row_of, segment_ids, resp, int(lengths[lengths > 0].sum()),
                    sum(map(len, placed)), head_slots, group_rows)


def _balance(rows: list[list[int]], loads: list[int], group_rows: int) -> tuple[list[list[int]], int]:
    """The rows reordered into consecutive groups of `group_rows` with even loads (the most
    loaded row first into the least loaded group with room), and the largest group load.
    `loads` covers the leading rows; the rest (padding rows) weigh nothing."""
    loads = loads + [0] * (len(rows) - len(loads))
    groups = [[] for _ in range(len(rows) // group_rows)]
    room = [(0, g) for g in range(len(groups))]  # (load, group) of the groups with room: a heap
    for r in sorted(range(len(rows)), key=lambda r: -loads[r]):
        load, g = heapq.heappop(room)
        groups[g].append(r)
        if len(groups[g]) < group_rows:
            heapq.heappush(room, (load + loads[r], g))
    return ([rows[r] for group in groups for r in group],
            max(sum(loads[r] for r in group) for group in groups))


def plan_batch(batch: PolicyBatch, *, rows_multiple: int = 1, row_len: int | None = None,
               order: np.ndarray | None = None, head_group_rows: int | None = None) -> PackPlan:
    """`plan` for a PolicyBatch: its sequences are the attended slots of each row; a row with
    no loss token (an empty response, a group DAPO filtered out) is left out. The LM head runs
    on the loss tokens, in groups of `head_group_rows` rows (default rows_multiple, a
    micro-batch; under a mesh, pass a batch shard's rows of it; 0: the head on every slot)."""
    width = batch.tokens.shape[1]
    prompt_len = width - batch.response_mask.shape[1]
    # One host transfer: real tokens, loss tokens and real prompt tokens of every row.
    # (Loss tokens counted as the device marks them for the head: response_mask > 0.)
    real, used, prompt_real = to_numpy(jnp.stack([
        jnp.sum(batch.attention_mask, axis=1), jnp.sum(batch.response_mask > 0, axis=1),
        jnp.sum(batch.attention_mask[:, :prompt_len], axis=1)]))
    if ((used > 0) & (prompt_real == 0)).any():
        # Its first response token would have no predictor within its sequence.
        raise ValueError(f"rows {np.flatnonzero((used > 0) & (prompt_real == 0)).tolist()} have a "
                         "response but no prompt token")
    lengths = np.where(used > 0, real, 0)
    group_rows = rows_multiple if head_group_rows is None else head_group_rows
    return plan(lengths, prompt_len - prompt_real, padded_len=width, row_len=row_len,
                rows_multiple=rows_multiple, order=order, loss_tokens=used, group_rows=group_rows)


def pack(batch: PolicyBatch, layout: PackPlan, mesh=None) -> PackedBatch:
    """The PackedBatch of `batch` by `layout`, gathered on the device (placed like the batch
    on `mesh`)."""
    arrays = {"source": layout.source, "row_of": layout.row_of, "segment_ids": layout.segment_ids,
              "resp": layout.resp}
    if mesh is None:
        placed = {k: jnp.asarray(v) for k, v in arrays.items()}
    else:
        placed = {k: put_batch(v, named_sharding(mesh, ("batch", None), v.shape)) for k, v in arrays.items()}
    return _gather(batch, **placed, head_slots=layout.head_slots, group_rows=layout.group_rows)


@functools.partial(jax.jit, static_argnames=("head_slots", "group_rows"))
def _gather(batch: PolicyBatch, source, row_of, segment_ids, resp, head_slots, group_rows) -> PackedBatch:
    n, width = source.shape
    prompt_len = batch.tokens.shape[1] - batch.response_mask.shape[1]
    valid = source >= 0
    at = jnp.maximum(source, 0)
    row = jnp.maximum(row_of, 0)

    def take(x, fill=0):
        """A [B, R] response array (or [B, P + R]) at each packed slot; `fill` on prompt slots
        and padding."""
        if x.shape[1] != batch.tokens.shape[1]:
            x = jnp.pad(x, ((0, 0), (prompt_len, 0)), constant_values=fill)
        return jnp.where(valid, x.reshape(-1)[at], fill)

    # Subsentence ids: `row * L + first slot` of each run of one rollout id inside one sequence
    # (prompt slots take -1: one run per prompt, outside the loss).
    g = take(batch.seg, -1)
    slot = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (n, width))
    starts = jnp.concatenate([jnp.ones((n, 1), jnp.bool_),
                              (g[:, 1:] != g[:, :-1]) | (segment_ids[:, 1:] != segment_ids[:, :-1])], axis=1)
    first = jax.lax.cummax(jnp.where(starts, slot, 0), axis=1)
    base = jnp.arange(n, dtype=jnp.int32)[:, None] * width
    response_mask = take(batch.response_mask)
    head_pos = None
    if group_rows:  # each loss token's place in its group of rows, in slot order
        used = (response_mask > 0).reshape(n // group_rows, group_rows * width)
        head_pos = jnp.where(used, jnp.cumsum(used, axis=1, dtype=jnp.int32) - 1, -1).reshape(n, width)
    return PackedBatch(
        tokens=take(batch.tokens), segment_ids=segment_ids,
        response_mask=response_mask, old_logp=take(batch.old_logp),
        adv=jnp.where(valid, batch.adv[row], 0.0), seg=base + first, resp=resp,
        eps_low=take(batch.eps_low), eps_high=take(batch.eps_high),
        ref_logp=None if batch.ref_logp is None else take(batch.ref_logp),
        head_pos=head_pos, head_slots=head_slots, group_rows=group_rows)


def unpack(values: jax.Array, layout: PackPlan, shape: tuple[int, int], mesh=None) -> jax.Array:
    """Per-slot values [N, L] of a packed batch back at their padded slots [B, P + R] (0 where no
    packed slot came from); the layout placed like the values on `mesh`."""
    source = (jnp.asarray(layout.source) if mesh is None else
              put_batch(layout.source, named_sharding(mesh, ("batch", None), layout.source.shape)))
    return _scatter(values, source, shape)


@functools.partial(jax.jit, static_argnums=2)
def _scatter(values, source, shape):
    size = shape[0] * shape[1]
    index = jnp.where(source >= 0, source, size)  # padding goes to a slot past the end, dropped
    return jnp.zeros(size + 1, values.dtype).at[index.reshape(-1)].set(values.reshape(-1))[:size].reshape(shape)
