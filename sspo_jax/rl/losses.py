"""Policy objectives of the GRPO family as pure functions: GRPO, DAPO, Dr. GRPO, GSPO, SSPO.

Formulas: docs/algorithms.md (the project's statement of ../shared/docs/sspo-spec.md). All arrays
are over response tokens: `[B, T]` with `mask` 1 on response tokens up to and including EOS.
Metrics live in `loss_metrics.py`; this file holds the arithmetic of the loss.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sspo_jax.rl import advantages, loss_metrics
from sspo_jax.rl.loss_metrics import combine_metrics, finalize_metrics  # noqa: F401  (public API)
from sspo_jax.rl.segments import DEFAULT_DELIMITERS

LEVELS = ("token", "subsentence", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADAPTIVE_MODES = ("both", "upper")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Every knob of the objective (hashable, so it can be a static jit argument)."""
    level: str = "token"                  # unit sharing one importance ratio: LEVELS
    eps_low: float = 0.2                  # clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    entropy_lambda: float = 0.0           # adaptive clip strength; 0 = fixed bounds
    scale_min: float = 0.5                # g = clip(1 + lambda (h - 1), scale_min, scale_max)
    scale_max: float = 2.0
    adaptive_mode: str = "both"           # "both": scale both bounds; "upper": eps_high only
    dual_clip: float | None = None        # c > 1: for A < 0, u = max(u, c A); None = off
    kl_beta: float = 0.0                  # weight of k3 KL to the reference policy
    aggregation: str = "seq-mean-token-mean"
    token_sum_norm: float | None = None   # seq-mean-token-sum-norm constant; None = T (padded len)
    advantage: str = "grpo"               # estimator (rl/advantages.py): grpo | dr_grpo | rloo
    adv_eps: float = 1e-6                 # grpo: A = (R - mean) / (std + adv_eps)
    log_ratio_clamp: float = 20.0         # d = clamp(logp - old_logp, -c, c)
    # Metric only: a token is an outlier when its own |d| exceeds this (0.2: a token ratio
    # beyond about [0.82, 1.22], GRPO's clip range); `outliers/retained_*` count those an update
    # keeps (their unit unclipped), GSPO's failure mode in the paper.
    outlier_log_ratio: float = 0.2
    # Subsentence splitting (used by the trainer with `segments`). protect_math: no boundary
    # inside math, factorials, LaTeX spaces, ratios, abbreviations; a trailing EOS joins the last
    # subsentence (rl/math_boundaries.py). With min_subsentence_tokens = 3 this removes the 1-2
    # token pieces (29% -> 0.1% of pieces on Qwen2.5-Math style text, docs/algorithms.md).
    delimiters: tuple[str, ...] = DEFAULT_DELIMITERS
    decimal_guard: bool = True
    protect_math: bool = True
    min_subsentence_tokens: int = 3

    def __post_init__(self):
        if isinstance(self.delimiters, list):  # from a config file; a tuple keeps it hashable
            object.__setattr__(self, "delimiters", tuple(self.delimiters))

        def need(ok, msg):
            if not ok:
                raise ValueError(f"LossConfig: {msg}")
        need(self.level in LEVELS, f"level={self.level!r}, choose one of {LEVELS}")
        need(self.advantage in advantages.ESTIMATORS,
             f"advantage={self.advantage!r}, choose one of {sorted(advantages.ESTIMATORS)}")
        need(self.aggregation in AGGREGATIONS,
             f"aggregation={self.aggregation!r}, choose one of {AGGREGATIONS}")
        need(self.adaptive_mode in ADAPTIVE_MODES,
             f"adaptive_mode={self.adaptive_mode!r}, choose one of {ADAPTIVE_MODES}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0,
             f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        need(self.entropy_lambda >= 0, f"entropy_lambda must be >= 0, got {self.entropy_lambda}")
        need(0 < self.scale_min <= 1 <= self.scale_max,
             f"need 0 < scale_min <= 1 <= scale_max, got {self.scale_min}, {self.scale_max}")
        need(self.scale_max * self.eps_low < 1 or self.entropy_lambda == 0,
             "scale_max * eps_low must stay < 1 so the lower bound 1 - eps stays positive")
        need(self.dual_clip is None or self.dual_clip > 1,
             f"dual_clip must be None (off) or > 1 (e.g. 3.0), got {self.dual_clip}")
        need(self.kl_beta >= 0, f"kl_beta must be >= 0, got {self.kl_beta}")
        need(self.token_sum_norm is None or self.token_sum_norm > 0,
             f"token_sum_norm must be None or > 0, got {self.token_sum_norm}")
        need(self.adv_eps > 0 and self.log_ratio_clamp > 0, "adv_eps and log_ratio_clamp must be > 0")
        need(0 < self.outlier_log_ratio < self.log_ratio_clamp,
             f"outlier_log_ratio must be in (0, log_ratio_clamp), got {self.outlier_log_ratio}")
        need(self.min_subsentence_tokens >= 1,
             f"min_subsentence_tokens must be >= 1, got {self.min_subsentence_tokens}")
        need(isinstance(self.delimiters, tuple) and len(self.delimiters) > 0,
             "delimiters must be a non-empty tuple of strings")


PRESETS: dict[str, LossConfig] = {
    "grpo": LossConfig(level="token", eps_low=0.2, eps_high=0.2),
    "dapo": LossConfig(level="token", eps_low=0.2, eps_high=0.28, aggregation="token-mean"),
    "dr_grpo": LossConfig(level="token", eps_low=0.2, eps_high=0.2,
                          aggregation="seq-mean-token-sum-norm", advantage="dr_grpo"),
    "gspo": LossConfig(level="sequence", eps_low=3e-4, eps_high=4e-4),
    # Subsentence eps: GSPO's scaled by sqrt(~500 tokens per response / ~12 per subsentence),
    # the shrinkage of a mean log-ratio's spread; see docs/algorithms.md. A tuning knob.
    "sspo": LossConfig(level="subsentence", eps_low=2e-3, eps_high=2.5e-3, entropy_lambda=0.5),
    "sspo_fixed": LossConfig(level="subsentence", eps_low=2e-3, eps_high=2.5e-3),
}


def preset(name: str, **overrides) -> LossConfig:
    """The named preset's LossConfig, with any field overridden: preset("sspo", eps_high=3e-3)."""
    if name not in PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LossConfig field(s) {unknown}; fields are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def rebase_segments(seg):
    """Segment ids `[B, T]` renumbered to this batch's rows (row i starts at i*T).

    Makes rows sliced out of a bigger batch's ids (a micro-batch, a device shard) valid again
    for the `B*T` segments of this batch; a no-op on ids straight from `segment_ids`.
    """
    seg = jnp.asarray(seg, jnp.int32)
    B, T = seg.shape
    return seg - seg[:, :1] + (jnp.arange(B, dtype=jnp.int32) * T)[:, None]


def row_ids(shape) -> jax.Array:
    """`[B, T]` response ids of the padded layout (one response per row): row i is i*T."""
    B, T = shape
    return jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None] * T, (B, T))


