"""The continuous rollout engine against the static engine and `transformers` generate.

Slots fewer than rows, so finished rows leave their slot and queued ones take it; chunks of a few
decode steps, so rows finish in different chunks and stream out. Greedy rows equal transformers'
generate (left-padded prompts, two EOS ids, rows that run to the budget); sampled rows equal the
static engine's (row r draws column t with the same key in both). tests/test_sampling.py runs
its sampled-row tests (logprobs against the trainer's recomputation, the top-k / top-p set, same
seed same rows) on both engines.
"""
import jax
import numpy as np
import pytest
import tiny_hf
import torch

from sspo_jax.generate import continuous, sampler
from sspo_jax.model import attention

VOCAB = tiny_hf.BASE["vocab_size"]
LENGTHS = [5, 9, 3, 12, 7]
N_NEW = 16
PAD = 0
PER_ROW = ("tokens", "mask", "lengths", "truncated")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_hf.hf_and_flax(tmp_path_factory.mktemp("tiny_qwen2_engine"))


@pytest.fixture(scope="module")
def batch():
    ids, mask = tiny_hf.left_padded_batch(LENGTHS, VOCAB, seed=1, pad_id=PAD)
    return ids.numpy(), mask.numpy()


@pytest.fixture(scope="module")
def eos(models, batch):
    """Two EOS ids from the free greedy paths: rows end early on either, at different steps,
    and at least one row runs to the budget."""
    hf, _ = models
    ids, mask = (torch.as_tensor(a) for a in batch)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=PAD,
                       eos_token_id=None)[:, ids.shape[1]:].numpy()
    return int(free[0, 3]), int(free[2, 8])


def generate(m, batch, eos, engine, **kw):
    ids, mask = batch
    args = dict(num_samples=1, max_new_tokens=N_NEW, temperature=0.0, eos_ids=eos, pad_id=PAD)
    return sampler.generate(m, ids, mask, jax.random.key(3), engine=engine, **{**args, **kw})


def assert_same_rows(a, b, atol=1e-5):
    """Tokens, masks and lengths identical; logprobs and entropies (magnitude ~5) within float32
    rounding of attention summed at another width (a few ulps; 1e-5 as for the trainer)."""
    for name in PER_ROW:
        np.testing.assert_array_equal(np.asarray(a[name] if isinstance(a, dict) else getattr(a, name)),
                                      np.asarray(getattr(b, name)), err_msg=name)
    for name in ("logprobs", "entropy"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), atol=atol, rtol=0,
                                   err_msg=name)


@pytest.mark.parametrize("slots", [2, 0])
def test_greedy_rows_equal_transformers_generate_and_the_static_engine(models, batch, eos, slots):
    hf, m = models
    ids, mask = (torch.as_tensor(a) for a in batch)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=PAD,
                      eos_token_id=list(eos))[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, N_NEW - ref.shape[1])), constant_values=PAD)
    out = generate(m, batch, eos, "continuous", slots=slots, chunk_steps=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    lengths = np.asarray(out.lengths)
    assert (lengths == N_NEW).any() and (lengths < N_NEW).sum() >= 2, lengths  # budget rows and early EOS
    assert len(set(lengths.tolist())) >= 3
    assert_same_rows(generate(m, batch, eos, "static"), out)
    # Decode steps: with one slot per row the longest row's length (as static; the pool narrows
    # as rows end, so fewer slot-steps); with 2 slots for 5 rows the rows queue.
    steps, slot_steps = int(out.decode_steps), int(out.slot_steps)
    assert lengths.sum() <= slot_steps <= N_NEW * len(LENGTHS)
    if slots == 0:
        assert steps == lengths.max() and slot_steps <= steps * len(LENGTHS)
        # Each step runs at the smallest width holding the rows still decoding (a chunk ends
        # when the pool could narrow): the step after a row's last token, not a chunk later.
        active = [(lengths > t).sum() for t in range(steps)]
        assert slot_steps == sum(continuous._shrunk_width(len(LENGTHS), a) for a in active)
    else:
        assert slot_steps <= steps * 2 and steps >= lengths.sum() / 2


def test_sampled_rows_equal_the_static_engines_with_several_samples_per_prompt(models, batch):
    _, m = models
    kw = dict(num_samples=3, temperature=1.5, top_k=4, top_p=0.7)
    eos = (5, 6)
    static = generate(m, batch, eos, "static", **kw)
    for slots, chunk in ((0, 64), (4, 5), (4, 2)):
        out = generate(m, batch, eos, "continuous", slots=slots, chunk_steps=chunk, **kw)
        assert_same_rows(static, out)  # whatever the slots and the chunking
    again = generate(m, batch, eos, "continuous", slots=4, chunk_steps=2, **kw)
    assert_same_rows(out, again, atol=0)  # same seed and settings: bit for bit
    other = sampler.generate(m, *batch, jax.random.key(4), engine="continuous", slots=4, max_new_tokens=N_NEW,
                             eos_ids=eos, pad_id=PAD, **kw)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))


