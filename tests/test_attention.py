"""Every attention implementation against the reference (`xla`), forward and gradient.

Inputs are random, float32: GQA group sizes 1, 2, 6, 7; head_dim 64 and 128; rows left padded,
several packed sequences per row, T not a multiple of splash's block. Tolerance: 2e-5 relative
to the largest value compared (float32 sums in a different order; measured up to ~3e-6).
`splash` runs through Pallas's interpreter on CPU (exact, slow); `cudnn` needs a GPU (run by
benchmarks/device_check.sh), and its call is checked here through JAX's XLA implementation.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sspo_jax import parallel
from sspo_jax.model import attention as A
from sspo_jax.model import backend as B
from sspo_jax.model import cpu_forms

REL_TOL = 2e-5
on_gpu = jax.default_backend() == "gpu"
# Splash is a TPU kernel; off a TPU it runs interpreted, which the CPU tests do (not the GPU check).
splash_here = pytest.mark.skipif(on_gpu, reason="splash runs on TPU, and interpreted on CPU")


def _segments(b: int, t: int, rng) -> np.ndarray:
    """Row 0: left padding then one sequence; row 1: three packed sequences then padding; more
    rows alternate."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        if r % 2 == 0:
            seg[r, int(rng.integers(1, t // 3)):] = 1
        else:
            cuts = np.sort(rng.choice(np.arange(2, t - 2), 3, replace=False))
            for i, (lo, hi) in enumerate(zip([0, *cuts[:2]], cuts)):
                seg[r, lo:hi] = i + 1
    return seg


def _inputs(b, t, hkv, groups, d, seed):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, hkv * groups, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32) for _ in range(2))
    return q, k, v, jnp.asarray(_segments(b, t, rng))


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _fwd_and_grads(fn, q, k, v, seg, cotangent):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg) * cotangent)
    out = jax.jit(fn)(q, k, v, seg)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _check_against_xla(fn, b, t, hkv, groups, d, seed=0):
    q, k, v, seg = _inputs(b, t, hkv, groups, d, seed)
    cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(q.shape), jnp.float32)
    want_out, want_grads = _fwd_and_grads(A.xla_attention, q, k, v, seg, cotangent)
    got_out, got_grads = _fwd_and_grads(fn, q, k, v, seg, cotangent)
    assert np.isfinite(np.asarray(got_out)).all()
    assert _rel(got_out, want_out) < REL_TOL  # every position, padding included
    for name, got, want in zip("qkv", got_grads, want_grads):
        assert _rel(got, want) < REL_TOL, name


SHAPES = [  # (batch, T, kv heads, groups, head_dim)
    (2, 200, 2, 1, 64),
    (2, 150, 1, 2, 128),
    (3, 130, 2, 6, 64),
    (2, 77, 1, 7, 128),
]


@pytest.mark.parametrize("b,t,hkv,groups,d", SHAPES)
def test_cpu_query_blocks_equal_xla(b, t, hkv, groups, d):
    _check_against_xla(cpu_forms.causal_block_attention, b, t, hkv, groups, d)


@splash_here
@pytest.mark.parametrize("b,t,hkv,groups,d", SHAPES)
def test_splash_equals_xla(b, t, hkv, groups, d):
    _check_against_xla(functools.partial(A.splash_attention, interpret=jax.default_backend() != "tpu"),
                       b, t, hkv, groups, d)


@splash_here
def test_splash_over_several_blocks_equals_xla():
    """T = 1.5 blocks of 512: several query/key blocks, causal block skipping, a padded tail."""
    _check_against_xla(functools.partial(A.splash_attention, interpret=jax.default_backend() != "tpu"),
                       1, 768, 1, 2, 64)


