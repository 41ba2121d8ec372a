"""Float64 NumPy reference of the objectives, written from ../shared/docs/sspo-spec.md with plain
loops over responses, subsentences and tokens, sharing no code with sspo_jax.

The gradient is derived by hand: with the token surrogate w_t = exp(l_t - sg(l_t) + sg(log S_k)),
dw_t/dl_s = w_t [s == t], so each token's term contributes only through its own l_t.
"""
from __future__ import annotations

import math

import numpy as np


def subsentences(tokens, mask, ends, dot_end=None, digit_start=None, min_tokens=1):
    """Per row, a list of local subsentence indices per position (padding follows the count)."""
    out = []
    for row, mrow in zip(tokens, mask):
        T = len(row)
        ids, current, length = [], 0, 0
        for t in range(T):
            ids.append(current)
            if not mrow[t]:
                continue
            length += 1
            is_end = bool(ends[row[t]])
            if is_end and dot_end is not None and dot_end[row[t]] and t + 1 < T \
                    and mrow[t + 1] and digit_start[row[t + 1]]:
                is_end = False
            if is_end and length >= min_tokens:
                current += 1
                length = 0
        out.append(ids)
    return np.array(out, dtype=np.int64)


def advantages(rewards, group_size, estimator="grpo", eps=1e-6):
    out = []
    for g in range(len(rewards) // group_size):
        r = [float(x) for x in rewards[g * group_size:(g + 1) * group_size]]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        for x in r:
            if max(r) == min(r):
                out.append(0.0)
            elif estimator == "grpo":
                out.append((x - mean) / (std + eps))
            elif estimator == "dr_grpo":
                out.append(x - mean)
            else:  # rloo: the mean of the other samples as the baseline
                out.append(x - (sum(r) - x) / (len(r) - 1))
    return np.array(out)


def _units(level, seg_row, mask_row):
    """{unit key: [t, ...]} over the masked tokens of one response."""
    units = {}
    for t in range(len(mask_row)):
        if not mask_row[t]:
            continue
        key = t if level == "token" else (seg_row[t] if level == "subsentence" else 0)
        units.setdefault(key, []).append(t)
    return units


def clip_bounds(cfg, mask, seg, entropy):
    B, T = mask.shape
    lo = np.full((B, T), cfg.eps_low)
    hi = np.full((B, T), cfg.eps_high)
    if cfg.entropy_lambda == 0:
        return lo, hi
    means = []  # (row, token list, mean entropy) per valid subsentence of the batch
    for i in range(B):
        for ts in _units("subsentence", seg[i], mask[i]).values():
            means.append((i, ts, sum(float(entropy[i, t]) for t in ts) / len(ts)))
    batch_mean = sum(h for _, _, h in means) / max(len(means), 1)
    for i, ts, h in means:
        rel = h / batch_mean if batch_mean > 0 else 1.0
        g = min(max(1 + cfg.entropy_lambda * (rel - 1), cfg.scale_min), cfg.scale_max)
        for t in ts:
            hi[i, t] = cfg.eps_high * g
            if cfg.adaptive_mode == "both":
                lo[i, t] = cfg.eps_low * g
    return lo, hi


def policy_loss(cfg, logp, old_logp, adv, mask, seg, lo, hi, num_tokens=None, num_seqs=None,
                ref_logp=None, outlier_gradient=False):
    """(loss, dloss/dlogp [B, T]) in float64. A token whose own |l - l_old| exceeds the clamp
    has no gradient (outlier_gradient=True: the old rule, w * A, for contrast)."""
    B, T = mask.shape
    lo = np.broadcast_to(np.asarray(lo, float), (B, T))
    hi = np.broadcast_to(np.asarray(hi, float), (B, T))
    c = cfg.log_ratio_clamp
    lengths = [int(sum(bool(x) for x in mask[i])) for i in range(B)]
    if num_tokens is None:
        num_tokens = sum(lengths)
    if num_seqs is None:
        num_seqs = sum(1 for n in lengths if n > 0)
    norm = T if cfg.token_sum_norm is None else cfg.token_sum_norm
    loss, grad = 0.0, np.zeros((B, T))
    for i in range(B):
        if lengths[i] == 0:
            continue
        if cfg.aggregation == "token-mean":
            weight = 1.0 / max(num_tokens, 1)
        elif cfg.aggregation == "seq-mean-token-mean":
            weight = 1.0 / (lengths[i] * max(num_seqs, 1))
        else:
            weight = 1.0 / (norm * max(num_seqs, 1))
        A = float(adv[i])
        for ts in _units(cfg.level, seg[i], mask[i]).values():
            ds = [min(max(float(logp[i, t]) - float(old_logp[i, t]), -c), c) for t in ts]
            w = math.exp(sum(ds) / len(ds))
            for t in ts:
                if A > 0 and w > 1 + hi[i, t]:
                    u, du = (1 + hi[i, t]) * A, 0.0
                elif A < 0 and w < 1 - lo[i, t]:
                    u, du = (1 - lo[i, t]) * A, 0.0
                else:
                    inside = abs(float(logp[i, t]) - float(old_logp[i, t])) <= c
                    u, du = w * A, (w * A if inside or outlier_gradient else 0.0)
                if cfg.dual_clip is not None and A < 0 and u < cfg.dual_clip * A:
                    u, du = cfg.dual_clip * A, 0.0
                loss -= weight * u
                grad[i, t] -= weight * du
                if cfg.kl_beta > 0:
                    r_raw = float(ref_logp[i, t]) - float(logp[i, t])
                    r = min(max(r_raw, -c), c)
                    loss += cfg.kl_beta * weight * (math.exp(r) - r - 1)
                    if -c < r_raw < c:
                        grad[i, t] += cfg.kl_beta * weight * -(math.exp(r) - 1)
    return loss, grad



def metrics(cfg, logp, old_logp, adv, mask, seg, lo, hi, entropy):
    """The spec's per-step loss metrics, by loops: {name: value}."""
    B, T = mask.shape
    lo = np.broadcast_to(np.asarray(lo, float), (B, T))
    hi = np.broadcast_to(np.asarray(hi, float), (B, T))
    c = cfg.log_ratio_clamp
    kinds = ("low", "high", "total") + (("dual",) if cfg.dual_clip is not None else ())
    counts = {f"{k}/{u}": 0 for k in kinds for u in ("token", "subsentence", "response")}
    ratios, neg_d, ents = [], [], []
    n_tokens = n_subs = n_resp = 0
    for i in range(B):
        flags_by_token = {}
        for ts in _units(cfg.level, seg[i], mask[i]).values():
            ds = [min(max(float(logp[i, t]) - float(old_logp[i, t]), -c), c) for t in ts]
            w = math.exp(sum(ds) / len(ds))
            for t, d in zip(ts, ds):
                low = adv[i] < 0 and w < 1 - lo[i, t]
                high = adv[i] > 0 and w > 1 + hi[i, t]
                dual = cfg.dual_clip is not None and adv[i] < 0 and w > cfg.dual_clip
                flags_by_token[t] = {"low": low, "high": high, "total": low or high, "dual": dual}
                ratios.append(w)
                neg_d.append(-d)
                ents.append(float(entropy[i, t]))
        if not flags_by_token:
            continue
        n_resp += 1
        n_tokens += len(flags_by_token)
        subs = _units("subsentence", seg[i], mask[i]).values()
        n_subs += len(subs)
        for k in kinds:
            counts[f"{k}/token"] += sum(f[k] for f in flags_by_token.values())
            counts[f"{k}/subsentence"] += sum(any(flags_by_token[t][k] for t in ts) for ts in subs)
            counts[f"{k}/response"] += any(f[k] for f in flags_by_token.values())
    out = {}
    for key, n in counts.items():
        kind, unit = key.split("/")
        den = {"token": n_tokens, "subsentence": n_subs, "response": n_resp}[unit]
        out[f"clip_frac_{kind}/{unit}"] = n / den if den else 0.0
    # Outliers: a token's own clamped |d| above the threshold; retained when its unit's clip
    # branch is not taken (nor the dual clip) and it is inside the clamp.
    tau = cfg.outlier_log_ratio
    n_out = n_kept = 0
    w_kept = w_all = 0.0
    for i in range(B):
        for ts in _units(cfg.level, seg[i], mask[i]).values():
            ds = [min(max(float(logp[i, t]) - float(old_logp[i, t]), -c), c) for t in ts]
            w = math.exp(sum(ds) / len(ds))
            for t, d in zip(ts, ds):
                w_all += abs(adv[i])
                if abs(d) <= tau:
                    continue
                n_out += 1
                clipped = ((adv[i] < 0 and w < 1 - lo[i, t]) or (adv[i] > 0 and w > 1 + hi[i, t])
                           or (cfg.dual_clip is not None and adv[i] < 0 and w > cfg.dual_clip))
                if not clipped and abs(d) < c:
                    n_kept += 1
                    w_kept += abs(adv[i])
    out["outliers/frac"] = n_out / n_tokens
    out["outliers/retained_frac"] = n_kept / n_tokens
    out["outliers/retained_adv_frac"] = w_kept / w_all if w_all else 0.0
    out.update(ratio_mean=sum(ratios) / len(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
               approx_kl=sum(neg_d) / len(neg_d), entropy_mean=sum(ents) / len(ents),
               subsentences_per_response=n_subs / n_resp, tokens_per_subsentence=n_tokens / n_subs)
    return out

# ---- random inputs shared by the loss tests (data, not math) ----
ENDS = np.array([False, True, True, False, False, False, False, False, False, False])  # V = 10
EOS = 9


def random_batch(seed=0, B=8, T=16, group_size=4):
    """Inputs with every awkward case: a truncated row, EOS + padding, an empty row, runs of
    delimiters (one-token subsentences), garbage on padding, per-row log-ratio scales from 1e-4
    (inside GSPO's clip range) to 2 (past the dual clip)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(ENDS), size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[1], lengths[2] = T, T // 2, 0
    tokens[3, :6] = [1, 2, 1, 5, 2, 2]
    mask = np.arange(T)[None, :] < lengths[:, None]
    for i in np.flatnonzero((lengths > 0) & (lengths < T)):
        tokens[i, lengths[i] - 1] = EOS  # finished rows end in EOS (in the mask); row 0 is cut off
    scales = np.array([1e-4, 3e-4, 1e-3, 3e-3, 0.05, 0.3, 2.0, 1e-4])[np.arange(B) % 8]
    logp = -rng.uniform(0.01, 3.0, size=(B, T))
    old = logp + rng.normal(size=(B, T)) * scales[:, None]
    ref = logp + rng.normal(size=(B, T)) * 0.3
    logp = np.where(mask, logp, 1e3)  # garbage on padding must be ignored
    adv = rng.normal(size=B)
    adv[4] = 0.0
    adv[5], adv[6] = abs(adv[5]), -abs(adv[6])  # noisy rows clip high (5) and low + dual (6)
    entropy = rng.uniform(0.0, 3.0, size=(B, T))
    return dict(tokens=tokens, mask=mask, logp=logp, old_logp=old, ref_logp=ref, adv=adv,
                entropy=entropy, group_size=group_size)
