"""Qwen2ForCausalLM (JAX) against transformers.Qwen2ForCausalLM (PyTorch) on random weights."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import tiny_hf
from sspo_jax import model as M

# (q heads, kv heads, hidden, tied, rope_theta, vocab): GQA ratios 7, 6, 2, 1.
CONFIGS = {
    "gqa7_untied_1e4": dict(num_attention_heads=7, num_key_value_heads=1, hidden_size=56,
                            tie_word_embeddings=False, rope_theta=1e4, vocab_size=131),
    "gqa6_tied_1e6": dict(num_attention_heads=6, num_key_value_heads=1, hidden_size=48,
                          tie_word_embeddings=True, rope_theta=1e6, vocab_size=97),
    "gqa2_untied_1e6": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                            tie_word_embeddings=False, rope_theta=1e6, vocab_size=131),
    "gqa1_tied_1e4": dict(num_attention_heads=2, num_key_value_heads=2, hidden_size=32,
                          tie_word_embeddings=True, rope_theta=1e4, vocab_size=67),
}
LENGTHS = [11, 6, 1, 9]  # left padding of 0, 5, 10 and 2 tokens
F32_MAX_ABS = 1e-4
# bf16 (params + compute) logits vs the float32 torch reference, relative Frobenius norm over real
# tokens. Measured on these configs (2-core CPU): 0.0091-0.0130 for JAX, 0.0097-0.0124 for
# transformers' own bf16 model, a ratio of 0.94-1.05. Bounds: 0.016, and 1.15x transformers' bf16.
BF16_REL_FROB = 0.016
BF16_VS_TORCH_BF16 = 1.15

forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = tiny_hf.make_qwen2(path, seed=len(request.param), **CONFIGS[request.param])
    ids, mask = tiny_hf.left_padded_batch(LENGTHS, CONFIGS[request.param]["vocab_size"], seed=3)
    logits = tiny_hf.reference_logits(ref, ids, mask)
    logits_bf16 = tiny_hf.reference_logits(ref.to(torch.bfloat16), ids, mask)
    return path, ids, mask, logits, logits_bf16


def _jax_logits(path, ids, mask, dtype):
    m = M.from_pretrained(path, dtype=dtype)
    return np.asarray(forward(m, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))


def test_float32_logits_match_transformers(case):
    path, ids, mask, ref, _ = case
    out = _jax_logits(path, ids, mask, jnp.float32)
    assert out.dtype == np.float32 and out.shape == ref.shape
    real = mask.numpy().astype(bool)
    assert np.isfinite(out).all()  # pad rows too: masking is finite
    assert np.abs(out - ref)[real].max() <= F32_MAX_ABS


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="splash runs on TPU, and interpreted on CPU")
def test_splash_logits_match_transformers(case):
    """The model with attention='splash' (Pallas's interpreter on CPU) within the float32 bound."""
    path, ids, mask, ref, _ = case
    m = M.from_pretrained(path, attention="splash")
    assert m.backend.attention == "splash"
    out = np.asarray(forward(m, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    real = mask.numpy().astype(bool)
    assert np.isfinite(out).all()
    assert np.abs(out - ref)[real].max() <= F32_MAX_ABS


FUSED = "cudnn" if jax.default_backend() == "gpu" else "splash"


@pytest.mark.parametrize("attention", ["xla", FUSED])
def test_packed_sequences_give_each_sequence_alone(case, attention):
    """Three prompts packed in one row (segment ids 1, 2, 3, then padding): each one's logits
    equal the prompt run alone; positions restart in every sequence. cudnn (GPU) in bfloat16,
    to 2e-2 (bf16 rounding of two differently shaped kernels), float32 to 1e-5 otherwise."""
    path, ids, mask, _, _ = case
    half = attention == "cudnn"
    m = M.from_pretrained(path, attention=attention, dtype=jnp.bfloat16 if half else jnp.float32)
    rows = [ids[r, -int(mask[r].sum()):].numpy() for r in (0, 1, 3)]
    packed = np.concatenate(rows + [np.zeros(3, np.int64)])[None]
    seg = np.concatenate([np.full(len(x), i + 1) for i, x in enumerate(rows)] + [np.zeros(3, np.int64)])[None]
    got = np.asarray(nnx.jit(lambda m, i, s: m(i, segment_ids=s))(m, jnp.asarray(packed), jnp.asarray(seg)))[0]
    at = 0
    for x in rows:
        alone = np.asarray(forward(m, jnp.asarray(x[None]), jnp.ones((1, len(x)), jnp.int32)))[0]
        np.testing.assert_allclose(got[at:at + len(x)], alone, atol=2e-2 if half else 1e-5, rtol=0)
        at += len(x)


def test_bfloat16_logits_close_to_float32_reference(case):
    path, ids, mask, ref, ref_bf16 = case
    out = _jax_logits(path, ids, mask, jnp.bfloat16)
    assert out.dtype == np.float32
    real = mask.numpy().astype(bool)

    def rel(x):
        return np.linalg.norm(x[real] - ref[real]) / np.linalg.norm(ref[real])

    assert rel(out) <= BF16_REL_FROB, rel(out)
    assert rel(out) <= BF16_VS_TORCH_BF16 * rel(ref_bf16), (rel(out), rel(ref_bf16))


def test_left_padding_gives_unpadded_logits(case):
    """A left-padded row's logits equal the same prompt run alone, without padding."""
    path, ids, mask, _, _ = case
    m = M.from_pretrained(path)
    row = 1
    n = int(mask[row].sum())
    alone = np.asarray(forward(m, jnp.asarray(ids[row:row + 1, -n:].numpy()), jnp.ones((1, n), jnp.int32)))
    padded = _jax_logits(path, ids, mask, jnp.float32)[row, -n:]
    np.testing.assert_allclose(padded, alone[0], atol=1e-5, rtol=0)


def test_hidden_states_and_lm_head_give_logits(case):
    path, ids, mask, ref, _ = case
    m = M.from_pretrained(path)
    hidden = nnx.jit(lambda m, i, a: m.hidden_states(i, attention_mask=a))(
        m, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    w = m.lm_head_weight()
    assert hidden.shape == (*ids.shape, m.config.hidden_size)
    assert w.shape == (m.config.hidden_size, m.config.vocab_size)
    logits = np.asarray(hidden @ w)
    real = mask.numpy().astype(bool)
    assert np.abs(logits - ref)[real].max() <= F32_MAX_ABS


@pytest.fixture(scope="module")
def remat_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("remat")
    tiny_hf.make_qwen2(path, seed=5)
    ids, mask = tiny_hf.left_padded_batch([6, 3], 131, seed=5)
    return path, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())


def _loss_of_state(graphdef, ids, mask):
    def loss(state):
        logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)
    return loss


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_policy_wraps_the_layer_and_keeps_logits(remat_case, remat):
    path, ids, mask = remat_case
    plain, remat_model = M.from_pretrained(path), M.from_pretrained(path, remat=remat)
    def remat_policies(m):  # policies of the checkpointed calls anywhere in the forward's jaxpr
        jaxpr = jax.make_jaxpr(_loss_of_state(nnx.graphdef(m), ids, mask))(nnx.state(m)).jaxpr
        found, stack = [], [jaxpr]
        while stack:
            for eqn in stack.pop().eqns:
                if "policy" in eqn.params:
                    found.append(eqn.params["policy"])
                stack.extend(sub.jaxpr if hasattr(sub, "jaxpr") else sub
                             for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return found

    assert remat_policies(remat_model) == [M.REMAT_POLICIES[remat]]
    assert remat_policies(plain) == []
    np.testing.assert_array_equal(np.asarray(forward(plain, ids, mask)), np.asarray(forward(remat_model, ids, mask)))


@pytest.mark.slow  # two gradient compilations: ~8 s idle, 40 s on a loaded 2-core CPU
def test_remat_keeps_gradients(remat_case):
    path, ids, mask = remat_case
    grads = []
    for remat in ("none", "full"):
        m = M.from_pretrained(path, remat=remat)
        grads.append(jax.jit(jax.grad(_loss_of_state(nnx.graphdef(m), ids, mask)))(nnx.state(m)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_unknown_remat_policy_is_rejected():
    cfg = M.Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0), remat="sometimes")


def test_layers_compile_as_one_scanned_body():
    """The traced program has the same size for 2 and 28 layers: one scan over stacked layers."""
    def program(num_layers):
        cfg = M.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        abstract = nnx.eval_shape(lambda: M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        ids = jax.ShapeDtypeStruct((2, 5), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids).jaxpr
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        return len(jaxpr.eqns), [e.params["length"] for e in scans]

    assert program(2)[1] == [2] and program(28)[1] == [28]
    assert program(2)[0] == program(28)[0]