@splash_here
@pytest.mark.parametrize("hkv,groups", [(2, 3), (1, 4)])
def test_splash_on_a_2x2x2_mesh_equals_xla(hkv, groups):
    """Under data=2 x fsdp=2 x tensor=2, in shard_map: rows split 4 ways, and kv heads 2 ways
    (2 kv heads) or each kv head's query heads 2 ways (1 kv head)."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    splash = functools.partial(A.splash_attention, interpret=True)
    q, k, v, seg = _inputs(4, 136, hkv, groups, 64, seed=5)
    cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)
    want_out, want_grads = _fwd_and_grads(A.xla_attention, q, k, v, seg, cotangent)
    with parallel.using_mesh(mesh):
        q_s, k_s, v_s, seg_s, c_s = (
            jax.device_put(x, parallel.named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape))
            for x in (q, k, v, seg, cotangent))
        out, grads = _fwd_and_grads(splash, q_s, k_s, v_s, seg_s, c_s)
        hlo = jax.jit(splash).lower(q_s, k_s, v_s, seg_s).as_text()
    assert "sdy.manual_computation" in hlo
    local_q = f"tensor<1x136x{hkv // 2 or 1}x{groups // 2 if hkv == 1 else groups}x64xf32>"
    assert local_q in hlo  # each device's share: 1 row, and half the kv heads or half of each group
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert _rel(out, want_out) < REL_TOL
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) < REL_TOL


@pytest.mark.parametrize("b,t,hkv,groups,d", SHAPES[:2])
def test_cudnn_call_semantics_equal_xla(b, t, hkv, groups, d):
    """cudnn_attention's arguments (causal, the segment mask) through JAX's own XLA implementation
    of the same function: the masking is right wherever cuDNN runs it."""
    _check_against_xla(functools.partial(A.cudnn_attention, implementation="xla"), b, t, hkv, groups, d)


@pytest.mark.skipif(not on_gpu, reason="cuDNN flash attention needs an NVIDIA GPU (benchmarks/device_check.sh)")
@pytest.mark.parametrize("b,t,hkv,groups,d", SHAPES)
def test_cudnn_equals_xla_in_bfloat16(b, t, hkv, groups, d):
    """bfloat16 (cuDNN has no float32 kernel) against the float32 reference: 2e-2 relative."""
    q, k, v, seg = _inputs(b, t, hkv, groups, d, 0)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    want_out, want_grads = _fwd_and_grads(A.xla_attention, q, k, v, seg, cotangent)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got_out, got_grads = _fwd_and_grads(A.cudnn_attention, *half, seg, cotangent.astype(jnp.bfloat16))
    assert _rel(got_out.astype(jnp.float32), want_out) < 2e-2
    for got, want in zip(got_grads, want_grads):
        assert _rel(got.astype(jnp.float32), want) < 2e-2


def test_segment_positions_restart_in_every_sequence():
    seg = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 2, 3, 0]])
    np.testing.assert_array_equal(np.asarray(A.segment_positions(seg)), [[0, 1, 0, 1, 2], [0, 1, 0, 0, 0]])


def test_backend_choices():
    assert B.resolve("auto", "cpu") == B.Backend("cpu", "xla")
    assert B.resolve("auto", "tpu") == B.Backend("tpu", "splash")
    assert B.resolve("auto", "gpu", jnp.bfloat16) == B.Backend("gpu", "cudnn")
    assert B.resolve("auto", "gpu", jnp.float32) == B.Backend("gpu", "xla")  # no float32 cuDNN kernel
    with pytest.raises(ValueError, match="attention='cudnn' does not run on cpu"):
        B.resolve("cudnn", "cpu")
    with pytest.raises(ValueError, match="attention='splash' does not run on gpu"):
        B.resolve("splash", "gpu", jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a bfloat16 or float16 compute dtype"):
        B.resolve("cudnn", "gpu", jnp.float32)
    with pytest.raises(ValueError, match="attention='flash': choose one of"):
        B.resolve("flash", "cpu")


def test_cudnn_needs_a_head_dim_it_has_a_kernel_for():
    assert B.resolve("auto", "gpu", jnp.bfloat16, head_dim=12) == B.Backend("gpu", "xla")
    with pytest.raises(ValueError, match="multiple of 8 and at most 256, this model's is 12"):
        B.resolve("cudnn", "gpu", jnp.bfloat16, head_dim=12)
