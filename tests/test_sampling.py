"""End-to-end sampler tests on a tiny random Qwen2, against transformers (the independent reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
from flax import nnx

from sspo_jax import model as M
from sspo_jax.generate import sampler
from sspo_jax.rl.logprobs import token_logprobs_and_entropy

VOCAB = tiny_hf.BASE["vocab_size"]
LENGTHS = [5, 9, 3, 12]  # left padded to 12 in one batch
PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_hf.hf_and_flax(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def batch():
    ids, mask = tiny_hf.left_padded_batch(LENGTHS, VOCAB, seed=1, pad_id=PAD)
    return ids, mask


def hf_logits(hf, ids, mask):
    """transformers logits [B, T, V] (float64 numpy), positions counted over real tokens as in generate."""
    ids, mask = torch.as_tensor(np.asarray(ids), dtype=torch.long), torch.as_tensor(np.asarray(mask), dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double().numpy()


@nnx.jit
def full_forward(m, ids, mask):
    """The trainer's view: one forward over prompt + response, no cache."""
    return m(ids, attention_mask=mask)


def response_logprobs(logits, tokens, prompt_len, temperature):
    """log softmax(logits / T) of each response token; logits over prompt+response [R, P+N, V]."""
    z = np.asarray(logits, np.float64)[:, prompt_len - 1:-1] / (temperature or 1.0)  # predicts response t
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0], -(np.exp(logp) * logp).sum(-1)


N_GREEDY = 16
SAMPLED = dict(num_samples=3, max_new_tokens=N_GREEDY, temperature=1.5, top_k=4, top_p=0.7, eos_ids=(5, 6), pad_id=PAD)


@pytest.fixture(scope="module")
def greedy_eos(models, batch):
    """Two EOS ids taken from the free greedy paths, so some rows stop early on either, others run out."""
    hf, _ = models
    ids, mask = batch
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=N_GREEDY, do_sample=False, pad_token_id=PAD,
                       eos_token_id=None)[:, ids.shape[1]:].numpy()
    eos = (int(free[0, 3]), int(free[2, 6]))
    assert PAD not in eos
    return eos


def greedy(m, batch, eos, n):
    ids, mask = batch
    return sampler.generate(m, ids.numpy(), mask.numpy(), jax.random.key(0), num_samples=n,
                             max_new_tokens=N_GREEDY, temperature=0.0, eos_ids=eos, pad_id=PAD)


# Both engines: the continuous one with 5 slots for the 12 rows (rows queue and refill), in
# chunks of 4 decode steps. Every test of the sampled rows holds for each.
ENGINE_ARGS = {"static": {}, "continuous": dict(engine="continuous", slots=5, chunk_steps=4)}


@pytest.fixture(scope="module", params=sorted(ENGINE_ARGS))
def engine(request):
    return ENGINE_ARGS[request.param]


@pytest.fixture(scope="module")
def sampled(models, batch, engine):
    ids, mask = batch
    return sampler.generate(models[1], ids.numpy(), mask.numpy(), jax.random.key(3), **SAMPLED, **engine)


def test_greedy_equals_transformers_generate_with_eos_and_left_padding(models, batch, greedy_eos):
    hf, m = models
    ids, mask = batch
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=N_GREEDY, do_sample=False, pad_token_id=PAD,
                      eos_token_id=list(greedy_eos))[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, N_GREEDY - ref.shape[1])), constant_values=PAD)  # HF stops when all rows end

    out = greedy(m, batch, greedy_eos, 1)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, ref)

    is_eos = np.isin(ref, greedy_eos)
    first = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, N_GREEDY)
    assert 0 < (first < N_GREEDY).sum() < len(LENGTHS), "want both finished and truncated rows"
    np.testing.assert_array_equal(np.asarray(out.lengths), first)
    np.testing.assert_array_equal(np.asarray(out.truncated), ~is_eos.any(-1))
    expected_mask = np.arange(N_GREEDY)[None] < first[:, None]
    np.testing.assert_array_equal(np.asarray(out.mask), expected_mask.astype(np.int32))
    assert (tokens[~expected_mask] == PAD).all()
    assert (np.asarray(out.logprobs)[~expected_mask] == 0).all() and (np.asarray(out.entropy)[~expected_mask] == 0).all()


def test_greedy_num_samples_repeats_rows_prompt_major(models, batch, greedy_eos):
    one, three = greedy(models[1], batch, greedy_eos, 1), greedy(models[1], batch, greedy_eos, 3)
    for name in ("tokens", "logprobs", "mask", "lengths", "truncated", "entropy"):
        x1, x3 = getattr(one, name), getattr(three, name)
        np.testing.assert_allclose(np.asarray(x3), np.repeat(np.asarray(x1), 3, axis=0), atol=1e-6)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_logprobs_equal_full_forward_recomputation(models, batch, greedy_eos, sampled, mode):
    """Sampler logprobs/entropy == full forward over prompt+response: JAX (1e-5) and torch (2e-4), float32."""
    hf, m = models
    ids, mask = batch
    out, n, temperature = (sampled, 3, SAMPLED["temperature"]) if mode == "sampled" else (
        greedy(m, batch, greedy_eos, 3), 3, 0.0)
    tokens, resp_mask = np.asarray(out.tokens), np.asarray(out.mask)
    # Prompt-major rows: row r continues prompt r // n.
    full_ids = np.concatenate([np.repeat(ids.numpy(), n, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask.numpy(), n, 0), resp_mask], 1)
    on = resp_mask.astype(bool)
    assert on.sum() > 20
    p = ids.shape[1]

    jax_logits = np.asarray(full_forward(m, jnp.asarray(full_ids), jnp.asarray(full_mask)))
    logp, ent = response_logprobs(jax_logits, tokens, p, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs)[on], logp[on], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy)[on], ent[on], atol=1e-5, rtol=0)

    logp_t, ent_t = response_logprobs(hf_logits(hf, full_ids, full_mask), tokens, p, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs)[on], logp_t[on], atol=2e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy)[on], ent_t[on], atol=2e-4, rtol=0)


