"""Incremental decoding with the KV cache reproduces the full forward pass."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_hf
from sspo_jax import model as M
from sspo_jax.model import cpu_forms

PROMPT_LENGTHS = [7, 3, 5]
PROMPT_LEN = 8  # one pad even in the longest row
STEPS = 4

forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
cached = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    # GQA 3:1 so the cache holds fewer heads than the queries use.
    tiny_hf.make_qwen2(path, seed=11, num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    return M.from_pretrained(path)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache_tied")
    tiny_hf.make_qwen2(path, seed=12, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                       tie_word_embeddings=True)
    return M.from_pretrained(path)


def _prompt():
    ids, mask = tiny_hf.left_padded_batch(PROMPT_LENGTHS, 131, total=PROMPT_LEN, seed=2)
    return jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(mask.numpy(), jnp.int32)


def test_init_cache_follows_the_contract(model):
    cache = model.init_cache(3, 16)
    cfg = model.config
    assert cache.k.shape == cache.v.shape == (cfg.num_hidden_layers, 3, cfg.num_key_value_heads, 16, cfg.head_dim)
    assert cache.k.dtype == jnp.float32
    assert cache.mask.shape == (3, 16) and cache.mask.dtype == jnp.bool_ and not cache.mask.any()
    assert cache.index.dtype == jnp.int32 and int(cache.index) == 0
    assert model.init_cache(1, 4, dtype=jnp.bfloat16).k.dtype == jnp.bfloat16


def test_prefill_then_greedy_steps_match_full_forward(model):
    ids, mask = _prompt()
    cache = model.init_cache(len(PROMPT_LENGTHS), PROMPT_LEN + STEPS + 3)  # spare slots stay unused
    logits, cache = cached(model, ids, mask, cache)
    step_logits = [logits[:, -1]]
    real = np.asarray(mask, bool)  # pad query rows see no key: their (finite) logits are unused
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(forward(model, ids, mask))[real],
                               atol=1e-5, rtol=0)
    for _ in range(STEPS):
        token = jnp.argmax(step_logits[-1], axis=-1).astype(jnp.int32)[:, None]
        ids = jnp.concatenate([ids, token], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(token)], axis=1)
        logits, cache = cached(model, token, jnp.ones_like(token), cache)
        assert logits.shape == (len(PROMPT_LENGTHS), 1, model.config.vocab_size)
        step_logits.append(logits[:, 0])
    assert int(cache.index) == PROMPT_LEN + STEPS
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :PROMPT_LEN + STEPS]), np.asarray(mask, bool))
    assert not cache.mask[:, PROMPT_LEN + STEPS:].any()
    full = np.asarray(forward(model, ids, mask))  # [B, PROMPT_LEN + STEPS, V]
    for s, got in enumerate(step_logits):
        np.testing.assert_allclose(np.asarray(got), full[:, PROMPT_LEN - 1 + s], atol=1e-5, rtol=0)


def test_chunked_prefill_matches_full_forward(model):
    """Two multi-token calls (T > 1 after the first) equal one forward over both chunks."""
    ids, mask = _prompt()
    cache = model.init_cache(len(PROMPT_LENGTHS), PROMPT_LEN)
    first, cache = cached(model, ids[:, :5], mask[:, :5], cache)
    second, cache = cached(model, ids[:, 5:], mask[:, 5:], cache)
    full = np.asarray(forward(model, ids, mask))
    got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=0)


def test_overfull_cache_is_rejected(model):
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="do not fit a KV cache of max_len 4"):
        model(ids, attention_mask=mask, cache=model.init_cache(3, 4))
    cache = model.init_cache(3, PROMPT_LEN).replace(index=jnp.int32(PROMPT_LEN))
    with pytest.raises(ValueError, match="KV cache full: index 8 \\+ 1 tokens > max_len 8"):
        model(ids[:, :1], attention_mask=mask[:, :1], cache=cache)


@pytest.mark.parametrize("split_bytes", [None, 0], ids=["default", "every_matrix_split"])
@pytest.mark.parametrize("which", ["model", "tied_model"])
def test_decode_weights_give_the_same_cached_step(which, split_bytes, request):
    """The unrolled per-layer path (sampler's decode loop) equals the scanned one, cache included,
    with an untied head (transposed once) and a tied one (the embedding read vocabulary-major),
    with whole matrices and with every matrix in output blocks (split_bytes=0)."""
    model = request.getfixturevalue(which)
    ids, mask = _prompt()
    cache = model.init_cache(len(PROMPT_LENGTHS), PROMPT_LEN + 2)
    _, cache = cached(model, ids, mask, cache)
    token = jnp.asarray([[5], [17], [130]], jnp.int32)
    with_weights = nnx.jit(lambda m, t, c: M.Decoder(m, m._cpu_decode_weights(split_bytes))(t, c))
    want_logits, want_cache = cached(model, token, jnp.ones_like(token), cache)
    got_logits, got_cache = with_weights(model, token, cache)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-6, rtol=0)
    for got, want in zip((got_cache.k, got_cache.v, got_cache.mask), (want_cache.k, want_cache.v, want_cache.mask)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
    assert int(got_cache.index) == PROMPT_LEN + 1
    weights = model._cpu_decode_weights(split_bytes)
    cfg = model.config
    assert len(weights["layers"]) == cfg.num_hidden_layers
    head = weights["head_vh"]
    if split_bytes is None:  # the test model is far below DECODE_SPLIT_MODEL_BYTES: whole matrices
        assert head.shape == (cfg.vocab_size, cfg.hidden_size)
        assert weights["layers"][0]["gate_w"].shape == (cfg.hidden_size, cfg.intermediate_size)
    else:
        parts = cpu_forms.DECODE_SPLIT_PARTS
        sizes = [len(b) for b in np.array_split(np.arange(cfg.vocab_size), parts)]  # 131: uneven
        assert [b.shape for b in head] == [(n, cfg.hidden_size) for n in sizes]
        gate = weights["layers"][0]["gate_w"]
        assert [b.shape for b in gate] == [(cfg.hidden_size, cfg.intermediate_size // parts)] * parts
        np.testing.assert_array_equal(np.concatenate(gate, axis=1), np.asarray(model.layers.stacked()["gate_w"][0]))
