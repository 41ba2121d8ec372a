"""The objectives against the float64 NumPy loop reference, and the spec's identities.

The JAX side runs with float64 enabled (a context manager, local to each test) because the
required agreement, 1e-6 on loss and gradient, is below float32's resolution of these sums.
"""
import dataclasses

import jax
import jax.numpy as jnp
import loss_reference as ref
import numpy as np
import pytest

from sspo_jax.rl import advantages, losses, segments

VARIANTS = {name: losses.preset(name) for name in losses.PRESETS}
VARIANTS.update({
    "grpo+dual_clip": losses.preset("grpo", dual_clip=3.0),
    "sspo+kl": losses.preset("sspo", kl_beta=0.1),
    "sspo+upper": losses.preset("sspo", adaptive_mode="upper", entropy_lambda=1.0),
    "gspo+token_mean": losses.preset("gspo", aggregation="token-mean"),
    "dr_grpo+norm": losses.preset("dr_grpo", token_sum_norm=40.0),
    "sspo+dual+kl+sum_norm": losses.preset("sspo", dual_clip=3.0, kl_beta=0.05,
                                           aggregation="seq-mean-token-sum-norm"),
})


def jax_loss_and_grad(cfg, b, seg, lo, hi, **kw):
    """loss, dloss/dlogp and metrics from sspo_jax, float64 (call inside enable_x64)."""
    def f(logp):
        return losses.policy_loss(cfg, logp, b["old_logp"], b["adv"], b["mask"], seg, lo, hi,
                                  ref_logp=b["ref_logp"], entropy=b["entropy"], **kw)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b["logp"]))
    return float(loss), np.asarray(grad), metrics


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference(name, seed):
    cfg, b = VARIANTS[name], ref.random_batch(seed)
    seg_ref = ref.subsentences(b["tokens"], b["mask"], ref.ENDS)
    with jax.enable_x64(True):
        seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        np.testing.assert_array_equal(
            np.asarray(seg), seg_ref + np.arange(len(seg_ref))[:, None] * seg_ref.shape[1])
        lo, hi = losses.clip_bounds(cfg, b["mask"], seg, jnp.asarray(b["entropy"]))
        lo_ref, hi_ref = ref.clip_bounds(cfg, b["mask"], seg_ref, b["entropy"])
        m = b["mask"]
        np.testing.assert_allclose(np.asarray(lo)[m], lo_ref[m], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(hi)[m], hi_ref[m], rtol=1e-12)
        loss, grad, _ = jax_loss_and_grad(cfg, b, seg, lo, hi)
    want_loss, want_grad = ref.policy_loss(cfg, b["logp"], b["old_logp"], b["adv"], m, seg_ref,
                                           lo_ref, hi_ref, ref_logp=b["ref_logp"])
    assert abs(loss - want_loss) <= 1e-6, (loss, want_loss)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-6)
    assert np.abs(want_grad).max() > 1e-3  # the batch really exercises the gradient


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_token_beyond_the_log_ratio_clamp_has_no_gradient(name):
    """d = +25 on a token of a row with A < 0 and d = -25 on one with A > 0 (and -25 / +25 on
    two more): each keeps its clamped value (+-20) in its unit's ratio, so the loss is the
    reference's, but contributes no gradient; the other tokens' gradients are the reference's.
    Under the old rule (w * A for an unclipped token) some preset gives such a token e^20 |A|."""
    cfg, b = VARIANTS[name], ref.random_batch(3)
    neg, pos = int(np.flatnonzero(b["adv"] < 0)[0]), int(np.flatnonzero(b["adv"] > 0)[0])
    outliers = [(neg, 1, 25.0), (pos, 2, -25.0), (neg, 3, -25.0), (pos, 0, 25.0)]
    for i, t, d in outliers:
        assert b["mask"][i, t]
        b["old_logp"][i, t] = b["logp"][i, t] - d
    seg_ref = ref.subsentences(b["tokens"], b["mask"], ref.ENDS)
    with jax.enable_x64(True):
        seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        lo, hi = losses.clip_bounds(cfg, b["mask"], seg, jnp.asarray(b["entropy"]))
        loss, grad, _ = jax_loss_and_grad(cfg, b, seg, lo, hi)
    lo_ref, hi_ref = ref.clip_bounds(cfg, b["mask"], seg_ref, b["entropy"])
    args = (cfg, b["logp"], b["old_logp"], b["adv"], b["mask"], seg_ref, lo_ref, hi_ref)
    want_loss, want_grad = ref.policy_loss(*args, ref_logp=b["ref_logp"])
    assert abs(loss - want_loss) <= 1e-6 * max(1.0, abs(want_loss)), (loss, want_loss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-9, atol=1e-6)
    if cfg.kl_beta == 0:  # (with KL the token keeps its KL term's gradient, checked above)
        for i, t, _ in outliers:
            assert grad[i, t] == 0.0, (i, t, grad[i, t])