def _unit_ids(level: str, seg, resp):
    """`[B, T]` ids of the unit each token shares its ratio with, all below B*T."""
    B, T = seg.shape
    if level == "token":
        return jnp.arange(B * T, dtype=jnp.int32).reshape(B, T)
    if level == "subsentence":
        return seg
    return resp


def _segment_mean(x, mask, ids):
    """Masked mean of x `[B, T]` over each id: `(mean [B*T], count [B*T])`, indexed by id."""
    n = ids.size  # B*T: a static upper bound on the number of ids
    w = mask.astype(x.dtype)
    # Sum and count in one scatter of [B*T, 2] rows: a scatter's cost is mostly per index.
    sums = jax.ops.segment_sum(jnp.stack([(x * w).ravel(), w.ravel()], axis=1), ids.ravel(),
                               num_segments=n)
    total, count = sums[:, 0], sums[:, 1]
    return total / jnp.maximum(count, 1), count


def _masked_log_ratio(cfg: LossConfig, logp, old_logp, mask):
    """d = clamp(logp - old_logp, -c, c), zeroed where mask = 0. `[B, T]`."""
    d = jnp.where(mask, logp - old_logp, 0.0)
    return jnp.clip(d, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)


def _surrogate_log_ratio(cfg: LossConfig, logp, old_logp, mask, seg, resp):
    """Token surrogate log w_t = l_t - sg(l_t) + sg(log S_k(t)): value log S_k, gradient dl_t.

    log S_k is the mean of the clamped d over the unit k (token, subsentence or response): one
    segment_sum path for all three levels. log S_k is already in [-c, c] (a mean of clamped
    values), so no second clamp is needed before the exp.
    """
    d = jax.lax.stop_gradient(_masked_log_ratio(cfg, logp, old_logp, mask))
    ids = _unit_ids(cfg.level, seg, resp)
    log_s, _ = _segment_mean(d, mask, ids)
    # A token beyond the clamp keeps its clamped value in S_k but carries no gradient (as verl
    # and tunix): an unclipped one would get e^c |A| (e^20 at the default) and swamp the
    # clipped global norm of the whole update (../shared/docs/sspo-spec.md, "Ratios").
    inside = jnp.abs(jax.lax.stop_gradient(logp - old_logp)) <= cfg.log_ratio_clamp
    grad_path = jnp.where(inside, logp - jax.lax.stop_gradient(logp), 0.0)
    return grad_path + log_s[ids], d


