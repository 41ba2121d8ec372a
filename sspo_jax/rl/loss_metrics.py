"""Metrics of the policy loss, in a form that survives micro-batching.

Every metric is stored under keys with a suffix that says how two micro-batches combine:
`name/num` + `name/den` (a ratio: sums of both, read as num/den), `name/sum` (added),
`name/min`, `name/max` (min / max). `combine_metrics` merges a list of such dicts (micro-batches,
or devices after a host transfer), `finalize_metrics` turns one into plain `{name: value}`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _ratio(out, name, num, den):
    out[f"{name}/num"] = num
    out[f"{name}/den"] = den


def _any_per_unit(flags, ids, n):
    """`[n, k]` bool: unit id holds at least one token flagged by each of the k `[B, T]` flags
    (one scatter for all k)."""
    stacked = jnp.stack([f.astype(jnp.int32).ravel() for f in flags], axis=1)
    return jax.ops.segment_max(stacked, ids.ravel(), num_segments=n) > 0


def policy_metrics(*, w, d, mask, seg, resp, lo, hi, clip_low, clip_high, dual_hit, entropy, kl,
                   pg_loss, loss):
    """Metric dict of one (micro-)batch; all arguments `[B, T]` except the scalar losses (seg,
    resp: subsentence and response ids below B*T).

    Clip fractions count a token as clipped when the clipped branch of the surrogate is the one
    taken (low: A < 0 and w < 1 - eps_low; high: A > 0 and w > 1 + eps_high); a subsentence or a
    response counts as clipped when any of its tokens is.
    """
    f = jnp.float32 if w.dtype != jnp.float64 else jnp.float64
    w, d, lo, hi = (jax.lax.stop_gradient(x) for x in (w, d, lo, hi))
    B, T = mask.shape
    n = B * T
    m = mask.astype(f)
    tokens = jnp.sum(m)
    flags = {"low": clip_low, "high": clip_high, "total": clip_low | clip_high}
    if dual_hit is not None:
        flags["dual"] = dual_hit
    # Column 0: the subsentence holds a response token at all (is valid); then one per flag.
    per_subsentence = _any_per_unit([mask, *flags.values()], seg, n)
    num_subsentences = jnp.sum(per_subsentence[:, 0]).astype(f)
    per_response = _any_per_unit([mask, *flags.values()], resp, n)           # resp: response ids
    num_responses = jnp.sum(per_response[:, 0]).astype(f)
    out = {}
    for j, (kind, flag) in enumerate(flags.items(), start=1):
        _ratio(out, f"clip_frac_{kind}/token", jnp.sum(flag).astype(f), tokens)
        _ratio(out, f"clip_frac_{kind}/subsentence",
               jnp.sum(per_subsentence[:, j]).astype(f), num_subsentences)
        _ratio(out, f"clip_frac_{kind}/response",
               jnp.sum(per_response[:, j]).astype(f), num_responses)
    _ratio(out, "ratio_mean", jnp.sum(w * m), tokens)
    out["ratio_min/min"] = jnp.min(jnp.where(mask, w, jnp.inf))
    out["ratio_max/max"] = jnp.max(jnp.where(mask, w, -jnp.inf))
    _ratio(out, "approx_kl", jnp.sum(-d * m), tokens)
    _ratio(out, "clip_eps_low_mean", jnp.sum(lo * m), tokens)
    _ratio(out, "clip_eps_high_mean", jnp.sum(hi * m), tokens)
    _ratio(out, "subsentences_per_response", num_subsentences, num_responses)
    _ratio(out, "tokens_per_subsentence", tokens, num_subsentences)
    if entropy is not None:
        _ratio(out, "entropy_mean", jnp.sum(jax.lax.stop_gradient(entropy) * m), tokens)
    if kl is not None:
        _ratio(out, "kl_ref", jnp.sum(jax.lax.stop_gradient(kl) * m), tokens)
    out["pg_loss/sum"] = jax.lax.stop_gradient(pg_loss)
    out["loss/sum"] = jax.lax.stop_gradient(loss)
    return out


def outlier_metrics(*, d, adv, mask, kept, threshold: float, clamp: float):
    """The paper's GSPO failure mode, for every objective: tokens whose own |d| exceeds
    `threshold` (outliers) that the update keeps (their unit was not clipped and they are within
    the clamp, so they carry a gradient). All `[B, T]`; d the clamped masked log-ratio.

    outliers/frac: outliers per token; outliers/retained_frac: kept outliers per token;
    outliers/retained_adv_frac: the kept outliers' share of sum |A| over the tokens (how much of
    the update's weight they carry)."""
    f = jnp.float32 if d.dtype != jnp.float64 else jnp.float64
    d, adv = jax.lax.stop_gradient(d), jax.lax.stop_gradient(adv)
    m = mask.astype(f)
    outlier = mask & (jnp.abs(d) > threshold)
    retained = outlier & kept & (jnp.abs(d) < clamp)
    weight = jnp.abs(adv).astype(f) * m
    out = {}
    _ratio(out, "outliers/frac", jnp.sum(outlier).astype(f), jnp.sum(m))
    _ratio(out, "outliers/retained_frac", jnp.sum(retained).astype(f), jnp.sum(m))
    _ratio(out, "outliers/retained_adv_frac", jnp.sum(jnp.where(retained, weight, 0.0)), jnp.sum(weight))
    return out


def combine_metrics(parts):
    """Merge metric dicts of micro-batches (or devices) into the dict of their union."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine_metrics needs at least one metrics dict")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"metric dicts differ in keys: {sorted(keys ^ set(p))}")
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        kind = k.rsplit("/", 1)[-1]
        if kind in ("num", "den", "sum"):
            out[k] = sum(vals[1:], vals[0])
        elif kind == "min":
            out[k] = jnp.min(jnp.stack(vals))
        elif kind == "max":
            out[k] = jnp.max(jnp.stack(vals))
        else:
            raise ValueError(f"metric key {k!r} has no combine rule (suffix /num /den /sum /min /max)")
    return out


def finalize_metrics(metrics) -> dict[str, float]:
    """Plain `{name: float}`: num/den ratios (0 when the denominator is 0), sums, mins, maxes.

    A min/max over no tokens at all (every row masked) is reported as NaN.
    """
    out = {}
    for k, v in metrics.items():
        name, kind = k.rsplit("/", 1)
        v = float(np.asarray(v))
        if kind == "num":
            den = float(np.asarray(metrics[f"{name}/den"]))
            out[name] = v / den if den > 0 else 0.0
        elif kind in ("sum", "min", "max"):
            out[name] = v if np.isfinite(v) else float("nan")
    return out