def test_the_old_outlier_rule_gave_e20_gradients():
    """The contrast: GRPO without the rule gives the d = +25, A < 0 token a gradient of about
    e^20 |A| / tokens, far above every other entry."""
    cfg, b = losses.preset("grpo"), ref.random_batch(3)
    neg = int(np.flatnonzero(b["adv"] < 0)[0])
    b["old_logp"][neg, 1] = b["logp"][neg, 1] - 25.0
    seg = ref.subsentences(b["tokens"], b["mask"], ref.ENDS)
    lo, hi = ref.clip_bounds(cfg, b["mask"], seg, b["entropy"])
    args = (cfg, b["logp"], b["old_logp"], b["adv"], b["mask"], seg, lo, hi)
    _, old_rule = ref.policy_loss(*args, outlier_gradient=True)
    _, new_rule = ref.policy_loss(*args)
    assert abs(old_rule[neg, 1]) > 1e6 * np.abs(np.delete(old_rule.ravel(), neg * old_rule.shape[1] + 1)).max()
    assert new_rule[neg, 1] == 0.0


def test_reference_batch_hits_every_branch():
    """The random batch clips low, high and dual for grpo, so the comparisons above cover them."""
    b = ref.random_batch(0)
    with jax.enable_x64(True):
        seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        _, _, metrics = jax_loss_and_grad(VARIANTS["grpo+dual_clip"], b, seg, 0.2, 0.2)
    final = losses.finalize_metrics(metrics)
    for kind in ("low", "high", "dual"):
        assert final[f"clip_frac_{kind}/token"] > 0, kind
    assert final["clip_frac_total/token"] < 1


@pytest.mark.parametrize("name", ["grpo+dual_clip", "gspo", "sspo"])
def test_metrics_match_reference(name):
    cfg, b = VARIANTS[name], ref.random_batch(1)
    seg_ref = ref.subsentences(b["tokens"], b["mask"], ref.ENDS)
    with jax.enable_x64(True):
        seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        lo, hi = losses.clip_bounds(cfg, b["mask"], seg, jnp.asarray(b["entropy"]))
        _, _, metrics = jax_loss_and_grad(cfg, b, seg, lo, hi)
    got = losses.finalize_metrics(metrics)
    want = ref.metrics(cfg, b["logp"], b["old_logp"], b["adv"], b["mask"], seg_ref,
                       *ref.clip_bounds(cfg, b["mask"], seg_ref, b["entropy"]), b["entropy"])
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert 0 < want["clip_frac_total/token"] < 1 and 0 < want["clip_frac_total/subsentence"]
    # The batch has outlier tokens (|d| > 0.2); which are kept depends on the objective.
    assert 0 <= want["outliers/retained_frac"] <= want["outliers/frac"] and 0 < want["outliers/frac"] < 1