def test_finished_rows_stream_out_once_each_with_their_final_tokens(models, batch, eos):
    _, m = models
    calls = []
    out = generate(m, batch, eos, "continuous", slots=2, chunk_steps=2, num_samples=2,
                   on_finished=lambda rows, tokens, mask: calls.append((rows, tokens, mask)))
    rows = np.concatenate([c[0] for c in calls])
    assert sorted(rows.tolist()) == list(range(2 * len(LENGTHS))) and len(calls) >= 3
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for r, t, mk in calls:
        np.testing.assert_array_equal(t, tokens[r])
        np.testing.assert_array_equal(mk, mask[r])
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        generate(m, batch, eos, "static", on_finished=lambda *a: None)


def test_the_draining_pool_shrinks_to_the_rows_still_decoding():
    """Once no row is queued the pool narrows to the smallest of its few widths that holds the
    busiest group: slot-steps fall towards the real tokens; the rows are the same."""
    assert [continuous._shrunk_width(16, b) for b in (16, 13, 12, 9, 8, 5, 4, 3, 1, 0)] == \
        [16, 16, 12, 12, 8, 6, 4, 3, 1, 1]
    assert continuous._shrunk_width(20, 17) == 20 and continuous._shrunk_width(20, 16) == 16


def test_a_host_that_does_not_shrink_the_pool_is_an_error_not_a_hang(models, batch, eos, monkeypatch):
    """The decode chunks end as soon as the pool could narrow; a host that then kept its width
    would run empty chunks for ever: the engine raises instead."""
    _, m = models
    monkeypatch.setattr(continuous, "_shrunk_width", lambda width, busiest: width)
    with pytest.raises(RuntimeError, match="ran no step"):
        generate(m, batch, eos, "continuous", slots=0, chunk_steps=3)


def test_one_compilation_per_shape_and_bad_engine_arguments(models, batch, eos):
    _, m = models
    generate(m, batch, eos, "continuous", slots=2, chunk_steps=3)
    before = continuous.compile_count()
    generate(m, batch, eos, "continuous", slots=2, chunk_steps=3)
    assert continuous.compile_count() == before
    with pytest.raises(ValueError, match="engine='paged'"):
        generate(m, batch, eos, "paged")
    with pytest.raises(ValueError, match="slots=-1"):
        generate(m, batch, eos, "continuous", slots=-1)


def test_decode_reads_only_the_live_prefix_of_the_cache():
    """The static prefixes the decode step chooses from, and the same numbers as the whole cache."""
    assert attention.live_prefix_lengths(4096) == (1024, 2048, 3072, 4096)
    assert attention.live_prefix_lengths(3000 + 512) == (896, 1792, 2688, 3512)
    assert attention.live_prefix_lengths(28) == (8, 16, 24, 28)
    rng = np.random.default_rng(0)
    b, s, hkv, g, d = 3, 40, 2, 2, 8
    q = rng.standard_normal((b, 1, hkv * g, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, hkv, s, d)).astype(np.float32) for _ in range(2))
    filled = np.array([3, 11, 17])
    visible = (np.arange(s)[None, None] < filled[:, None, None])
    for live in (1, 12, 17, 40):
        vis = visible & (np.arange(s) < live)
        got = attention.live_prefix_attention(q, k, v, vis, np.int32(live))
        want = attention.cached_attention(q, k, v, vis)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
