"""Supervised warm start: teach a fresh policy the answer format before RL.

RL from verifiable rewards needs a policy that is sometimes right: a random model never writes
`\\boxed{...}`, every reward is 0, every advantage is 0, and nothing is learned. The CPU demo
therefore first fits the synthetic task's worked solutions for a few hundred steps (plain
next-token cross-entropy on the response, the prompt is context only), then hands over to RL.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from sspo_jax.data.templates import render_prompt
from sspo_jax.parallel import mesh_of, named_sharding, put_batch, using_mesh
from sspo_jax.train.update import init_optimizer, response_logprobs


def encode_examples(rows: Sequence[dict], tokenizer, *, template: str, prompt_len: int,
                    response_len: int):
    """(tokens [N, P+R], attention_mask [N, P+R], response_mask [N, R]) int32 arrays.

    Prompts are left padded to P, solutions + EOS right padded to R; rows that do not fit are
    skipped (their count is returned as the 4th value) rather than cut, so no example teaches a
    truncated answer.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the warm start needs a tokenizer with eos and pad tokens")
    tokens, attn, resp, skipped = [], [], [], 0
    for row in rows:
        p = tokenizer(render_prompt(row["problem"], template, tokenizer),
                      add_special_tokens=False)["input_ids"]
        r = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) > prompt_len or len(r) > response_len:
            skipped += 1
            continue
        t = np.full(prompt_len + response_len, pad, np.int32)
        m = np.zeros(prompt_len + response_len, np.int32)
        t[prompt_len - len(p):prompt_len], m[prompt_len - len(p):prompt_len] = p, 1
        t[prompt_len:prompt_len + len(r)], m[prompt_len:prompt_len + len(r)] = r, 1
        tokens.append(t)
        attn.append(m)
        resp.append(m[prompt_len:])
    if not tokens:
        raise ValueError(f"no warm-start example fits prompt_len={prompt_len}, "
                         f"response_len={response_len}")
    return np.stack(tokens), np.stack(attn), np.stack(resp), skipped


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "prompt_len", "chunk"),
                   donate_argnames=("params", "opt_state"))
def _sft_step(params, opt_state, tokens, attn, resp_mask, *, graphdef, optimizer, prompt_len,
              chunk):
    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        logp, _ = response_logprobs(model, tokens, attn, prompt_len, 1.0, chunk)
        m = resp_mask.astype(jnp.float32)
        return -jnp.sum(logp * m) / jnp.maximum(jnp.sum(m), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def warm_start(model, examples, *, steps: int, lr: float, batch_size: int, prompt_len: int,
               seed: int, chunk: int = 128, log: Callable[[int, float], None] | None = None):
    """Fits `model` (in place) to `examples` from `encode_examples` for `steps` Adam steps, on
    the devices its parameters are on (one device, or a mesh).

    Batches are drawn by a seeded permutation, epoch after epoch, so the result is reproducible.
    Returns the list of per-step losses.
    """
    tokens, attn, resp = examples[:3]
    n = tokens.shape[0]
    if n < batch_size:
        raise ValueError(f"{n} warm-start examples cannot fill a batch of {batch_size}")
    graphdef, params = nnx.split(model)
    place = _batch_placer(params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
    opt_state = init_optimizer(optimizer, params)
    rng = np.random.default_rng(seed)
    order, pos, history = rng.permutation(n), 0, []
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        batch = [place(a[idx]) for a in (tokens, attn, resp)]
        with using_mesh(mesh_of(params)):
            params, opt_state, loss = _sft_step(params, opt_state, *batch, graphdef=graphdef,
                                                optimizer=optimizer, prompt_len=prompt_len,
                                                chunk=chunk)
        history.append(float(loss))
        if log is not None:
            log(step, history[-1])
    nnx.update(model, params)
    return history


def _batch_placer(params):
    """How a host batch enters the step: as it is for a model on one device; split over the
    mesh's batch axes for a model on a mesh (an HF checkpoint loaded there, which may span
    processes: each process then feeds only its devices' rows)."""
    home = jax.tree.leaves(params)[0].sharding
    if not isinstance(home, NamedSharding):
        return lambda x: x
    return lambda x: put_batch(x, named_sharding(home.mesh, ("batch", None), x.shape))