def test_sampled_logprobs_equal_the_trainers_chunked_recomputation(models, batch, sampled):
    """Old-policy logprobs can come from the sampler: sspo_jax.rl.logprobs gives the same within 1e-5."""
    _, m = models
    ids, mask = batch
    n = SAMPLED["num_samples"]
    tokens, resp_mask = np.asarray(sampled.tokens), np.asarray(sampled.mask)
    full_ids = jnp.asarray(np.concatenate([np.repeat(ids.numpy(), n, 0), tokens], 1))
    full_mask = jnp.asarray(np.concatenate([np.repeat(mask.numpy(), n, 0), resp_mask], 1))

    @nnx.jit
    def trainer_view(m, full_ids, full_mask):
        hidden = m.hidden_states(full_ids, attention_mask=full_mask)
        return token_logprobs_and_entropy(hidden[:, :-1], m.lm_head_weight(), full_ids[:, 1:],
                                          SAMPLED["temperature"], chunk=8)

    logp, ent = (np.asarray(a)[:, ids.shape[1] - 1:] for a in trainer_view(m, full_ids, full_mask))
    on = resp_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(sampled.logprobs)[on], logp[on], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(sampled.entropy)[on], ent[on], atol=1e-5, rtol=0)


def test_sampled_tokens_lie_in_the_top_k_top_p_set(models, batch, sampled):
    """Every drawn token is in the top-k-then-top-p set computed in float64 NumPy from transformers' logits."""
    hf, _ = models
    ids, mask = batch
    n, temperature, top_k, top_p = 3, SAMPLED["temperature"], SAMPLED["top_k"], SAMPLED["top_p"]
    tokens, on = np.asarray(sampled.tokens), np.asarray(sampled.mask).astype(bool)
    full_ids = np.concatenate([np.repeat(ids.numpy(), n, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask.numpy(), n, 0), on], 1)
    z = hf_logits(hf, full_ids, full_mask)[:, ids.shape[1] - 1:-1] / temperature  # [R, N, V]
    order = np.argsort(-z, -1)
    top = np.take_along_axis(z, order, -1)[..., :top_k]
    p = np.exp(top - top[..., :1])
    p /= p.sum(-1, keepdims=True)
    needed = (np.cumsum(p, -1) < top_p).sum(-1) + 1  # smallest prefix of the top k reaching top_p
    rank = np.argmax(order == tokens[..., None], -1)
    assert (rank[on] < needed[on]).all(), f"tokens outside the allowed set at {np.argwhere(on & (rank >= needed))}"
    assert (needed[on] < top_k).any() and (needed[on] > 1).any()  # both filters bite somewhere
    assert (rank[on] > 0).any()  # it did sample, not argmax everywhere


def test_same_seed_same_output_different_seed_differs(models, batch, sampled, engine):
    ids, mask = batch
    again = sampler.generate(models[1], ids.numpy(), mask.numpy(), jax.random.key(3), **SAMPLED, **engine)
    other = sampler.generate(models[1], ids.numpy(), mask.numpy(), jax.random.key(4), **SAMPLED, **engine)
    for x, y in zip(sampled, again):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (np.asarray(sampled.tokens) != np.asarray(other.tokens)).any()
    # The n samples of one prompt are different draws.
    tok = np.asarray(sampled.tokens)
    assert (tok[0::3] != tok[1::3]).any()


def test_prompts_of_one_bucket_compile_once(models, greedy_eos):
    """Batches whose longest prompts (7, 11, 16) share the 16 bucket reuse one program; 17 compiles anew."""
    m = models[1]

    def run(lengths, total):
        ids, mask = tiny_hf.left_padded_batch(lengths, VOCAB, total, seed=2)
        greedy(m, (ids, mask), greedy_eos, 1)
        return sampler.compile_count()

    first = run([4, 7, 1, 2], 7)  # compiles unless an earlier test already ran this program
    assert run([11, 2, 3, 3], 14) == first
    assert run([16, 1, 5, 9], 20) == first
    assert run([17, 3, 2, 2], 17) == first + 1


@pytest.mark.parametrize("platform,attention", [("gpu", "xla"), ("cpu", "splash")])
def test_other_backends_give_the_same_output(models, batch, tmp_path, platform, attention):
    """A model built for another platform (the scanned layers, no per-layer weight copies), or
    with splash (the prompts' prefill through the Pallas kernel, interpreted on CPU), samples the
    same tokens and log-probs as the CPU forms with xla."""
    hf, model = models
    hf.save_pretrained(tmp_path)
    other_model = M.from_pretrained(tmp_path, platform=platform, attention=attention)
    assert other_model.backend == M.Backend(platform, attention)
    ids, mask = batch
    kwargs = dict(num_samples=2, max_new_tokens=11, temperature=0.8, top_p=0.9, eos_ids=(), pad_id=0)
    cpu = sampler.generate(model, ids, mask, jax.random.key(3), **kwargs)
    count = sampler.compile_count()
    other = sampler.generate(other_model, ids, mask, jax.random.key(3), **kwargs)
    assert sampler.compile_count() == count + 1  # its own program
    np.testing.assert_array_equal(np.asarray(other.tokens), np.asarray(cpu.tokens))
    np.testing.assert_allclose(np.asarray(other.logprobs), np.asarray(cpu.logprobs), atol=1e-5)
