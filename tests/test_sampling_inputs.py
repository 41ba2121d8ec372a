"""Sampler input handling: clear errors before compilation, prompt buckets, config canonicalisation."""
import jax
import numpy as np
import pytest
from flax import nnx

from sspo_jax import model as M
from sspo_jax.generate import sampler

CFG = M.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=40)


def random_model(seed):
    # Random weights filled in from NumPy: eager NNX init compiles one RNG program per parameter.
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: M.Qwen2ForCausalLM(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes))


@pytest.fixture(scope="module")
def model():
    return random_model(0)


def prompts(lengths, width=None):
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        if n:
            ids[r, -n:], mask[r, -n:] = np.arange(1, n + 1), 1
    return ids, mask


GOOD = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(2,), pad_id=0)
BAD = [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=-3), "max_new_tokens=-3"),
    (dict(num_samples=0), "num_samples=0"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(eos_ids=(2, 50)), r"eos_ids \[50\] are outside the vocabulary \[0, 50\)"),
    (dict(eos_ids=(-1,)), r"eos_ids \[-1\]"),
    (dict(pad_id=2), "pad_id=2 is also an EOS id"),
    (dict(pad_id=77), "pad_id=77 is outside the vocabulary"),
    (dict(max_new_tokens=35), "exceeds the model's max_position_embeddings=40"),  # 6-token prompt + 35 > 40
]


@pytest.mark.parametrize("override,message", BAD, ids=[m for _, m in BAD])
def test_bad_settings_raise_before_compiling(model, override, message):
    ids, mask = prompts([3, 6])
    before = sampler.compile_count()
    with pytest.raises(ValueError, match=message):
        sampler.generate(model, ids, mask, jax.random.key(0), **{**GOOD, **override})
    assert sampler.compile_count() == before


@pytest.mark.parametrize("ids_mask,message", [
    (prompts([3, 0]), r"empty prompt in rows \[1\]"),
    ((np.zeros((0, 4), np.int32), np.zeros((0, 4), np.int32)), "empty batch"),
    ((np.ones((2, 3), np.int32), np.array([[1, 1, 0], [1, 1, 1]])), r"rows \[0\] are not left padded"),
    ((np.ones((2, 3), np.int32), np.ones((2, 4), np.int32)), "must both be"),
    ((np.full((1, 3), 50), np.ones((1, 3), np.int32)), "prompt token ids outside the vocabulary"),
    (prompts([39]), "prompt of 39 tokens"),  # the prompt alone nearly fills the positions
], ids=["empty_prompt", "empty_batch", "right_padded", "shape_mismatch", "token_out_of_vocab", "prompt_too_long"])
def test_bad_prompts_raise_before_compiling(model, ids_mask, message):
    before = sampler.compile_count()
    with pytest.raises(ValueError, match=message):
        sampler.generate(model, *ids_mask, jax.random.key(0), **GOOD)
    assert sampler.compile_count() == before


def test_out_of_vocab_ids_under_the_padding_are_ignored(model):
    """Pad positions may hold anything (e.g. -100 or a tokenizer pad beyond the vocab)."""
    ids, mask = prompts([2, 4])
    kw = {**GOOD, "max_new_tokens": 2}
    clean = sampler.generate(model, ids, mask, jax.random.key(0), **kw)
    ids[0, :2] = -100
    dirty = sampler.generate(model, ids, mask, jax.random.key(0), **kw)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_new_weights_reuse_the_compiled_program(model):
    """Parameters are arguments of the program, not constants: a policy update does not recompile."""
    ids, mask = prompts([2, 4])
    kw = {**GOOD, "max_new_tokens": 2}
    first = sampler.generate(model, ids, mask, jax.random.key(0), **kw)
    count = sampler.compile_count()
    second = sampler.generate(random_model(1), ids, mask, jax.random.key(0), **kw)
    assert sampler.compile_count() == count
    assert not np.allclose(np.asarray(first.logprobs), np.asarray(second.logprobs))


@pytest.mark.parametrize("n,bucket", [(1, 16), (16, 16), (17, 32), (100, 128), (512, 512), (513, 1024),
                                      (1025, 1536), (3000, 3072)])
def test_bucket_length(n, bucket):
    assert sampler.bucket_length(n) == bucket


def test_make_config_canonicalises_top_k():
    kw = dict(max_new_tokens=3, pad_id=0, eos_ids=[1, 2])
    assert sampler.make_config(50, top_k=50, **kw) == sampler.make_config(50, top_k=0, **kw)
    assert sampler.make_config(50, top_k=7, **kw).top_k == 7
    assert sampler.make_config(50, top_k=0, **kw).eos_ids == (1, 2)
