"""Loss and gradient do not depend on padding, micro-batching or sharding; extremes stay finite.

These run in float32, the training precision (and one compiled shape family for the whole file,
which keeps the file fast): "unchanged" means equal up to float32 rounding of reordered sums,
rtol 1e-5; the bugs these guard against (padding counted, wrong normaliser) move results by
percents.
"""
import jax
import jax.numpy as jnp
import loss_reference as ref
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sspo_jax.rl import losses, segments

# dr_grpo with an explicit constant: its default divisor is the padded length T, which padding
# changes by design.
CONFIGS = {name: losses.preset(name) for name in losses.PRESETS}
CONFIGS["dr_grpo"] = losses.preset("dr_grpo", token_sum_norm=40.0)
CONFIGS["sspo+kl+dual"] = losses.preset("sspo", kl_beta=0.1, dual_clip=3.0)


def loss_grad_metrics(cfg, b, seg, lo, hi, **kw):
    def f(logp):
        return losses.policy_loss(cfg, logp, b["old_logp"], b["adv"], b["mask"], seg, lo, hi,
                                  ref_logp=b["ref_logp"], entropy=b["entropy"], **kw)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b["logp"]))
    return loss, grad, metrics


def f32(b):
    return {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64
                else v) for k, v in b.items()}


def prepared(cfg, b):
    seg = segments.segment_ids(b["tokens"], b["mask"], ref.ENDS)
    lo, hi = losses.clip_bounds(cfg, b["mask"], seg, b["entropy"])
    return seg, lo, hi


def assert_metrics_close(got, want, rtol):
    got, want = losses.finalize_metrics(got), losses.finalize_metrics(want)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rtol, abs=1e-12, nan_ok=True), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_does_not_change_loss_grad_or_metrics(name):
    cfg, b = CONFIGS[name], f32(ref.random_batch(6))
    pad = 8
    padded = {k: np.pad(v, ((0, 0), (0, pad)), constant_values=(-3 if k == "logp" else 1))
              if isinstance(v, np.ndarray) and v.ndim == 2 else v for k, v in b.items()}
    padded["mask"] = np.pad(b["mask"], ((0, 0), (0, pad)))
    loss, grad, metrics = loss_grad_metrics(cfg, b, *prepared(cfg, b))
    loss_p, grad_p, metrics_p = loss_grad_metrics(cfg, padded, *prepared(cfg, padded))
    assert float(loss_p) == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad_p)[:, :-pad], grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad_p)[:, -pad:] == 0)
    assert_metrics_close(metrics_p, metrics, 1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_micro_batches_accumulate_to_the_full_batch(name):
    """Bounds and segment ids come from the whole batch (sliced rows, as a trainer does); each
    micro-batch gets the whole batch's token and response counts."""
    cfg, b = CONFIGS[name], f32(ref.random_batch(7))
    seg, lo, hi = prepared(cfg, b)
    loss, grad, metrics = loss_grad_metrics(cfg, b, seg, lo, hi)
    num_tokens = int(b["mask"].sum())
    num_seqs = int((b["mask"].sum(1) > 0).sum())
    total, grads, parts = 0.0, [], []
    for rows in (slice(0, 4), slice(4, 8)):
        mb = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in b.items()}
        l, g, m = loss_grad_metrics(cfg, mb, seg[rows], lo[rows], hi[rows],
                                    num_tokens=num_tokens, num_seqs=num_seqs)
        total, grads, parts = total + float(l), grads + [np.asarray(g)], parts + [m]
    assert total == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(np.concatenate(grads), grad, rtol=1e-5, atol=1e-7)
    assert_metrics_close(losses.combine_metrics(parts), metrics, 1e-5)


def test_sharding_over_8_devices_changes_nothing():
    """Segment ids, adaptive bounds (a batch-wide mean), KL and dual clip, all sharded by row."""
    assert len(jax.devices()) == 8
    cfg, b = CONFIGS["sspo+kl+dual"], f32(ref.random_batch(8, B=16, group_size=4))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows, scalars = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def step(logp, old_logp, adv, mask, tokens, entropy, ref_logp):
        seg = segments.segment_ids(tokens, mask, ref.ENDS)
        lo, hi = losses.clip_bounds(cfg, mask, seg, entropy)
        def f(lp):
            return losses.policy_loss(cfg, lp, old_logp, adv, mask, seg, lo, hi,
                                      ref_logp=ref_logp, entropy=entropy)
        return jax.value_and_grad(f, has_aux=True)(logp)

    names = ("logp", "old_logp", "adv", "mask", "tokens", "entropy", "ref_logp")
    args = [jnp.asarray(b[k]) for k in names]
    (loss, metrics), grad = jax.jit(step)(*args)
    sharded = [jax.device_put(a, rows) for a in args]
    (loss_s, metrics_s), grad_s = jax.jit(step, out_shardings=((scalars, scalars), rows))(
        *sharded)
    assert grad_s.sharding.is_equivalent_to(rows, 2)
    assert float(loss_s) == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grad_s), np.asarray(grad), rtol=1e-5, atol=1e-7)
    assert_metrics_close(metrics_s, metrics, 1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_extremes_stay_finite(name):
    """log-ratios of +-50 (float32, the training precision), zero advantages, masked rows."""
    cfg, b = CONFIGS[name], ref.random_batch(9)
    sign = np.where(np.arange(b["logp"].size).reshape(b["logp"].shape) % 2, 1.0, -1.0)
    b = dict(b, old_logp=b["logp"] - 50.0 * sign, ref_logp=b["logp"] + 50.0 * sign)
    b32 = f32(b)
    cases = {"extreme": b32, "zero_adv": dict(b32, adv=np.zeros_like(b32["adv"])),
             "all_masked": dict(b32, mask=np.zeros_like(b32["mask"])),
             "rows_masked": dict(b32, mask=b32["mask"] & (np.arange(8) % 2 == 0)[:, None])}
    for case, batch in cases.items():
        loss, grad, metrics = loss_grad_metrics(cfg, batch, *prepared(cfg, batch))
        assert np.isfinite(float(loss)), case
        assert np.all(np.isfinite(np.asarray(grad))), case
        if case in ("zero_adv", "all_masked") and cfg.kl_beta == 0:
            assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0), case
        final = losses.finalize_metrics(metrics)
        assert all(np.isfinite(v) for k, v in final.items() if not k.startswith("ratio_m")), case


def test_combine_metrics_rules():
    a = {"x/num": 1.0, "x/den": 2.0, "lo/min": 0.5, "hi/max": 3.0, "l/sum": 0.25, "e/num": 0.0,
         "e/den": 0.0}
    c = {"x/num": 3.0, "x/den": 2.0, "lo/min": 0.2, "hi/max": 1.0, "l/sum": 0.5, "e/num": 0.0,
         "e/den": 0.0}
    got = losses.finalize_metrics(losses.combine_metrics([a, c]))
    assert got == {"x": 1.0, "lo": pytest.approx(0.2), "hi": 3.0, "l": 0.75, "e": 0.0}
    with pytest.raises(ValueError, match="differ in keys"):
        losses.combine_metrics([a, {"x/num": 1.0}])
