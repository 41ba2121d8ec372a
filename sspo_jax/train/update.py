"""One optimizer step of the policy on one mini-batch of rollouts, accumulated over micro-batches.

The model enters as NNX (graphdef, params) so the step is a pure jitted function of arrays.
A step whose loss or gradient is not finite leaves the parameters and optimizer state exactly as
they were and reports `finite = False`; the trainer counts and logs it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sspo_jax.parallel import abstract, constrain, mesh_of, using_mesh
from sspo_jax.rl import logprobs, losses
from sspo_jax.rl.loss_metrics import combine_metrics
from sspo_jax.rl.packing import PackedBatch
from sspo_jax.rl.train_batch import PolicyBatch


_compiles = 0


def compile_count() -> int:
    """How many update programs have been traced (compiled) in this process: one per distinct
    batch shape (packed: per bucket of rows) and settings."""
    return _compiles


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
    """Static settings of the update (hashable: part of the jit cache key)."""
    loss: losses.LossConfig
    temperature: float
    micro_batch_size: int   # rows per micro-batch (packed rows for a PackedBatch)
    logprob_chunk: int
    response_len: int = 0   # the padded response length R: for a PackedBatch, the default
                            # divisor of seq-mean-token-sum-norm (a padded batch has it as T)


def make_optimizer(lr: float, *, schedule: str = "constant", warmup_steps: int = 0,
                   total_steps: int = 1, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip: float = 1.0):
    """AdamW with global-norm clipping and a linear warmup into a constant or cosine schedule."""
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps))
    else:
        raise ValueError(f"optimizer schedule {schedule!r}: choose 'constant' or 'cosine'")
    sched = main if warmup_steps <= 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


def init_optimizer(optimizer, params):
    """`optimizer.init(params)` laid out as `optimizer_state_shardings` says."""
    return jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params))(params)


def optimizer_state_shardings(optimizer, params):
    """Where each leaf of `optimizer.init(params)` lives (`params` real or abstract, with
    shardings): every per-parameter leaf (Adam's moments) sharded like its parameter, the rest
    (step counts) replicated over the parameters' devices.

    Stated, not left to jit: optax makes the moments with zeros_like, which never reads the
    parameters, so jit alone would put them on one device (and then every device would hold
    them whole); and the update returns the counts committed and replicated, so an init that
    differed would compile the update twice."""
    home = jax.tree.leaves(params)[0].sharding
    replicated = (NamedSharding(home.mesh, PartitionSpec()) if isinstance(home, NamedSharding)
                  else home)
    shapes = jax.eval_shape(optimizer.init, abstract(params))
    return optax.tree_map_params(optimizer, lambda _, p: p.sharding, shapes, abstract(params),
                                 transform_non_params=lambda _: replicated)


def response_logprobs(model, tokens, attention_mask, prompt_len: int, temperature: float,
                      chunk: int):
    """log pi and entropy `[B, R]` of the response tokens `tokens[:, prompt_len:]`.

    The hidden state at position t predicts token t+1, so the response's predictors are the
    positions prompt_len-1 .. P+R-2. The LM head is applied in chunks (never [B, R, V] at once).
    """
    hidden = model.hidden_states(tokens, attention_mask=attention_mask)        # [B, P+R, H]
    predictors = hidden[:, prompt_len - 1:-1]                                 # [B, R, H]
    targets = tokens[:, prompt_len:]                                          # [B, R]
    return logprobs.token_logprobs_and_entropy(predictors, model.lm_head_weight(), targets,
                                               temperature, chunk, flat_tokens=model.backend.cpu_forms)


def packed_logprobs(model, batch: PackedBatch, temperature: float, chunk: int):
    """log pi and entropy `[N, L]` of each slot's token of packed rows given the slots before it
    in its sequence: at the loss tokens only when the batch says so (`batch.head_pos`), else at
    every slot (0 at slot 0, which no slot predicts; a sequence's first slot is a prompt
    token)."""
    hidden = model.hidden_states(batch.tokens, segment_ids=batch.segment_ids)  # [N, L, H]
    cpu = model.backend.cpu_forms
    if batch.head_pos is not None:
        return logprobs.selected_logprobs_and_entropy(
            hidden, model.lm_head_weight(), batch.tokens, batch.head_pos, batch.head_slots,
            batch.group_rows, temperature, chunk, flat_tokens=cpu)
    logp, entropy = logprobs.token_logprobs_and_entropy(
        hidden[:, :-1], model.lm_head_weight(), batch.tokens[:, 1:], temperature, chunk,
        flat_tokens=cpu)
    first = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return first(logp), first(entropy)


def batch_logprobs(params, batch: PolicyBatch | PackedBatch, *, graphdef, settings: UpdateSettings):
    """`[B, R]` response log-probs of `batch` under `params` (no gradient), on the mesh the
    parameters are laid out on; see `_batch_logprobs`."""
    with using_mesh(mesh_of(params)):
        return _batch_logprobs(params, batch, graphdef=graphdef, settings=settings)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _batch_logprobs(params, batch: PolicyBatch, *, graphdef, settings: UpdateSettings):
    """`[B, R]` response log-probs of `batch` under `params` (no gradient): the old policy's
    when recomputed, or the reference policy's for the KL term.

    Computed micro-batch by micro-batch (`settings.micro_batch_size` rows, when it divides B), so
    the activations are those of one micro-batch, as in the update."""
    model = nnx.merge(graphdef, params)
    rows, response_len = batch.response_mask.shape
    mbs = settings.micro_batch_size if rows % settings.micro_batch_size == 0 else rows
    split = lambda x: constrain(x.reshape(rows // mbs, mbs, *x.shape[1:]), (None, "batch", None))  # noqa: E731
    if isinstance(batch, PackedBatch):  # [N, L]: every slot's log-prob
        if mbs % max(batch.group_rows, 1):
            mbs = rows
        fields = dataclasses.replace(batch, old_logp=None, adv=None, seg=None, resp=None,
                                     eps_low=None, eps_high=None, ref_logp=None)
        logp = jax.lax.map(lambda micro: packed_logprobs(model, micro, settings.temperature,
                                                         settings.logprob_chunk)[0],
                           jax.tree.map(split, fields))
    else:
        prompt_len = batch.tokens.shape[1] - response_len

        def one(micro):
            tokens, attention_mask = micro
            logp, _ = response_logprobs(model, tokens, attention_mask, prompt_len,
                                        settings.temperature, settings.logprob_chunk)
            return logp
        logp = jax.lax.map(one, (split(batch.tokens), split(batch.attention_mask)))
    return jnp.where(batch.response_mask > 0, logp.reshape(rows, response_len), 0.0)


def _micro_loss(params, graphdef, batch: PolicyBatch, num_tokens, num_seqs,
                settings: UpdateSettings):
    model = nnx.merge(graphdef, params)
    prompt_len = batch.tokens.shape[1] - batch.response_mask.shape[1]
    logp, entropy = response_logprobs(model, batch.tokens, batch.attention_mask, prompt_len,
                                      settings.temperature, settings.logprob_chunk)
    # batch.seg holds rollout-batch ids of sliced rows; policy_loss rebases them to this slice.
    return losses.policy_loss(settings.loss, logp, batch.old_logp, batch.adv, batch.response_mask,
                              batch.seg, batch.eps_low, batch.eps_high, num_tokens,
                              num_seqs=num_seqs, ref_logp=batch.ref_logp,
                              entropy=jax.lax.stop_gradient(entropy))


def _packed_micro_loss(params, graphdef, batch: PackedBatch, num_tokens, num_seqs,
                       settings: UpdateSettings):
    model = nnx.merge(graphdef, params)
    logp, entropy = packed_logprobs(model, batch, settings.temperature, settings.logprob_chunk)
    return losses.policy_loss(settings.loss, logp, batch.old_logp, batch.adv, batch.response_mask,
                              batch.seg, batch.eps_low, batch.eps_high, num_tokens,
                              num_seqs=num_seqs, ref_logp=batch.ref_logp,
                              entropy=jax.lax.stop_gradient(entropy), resp=batch.resp,
                              response_len=settings.response_len or None)


def update_step(params, opt_state, batch: PolicyBatch | PackedBatch, *, graphdef, optimizer,
                settings: UpdateSettings):
    """`_update_step` on the mesh the parameters are laid out on (`params` and `opt_state` are
    donated)."""
    with using_mesh(mesh_of(params)):
        return _update_step(params, opt_state, batch, graphdef=graphdef, optimizer=optimizer,
                            settings=settings)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "settings"),
                   donate_argnames=("params", "opt_state"))
def _update_step(params, opt_state, batch: PolicyBatch, *, graphdef, optimizer,
                 settings: UpdateSettings):
    """One optimizer step on `batch` (a mini-batch), summed over micro-batches.

    Returns (params, opt_state, metrics, grad_norm, finite). The micro-batch losses are
    normalised by the whole mini-batch's token and response counts, so their gradients add up to
    the mini-batch gradient exactly, whatever the micro-batch size.
    """
    global _compiles
    _compiles += 1  # runs once per trace, i.e. once per compilation
    rows, mbs = batch.num_rows, settings.micro_batch_size
    if rows % mbs:
        raise ValueError(f"mini-batch of {rows} rows is not divisible into micro-batches of {mbs}")
    packed = isinstance(batch, PackedBatch)
    if packed and batch.group_rows and mbs % batch.group_rows:
        raise ValueError(f"micro-batches of {mbs} rows do not hold whole head groups of "
                         f"{batch.group_rows} rows")
    mask = batch.response_mask.astype(jnp.float32)
    num_tokens = jnp.sum(mask)
    if packed:  # responses: the response ids holding a loss token
        ids = losses.rebase_segments(batch.resp).reshape(-1)
        num_seqs = jnp.sum(jax.ops.segment_max(mask.reshape(-1), ids, num_segments=ids.size) > 0)
    else:
        num_seqs = jnp.sum(jnp.sum(mask, axis=1) > 0)
    # Each micro-batch is split over the mesh's batch axes (not the scan axis over micro-batches).
    micro = jax.tree.map(
        lambda x: constrain(x.reshape(rows // mbs, mbs, *x.shape[1:]),
                            (None, "batch") + (None,) * (x.ndim - 1)), batch)
    grad_fn = jax.value_and_grad(_packed_micro_loss if packed else _micro_loss, has_aux=True)

    def accumulate(grad_sum, mb):
        (_, metrics), grads = grad_fn(params, graphdef, mb, num_tokens, num_seqs, settings)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, stacked = jax.lax.scan(accumulate, zeros, micro)
    metrics = combine_metrics([jax.tree.map(lambda x: x[i], stacked) for i in range(rows // mbs)])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss/sum"])
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics, grad_norm, finite