def test_gspo_keeps_the_outlier_tokens_grpo_clips():
    """The paper's point, on one batch: a response whose tokens swing both ways (d = +-0.5) has
    a sequence ratio near 1, so GSPO clips none of it and keeps every outlier; GRPO clips the
    tokens beyond its range on the advantage's side; SSPO's subsentences sit between."""
    B, T = 2, 12
    mask = np.ones((B, T), bool)
    logp = np.full((B, T), -1.0)
    d = np.tile(np.array([0.5, -0.5] * (T // 2)), (B, 1))
    old = logp - d
    adv = np.array([1.0, -1.0])
    tokens = np.zeros((B, T), int)
    tokens[:, 3::4] = 1  # a delimiter every 4 tokens: 3 subsentences per response
    kept = {}
    for name in ("grpo", "gspo", "sspo_fixed"):
        cfg = losses.preset(name)
        seg = segments.segment_ids(tokens, mask, ref.ENDS)
        _, metrics = losses.policy_loss(cfg, logp, old, adv, mask, seg, cfg.eps_low, cfg.eps_high)
        got = losses.finalize_metrics(metrics)
        assert got["outliers/frac"] == 1.0
        kept[name] = got["outliers/retained_frac"]
    assert kept["gspo"] == 1.0 and kept["grpo"] == 0.5, kept
    assert kept["grpo"] <= kept["sspo_fixed"] <= kept["gspo"], kept


def _loss_grad(cfg, b, seg, lo=None, hi=None):
    lo = cfg.eps_low if lo is None else lo
    hi = cfg.eps_high if hi is None else hi
    loss, grad, _ = jax_loss_and_grad(cfg, b, seg, lo, hi)
    return loss, grad


def test_identity_one_token_per_subsentence_is_grpo():
    b = ref.random_batch(2)
    B, T = b["mask"].shape
    grpo = losses.preset("grpo")
    sub = dataclasses.replace(grpo, level="subsentence")
    with jax.enable_x64(True):
        every_token = jnp.arange(B * T, dtype=jnp.int32).reshape(B, T)
        real_seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        want = _loss_grad(grpo, b, real_seg)
        got = _loss_grad(sub, b, every_token)
        # The table that makes every token a delimiter gives the same segmentation.
        all_ends = segments.segment_ids(b["tokens"], b["mask"], np.ones(10, bool))
        got_table = _loss_grad(sub, b, all_ends)
    for g in (got, got_table):
        assert g[0] == pytest.approx(want[0], abs=1e-12)
        np.testing.assert_allclose(g[1], want[1], atol=1e-12)


def test_identity_one_subsentence_per_response_is_gspo():
    b = ref.random_batch(3)
    gspo = losses.preset("gspo")
    sub = dataclasses.replace(gspo, level="subsentence")
    with jax.enable_x64(True):
        no_ends = segments.segment_ids(b["tokens"], b["mask"], np.zeros(10, bool))
        want = _loss_grad(gspo, b, segments.segment_ids(b["tokens"], b["mask"], ref.ENDS))
        got = _loss_grad(sub, b, no_ends)
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    np.testing.assert_allclose(got[1], want[1], atol=1e-12)


def test_identity_sspo_lambda_zero_is_sspo_fixed():
    b = ref.random_batch(4)
    with jax.enable_x64(True):
        seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
        ent = jnp.asarray(b["entropy"])
        results = []
        for cfg in (losses.preset("sspo", entropy_lambda=0.0), losses.preset("sspo_fixed")):
            lo, hi = losses.clip_bounds(cfg, b["mask"], seg, ent)
            results.append(_loss_grad(cfg, b, seg, lo, hi))
        adaptive = losses.preset("sspo")
        lo, hi = losses.clip_bounds(adaptive, b["mask"], seg, ent)
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert np.ptp(np.asarray(hi)[b["mask"]]) > 0  # lambda > 0 really varies the bounds


def test_group_advantages_matches_reference_and_zero_variance_groups():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.1, 0.7, 0.2, 0.2])
    for estimator in ("grpo", "dr_grpo", "rloo"):
        got = np.asarray(advantages.group_advantages(rewards, 4, estimator))
        np.testing.assert_allclose(got, ref.advantages(rewards, 4, estimator), atol=1e-6)
        assert np.all(got[4:8] == 0.0)  # exactly zero, no NaN, for an all-equal group
    assert sorted(advantages.ESTIMATORS) == ["dr_grpo", "grpo", "rloo"]
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        advantages.group_advantages(rewards, 4, "ppo")
    with pytest.raises(ValueError, match="advantage='ppo'"):
        losses.preset("grpo", advantage="ppo")
    assert losses.preset("dr_grpo").advantage == "dr_grpo"
    with pytest.raises(ValueError, match="multiple of group_size"):
        advantages.group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        advantages.group_advantages(rewards, 1)


def test_clip_bounds_adaptive_direction_and_range():
    """Higher-entropy subsentences get wider bounds; the scale stays inside [0.5, 2]."""
    b = ref.random_batch(5)
    cfg = losses.preset("sspo", entropy_lambda=5.0)
    seg = np.asarray(segments.segment_ids(b["tokens"], b["mask"], ref.ENDS))
    lo, hi = (np.asarray(x) for x in losses.clip_bounds(cfg, b["mask"], seg, b["entropy"]))
    m = b["mask"]
    g = hi[m] / cfg.eps_high
    np.testing.assert_allclose(lo[m] / cfg.eps_low, g, rtol=1e-6)
    assert g.min() == pytest.approx(0.5) and g.max() == pytest.approx(2.0)
    seg_entropy = {k: b["entropy"][m][seg[m] == k].mean() for k in np.unique(seg[m])}
    seg_scale = {k: g[seg[m] == k][0] for k in seg_entropy}
    order = sorted(seg_entropy, key=seg_entropy.get)
    assert np.all(np.diff([seg_scale[k] for k in order]) >= -1e-7)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown loss preset"):
        losses.preset("ppo")
    with pytest.raises(ValueError, match="unknown LossConfig field"):
        losses.preset("sspo", eps=0.1)
    with pytest.raises(ValueError, match="level="):
        losses.preset("sspo", level="word")
    with pytest.raises(ValueError, match="dual_clip"):
        losses.preset("grpo", dual_clip=0.5)
    b = ref.random_batch(0)
    seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
    with pytest.raises(ValueError, match="needs ref_logp"):
        losses.policy_loss(losses.preset("grpo", kl_beta=0.1), b["logp"], b["old_logp"],
                           b["adv"], b["mask"], seg, 0.2, 0.2)
    with pytest.raises(ValueError, match="adv must be"):
        losses.policy_loss(losses.preset("grpo"), b["logp"], b["old_logp"], b["adv"][:3],
                           b["mask"], seg, 0.2, 0.2)
    with pytest.raises(ValueError, match="seg and entropy"):
        losses.clip_bounds(losses.preset("sspo"), b["mask"], seg, b["entropy"][:, :3])
    assert losses.preset("sspo", delimiters=[".", "\n"]).delimiters == (".", "\n")
    assert losses.preset("sspo", eps_high=3e-3).eps_high == 3e-3
    assert dataclasses.replace(losses.preset("gspo"), eps_low=1e-4).level == "sequence"


def test_aggregate_modes_by_hand():
    x = np.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    agg = {m: losses.preset("grpo", aggregation=m, token_sum_norm=8.0) for m in losses.AGGREGATIONS}
    assert float(losses.aggregate(agg["token-mean"], x, mask)) == pytest.approx(10 / 4)
    assert float(losses.aggregate(agg["seq-mean-token-mean"], x, mask)) == pytest.approx((2 + 4) / 2)
    assert float(losses.aggregate(agg["seq-mean-token-sum-norm"], x, mask)) == pytest.approx(
        (6 / 8 + 4 / 8) / 2)
    default_norm = losses.preset("dr_grpo")  # C = T = 4 when token_sum_norm is None
    assert float(losses.aggregate(default_norm, x, mask)) == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert float(losses.aggregate(agg["token-mean"], x, mask, num_tokens=8)) == pytest.approx(10 / 8)
    assert float(losses.aggregate(agg["seq-mean-token-mean"], x, mask, num_seqs=4)) == \
        pytest.approx(6 / 4)
    assert float(losses.aggregate(agg["token-mean"], x, np.zeros_like(mask))) == 0.0


def test_rebase_segments_renumbers_sliced_rows():
    tokens = np.array([[1, 0, 2, 0], [0, 0, 0, 0], [2, 2, 0, 1]])
    mask = np.ones_like(tokens, bool)
    seg = np.asarray(segments.segment_ids(tokens, mask, ref.ENDS))
    np.testing.assert_array_equal(np.asarray(losses.rebase_segments(seg)), seg)
    np.testing.assert_array_equal(np.asarray(losses.rebase_segments(seg[1:])),
                                  np.asarray(segments.segment_ids(tokens[1:], mask[1:], ref.ENDS)))
