"""Advantage estimators: one advantage per response, from the rewards of its group (the G
samples of one prompt). Registered by name, chosen by `LossConfig.advantage`:

- `grpo`: (R - group mean) / (group std + eps), the std unbiased (ddof=1, as TRL and verl);
- `dr_grpo`: R - group mean (Dr. GRPO: no std division, which favours low-variance groups);
- `rloo`: R - mean of the other G - 1 rewards (REINFORCE leave-one-out), = G / (G - 1) x dr_grpo.

Whatever the estimator, a group whose rewards are all equal gets exactly 0 (no NaN, no
rounding residue). A new estimator is a function `(rewards [groups, G], eps) -> [groups, G]`
decorated with `@register("name")`.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

ESTIMATORS: dict[str, Callable] = {}


def register(name: str):
    """Adds the decorated `(rewards [groups, G], eps) -> advantages [groups, G]` as `name`."""
    def add(fn):
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered already")
        ESTIMATORS[name] = fn
        return fn
    return add


@register("grpo")
def _grpo(r, eps):
    return (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, ddof=1, keepdims=True) + eps)


@register("dr_grpo")
def _dr_grpo(r, eps):  # noqa: ARG001 - no std, no eps
    return r - r.mean(axis=1, keepdims=True)


@register("rloo")
def _rloo(r, eps):  # noqa: ARG001
    g = r.shape[1]
    return (r - r.mean(axis=1, keepdims=True)) * (g / (g - 1))


def group_advantages(rewards, group_size: int, estimator: str = "grpo", eps: float = 1e-6):
    """`[B]` advantages of group-major rows (rows g*G .. g*G+G-1 share a prompt) by the named
    estimator (`ESTIMATORS`)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
    rewards = jnp.asarray(rewards)
    rewards = rewards.astype(jnp.result_type(rewards.dtype, jnp.float32))
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs peers), got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size}, "
                         f"got shape {rewards.shape}")
    r = rewards.reshape(-1, group_size)                                        # [B/G, G]
    adv = ESTIMATORS[estimator](r, eps)
    flat = (r.max(axis=1) == r.min(axis=1))[:, None]  # rounding must not leak a tiny advantage
    return jnp.where(flat, 0.0, adv).reshape(-1)