def clip_bounds(cfg: LossConfig, mask, seg, entropy):
    """Per-token clip bounds `(eps_low [B, T], eps_high [B, T])` from a whole rollout batch.

    With entropy_lambda > 0: the subsentence entropy Hbar_k (mean token entropy of the sampling
    policy) relative to the mean over all valid subsentences of the batch, h_k, gives the scale
    g_k = clip(1 + lambda (h_k - 1), scale_min, scale_max) of the bounds. Call it once on the
    whole rollout batch, before splitting it, so the result does not depend on the split.
    """
    mask = jnp.asarray(mask).astype(bool)
    if mask.ndim != 2 or jnp.shape(seg) != mask.shape or jnp.shape(entropy) != mask.shape:
        raise ValueError(f"mask, seg and entropy must all be [B, T], got {mask.shape}, "
                         f"{jnp.shape(seg)} and {jnp.shape(entropy)}")
    B, T = mask.shape
    seg = rebase_segments(seg)
    dtype = jnp.result_type(jnp.asarray(entropy).dtype, jnp.float32)
    lo = jnp.full((B, T), cfg.eps_low, dtype)
    hi = jnp.full((B, T), cfg.eps_high, dtype)
    if cfg.entropy_lambda == 0:
        return lo, hi
    ent = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(entropy, dtype), 0.0))
    h_bar, count = _segment_mean(ent, mask, seg)                                 # [B*T]
    valid = count > 0
    batch_mean = jnp.sum(jnp.where(valid, h_bar, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    rel = jnp.where(batch_mean > 0, h_bar / jnp.where(batch_mean > 0, batch_mean, 1.0), 1.0)
    g = jnp.clip(1.0 + cfg.entropy_lambda * (rel - 1.0), cfg.scale_min, cfg.scale_max)[seg]
    hi = hi * g
    if cfg.adaptive_mode == "both":
        lo = lo * g
    return lo, hi


def aggregate(cfg: LossConfig, x, mask, num_tokens=None, num_seqs=None, *, resp=None,
              response_len=None):
    """Scalar aggregate of per-token x `[B, T]` by cfg.aggregation.

    num_tokens / num_seqs: the masked token count / non-empty response count of the whole
    mini-batch when this call sees one micro-batch of it, so the micro-batch results add up to
    the mini-batch's. Default: this batch's own counts. resp: `[B, T]` response ids (below B*T,
    as `rebase_segments` makes them) when rows hold several responses or parts of them (packed
    rows); None: one response per row. response_len: the padded response length, the default
    divisor of seq-mean-token-sum-norm (default T).
    """
    w = mask.astype(x.dtype)
    if cfg.aggregation == "token-mean":
        n = jnp.sum(w) if num_tokens is None else num_tokens
        return jnp.sum(x * w) / jnp.maximum(n, 1)
    if resp is None:
        tokens_per, sums = jnp.sum(w, axis=1), jnp.sum(x * w, axis=1)          # [B]
    else:
        both = jax.ops.segment_sum(jnp.stack([(x * w).ravel(), w.ravel()], axis=1), resp.ravel(),
                                   num_segments=resp.size)
        sums, tokens_per = both[:, 0], both[:, 1]                               # [B*T] by id
    if cfg.aggregation == "seq-mean-token-mean":
        per_response = sums / jnp.maximum(tokens_per, 1)
    else:  # seq-mean-token-sum-norm: a constant divisor, the same for every response
        norm = cfg.token_sum_norm if cfg.token_sum_norm is not None else (response_len or mask.shape[1])
        per_response = sums / norm
    n = jnp.sum(tokens_per > 0) if num_seqs is None else num_seqs
    return jnp.sum(per_response) / jnp.maximum(n, 1)


def _check_shapes(logp, old_logp, adv, mask, seg, lo, hi, ref_logp, entropy):
    shape = jnp.shape(logp)
    if len(shape) != 2:
        raise ValueError(f"logp must be [B, T], got shape {shape}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("seg", seg),
                    ("ref_logp", ref_logp), ("entropy", entropy)):
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {jnp.shape(x)}")
    for name, x in (("lo", lo), ("hi", hi)):
        if jnp.shape(x) not in ((), shape):
            raise ValueError(f"{name} must be a scalar or [B, T] = {shape}, got {jnp.shape(x)}")
    if jnp.shape(adv) not in (shape[:1], shape):
        raise ValueError(f"adv must be [B] = {shape[:1]} or per token [B, T], got {jnp.shape(adv)}")


def policy_loss(cfg: LossConfig, logp, old_logp, adv, mask, seg, lo, hi, num_tokens=None, *,
                num_seqs=None, ref_logp=None, entropy=None, resp=None, response_len=None):
    """Clipped-surrogate loss and its metrics: `(loss scalar, metrics dict)`.

    logp: `[B, T]` current-policy token log-probs (the only input with a gradient); old_logp:
    the sampling policy's; adv `[B]`; mask `[B, T]`; seg `[B, T]` from `segments.segment_ids`;
    lo, hi: clip bounds, scalars or `[B, T]` from `clip_bounds`; num_tokens / num_seqs: whole
    mini-batch counts for gradient accumulation (see `aggregate`); ref_logp `[B, T]`: the
    reference policy, required when kl_beta > 0; entropy `[B, T]`: only for the metrics.
    Packed rows (several responses per row, a response possibly split over micro-batches): adv
    per token `[B, T]`, resp `[B, T]` response ids (like seg: unique per response, made valid
    by `rebase_segments`), response_len the padded response length (see `aggregate`).
    Metrics are numerator/denominator pairs: merge micro-batches with `combine_metrics`, read
    them with `finalize_metrics`.
    """
    _check_shapes(logp, old_logp, adv, mask, seg, lo, hi, ref_logp, entropy)
    if cfg.kl_beta > 0 and ref_logp is None:
        raise ValueError(f"kl_beta={cfg.kl_beta} > 0 needs ref_logp (the reference policy's "
                         f"token log-probs); pass it or set kl_beta=0")
    mask = jnp.asarray(mask).astype(bool)
    seg = rebase_segments(seg)
    rows = resp is None
    resp = row_ids(mask.shape) if rows else rebase_segments(resp)
    logp = jnp.where(mask, logp, 0.0)  # garbage (even inf) on padding must not reach the grad
    log_w, d = _surrogate_log_ratio(cfg, logp, jnp.where(mask, old_logp, 0.0), mask, seg, resp)
    w = jnp.exp(log_w)                                                          # [B, T]
    a = jnp.asarray(adv, w.dtype)
    a = a[:, None] if a.ndim == 1 else a                                        # [B, 1] or [B, T]
    lo = jnp.broadcast_to(jnp.asarray(lo, w.dtype), w.shape)
    hi = jnp.broadcast_to(jnp.asarray(hi, w.dtype), w.shape)
    # min(w A, clip(w) A) written as a choice, so a clipped token has exactly zero gradient.
    clip_high = mask & (a > 0) & (w > 1 + hi)
    clip_low = mask & (a < 0) & (w < 1 - lo)
    u = jnp.where(clip_high, (1 + hi) * a, jnp.where(clip_low, (1 - lo) * a, w * a))
    dual_hit = jnp.zeros_like(mask)
    if cfg.dual_clip is not None:
        dual_hit = mask & (a < 0) & (w > cfg.dual_clip)  # w A < c A: bounded below by c A
        u = jnp.where(dual_hit, cfg.dual_clip * a, u)
    by = dict(resp=None if rows else resp, response_len=response_len)
    pg_loss = -aggregate(cfg, u, mask, num_tokens, num_seqs, **by)
    loss, kl = pg_loss, None
    if ref_logp is not None:
        r = jnp.clip(jnp.where(mask, ref_logp, 0.0) - logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        kl = jnp.exp(r) - r - 1.0                                               # k3 >= 0
        if cfg.kl_beta > 0:
            loss = loss + cfg.kl_beta * aggregate(cfg, kl, mask, num_tokens, num_seqs, **by)
    metrics = loss_metrics.policy_metrics(
        w=w, d=d, mask=mask, seg=seg, resp=resp, lo=lo, hi=hi, clip_low=clip_low, clip_high=clip_high,
        dual_hit=dual_hit if cfg.dual_clip is not None else None, entropy=entropy, kl=kl,
        pg_loss=pg_loss, loss=loss)
    metrics.update(loss_metrics.outlier_metrics(
        d=d, adv=jnp.broadcast_to(a, w.shape), mask=mask, kept=~(clip_low | clip_high | dual_hit),
        threshold=cfg.outlier_log_ratio, clamp=cfg.log_ratio_clamp))
    return loss, metrics
