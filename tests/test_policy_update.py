"""The policy update: gradients against PyTorch autograd on the same weights, micro-batch
invariance, and the non-finite skip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_hf
import torch
from flax import nnx
from safetensors.numpy import load_file

from sspo_jax import model as M
from sspo_jax.rl import losses, train_batch
from sspo_jax.train import update as PU

P, R, B = 6, 8, 8


def _batch(hf, vocab, seed=0, temperature=1.0):
    """A rollout-like batch: left-padded prompts, responses of varied length, old log-probs that
    differ from the current ones (so ratios move and some tokens clip), mixed-sign advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask = tiny_hf.left_padded_batch([3, 6, 5, 2, 6, 4, 1, 6], vocab, total=P, seed=seed)
    resp_len = torch.tensor([8, 5, 1, 8, 3, 0, 7, 2])
    resp = torch.randint(1, vocab, (B, R), generator=gen)
    resp_mask = (torch.arange(R)[None, :] < resp_len[:, None]).long()
    resp = torch.where(resp_mask.bool(), resp, torch.zeros_like(resp))
    tokens = torch.cat([prompt_ids, resp], 1)
    attn = torch.cat([prompt_mask, resp_mask], 1)
    with torch.no_grad():
        logp = _torch_logp(hf, tokens, attn, temperature)
    old = logp + 0.3 * torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, 0.0, -0.2, 1.1])
    return tokens, attn, resp_mask, old, adv


def _torch_logp(hf, tokens, attn, temperature):
    logits = hf(input_ids=tokens, attention_mask=attn).logits.float() / temperature
    lp = torch.log_softmax(logits[:, P - 1:-1], -1)
    return lp.gather(-1, tokens[:, P:, None])[..., 0]


def _torch_grpo_grads(hf, tokens, attn, resp_mask, old, adv, eps, temperature):
    """Token-level clipped surrogate, seq-mean-token-mean, written plainly in PyTorch."""
    hf.zero_grad()
    logp = _torch_logp(hf, tokens, attn, temperature)
    m = resp_mask.float()
    ratio = torch.exp(torch.clamp((logp - old) * m, -20, 20))
    a = adv[:, None]
    u = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    per_row = (u * m).sum(1) / m.sum(1).clamp(min=1)
    loss = -per_row.sum() / (m.sum(1) > 0).sum()
    loss.backward()
    return loss.item(), {n: p.grad.detach().numpy().copy() for n, p in hf.named_parameters()}


def _jax_batch(tokens, attn, resp_mask, old, adv, eps):
    seg = (jnp.arange(B * R, dtype=jnp.int32).reshape(B, R))  # token level: one unit per token
    return train_batch.PolicyBatch(tokens=jnp.asarray(tokens.numpy(), jnp.int32),
                          attention_mask=jnp.asarray(attn.numpy(), jnp.int32),
                          response_mask=jnp.asarray(resp_mask.numpy(), jnp.int32),
                          old_logp=jnp.asarray(old.numpy(), jnp.float32), adv=jnp.asarray(adv.numpy()),
                          seg=seg, eps_low=jnp.full((B, R), eps), eps_high=jnp.full((B, R), eps))


def _grads(model, batch, settings):
    graphdef, params = nnx.split(model)
    mask = batch.response_mask.astype(jnp.float32)
    n_tok, n_seq = jnp.sum(mask), jnp.sum(jnp.sum(mask, 1) > 0)
    (loss, _), grads = jax.value_and_grad(PU._micro_loss, has_aux=True)(
        params, graphdef, batch, n_tok, n_seq, settings)
    return float(loss), graphdef, grads


@pytest.mark.slow
@pytest.mark.parametrize("tied,temperature", [(False, 1.0), (True, 0.7)])
def test_gradient_matches_pytorch_autograd(tmp_path, tied, temperature):
    hf = tiny_hf.make_qwen2(tmp_path / "hf", seed=3, tie_word_embeddings=tied, rope_theta=1e6)
    hf.train(False)
    eps = 0.2
    tokens, attn, resp_mask, old, adv = _batch(hf, tiny_hf.BASE["vocab_size"], temperature=temperature)
    ref_loss, ref_grads = _torch_grpo_grads(hf, tokens, attn, resp_mask, old, adv, eps, temperature)

    model = M.from_pretrained(tmp_path / "hf")
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=temperature,
                                 micro_batch_size=B, logprob_chunk=4)
    loss, graphdef, grads = _grads(model, _jax_batch(tokens, attn, resp_mask, old, adv, eps), settings)
    assert abs(loss - ref_loss) < 1e-5
    # Lay the gradients out as HF tensors through the (separately tested) checkpoint writer.
    grad_model = nnx.merge(graphdef, grads)
    M.save_pretrained(grad_model, tmp_path / "grads")
    ours = load_file(str(tmp_path / "grads" / "model.safetensors"))
    assert set(ours) == set(ref_grads) - ({"lm_head.weight"} if tied else set())
    for name, ref in ref_grads.items():
        if tied and name == "lm_head.weight":
            continue
        scale = max(np.abs(ref).max(), 1e-3)
        err = np.abs(ours[name] - ref).max() / scale
        assert err < 2e-4, f"{name}: max error {err:.2e} relative to max |grad| {scale:.2e}"


@pytest.mark.slow
def test_micro_batches_add_up(tmp_path):
    hf = tiny_hf.make_qwen2(tmp_path / "hf", seed=1)
    tokens, attn, resp_mask, old, adv = _batch(hf, tiny_hf.BASE["vocab_size"], seed=1)
    batch = _jax_batch(tokens, attn, resp_mask, old, adv, 0.2)
    # Plain SGD with lr 1: the parameter change is exactly minus the accumulated gradient (Adam's
    # first step is ~lr * sign(g), which would amplify rounding in near-zero components).
    opt = optax.sgd(1.0)
    outs = []
    for mbs in (8, 2):
        model = M.from_pretrained(tmp_path / "hf")
        graphdef, params = nnx.split(model)
        settings = PU.UpdateSettings(loss=losses.preset("sspo", entropy_lambda=0.0, level="token"),
                                     temperature=1.0, micro_batch_size=mbs, logprob_chunk=8)
        new, _, metrics, gnorm, finite = PU.update_step(params, opt.init(params), batch,
                                                        graphdef=graphdef, optimizer=opt, settings=settings)
        assert bool(finite)
        outs.append((jax.tree.leaves(new), float(gnorm), metrics))
    for leaves, gnorm, metrics in outs[1:]:
        assert abs(gnorm - outs[0][1]) < 1e-5 * outs[0][1]
        for a, b in zip(leaves, outs[0][0]):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
        for k in ("clip_frac_total/token/num", "clip_frac_total/token/den", "loss/sum"):
            np.testing.assert_allclose(metrics[k], outs[0][2][k], rtol=1e-5, atol=1e-7)


def test_non_finite_step_leaves_params_and_optimizer_state_untouched(tmp_path):
    hf = tiny_hf.make_qwen2(tmp_path / "hf", seed=2)
    tokens, attn, resp_mask, old, adv = _batch(hf, tiny_hf.BASE["vocab_size"], seed=2)
    adv = adv.clone()
    adv[0] = float("nan")
    batch = _jax_batch(tokens, attn, resp_mask, old, adv, 0.2)
    model = M.from_pretrained(tmp_path / "hf")
    graphdef, params = nnx.split(model)
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    before = [np.array(x) for x in jax.tree.leaves((params, opt_state))]
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=1.0, micro_batch_size=4,
                                 logprob_chunk=8)
    new_params, new_opt, _, _, finite = PU.update_step(params, opt_state, batch, graphdef=graphdef,
                                                       optimizer=opt, settings=settings)
    assert not bool(finite)
    for a, b in zip(before, jax.tree.leaves((new_params, new_opt))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_optimizer_schedules():
    opt = PU.make_optimizer(1e-3, schedule="cosine", warmup_steps=2, total_steps=10, grad_clip=1.0)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    upd, _ = opt.update({"w": jnp.ones(3)}, state, params)
    assert float(jnp.abs(upd["w"]).max()) == 0.0  # warmup starts at lr 0
    with pytest.raises(ValueError, match="schedule 'linear'"):
        PU.make_optimizer(1e-3, schedule="linear")


@pytest.mark.slow
def test_rows_sliced_from_a_batch_keep_their_subsentences(tmp_path):
    """Mini-batches are row slices of the rollout batch: their segment ids must be rebased, or
    segment_sum (num_segments = slice rows x T) would silently drop the later rows' segments."""
    from sspo_jax.rl import segments
    hf = tiny_hf.make_qwen2(tmp_path / "hf", seed=5)
    tokens, attn, resp_mask, old, adv = _batch(hf, tiny_hf.BASE["vocab_size"], seed=5)
    full = _jax_batch(tokens, attn, resp_mask, old, adv, 0.2)
    table = np.zeros(tiny_hf.BASE["vocab_size"], bool)
    table[::3] = True  # every third token id ends a subsentence
    full = full.replace(seg=segments.segment_ids(full.tokens[:, P:], full.response_mask, table))
    tail = full.rows(np.arange(4, 8))
    fresh = tail.replace(seg=segments.segment_ids(tail.tokens[:, P:], tail.response_mask, table))
    model = M.from_pretrained(tmp_path / "hf")
    settings = PU.UpdateSettings(loss=losses.preset("sspo"), temperature=1.0, micro_batch_size=4,
                                 logprob_chunk=8)
    loss_sliced, _, g_sliced = _grads(model, tail, settings)
    loss_fresh, _, g_fresh = _grads(model, fresh, settings)
    assert loss_sliced == loss_fresh
    for a, b in zip(jax.tree.leaves(g_sliced), jax.tree.leaves(g_fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_compilation_for_repeated_updates(tmp_path):
    """The optimizer state is committed up front, so the second call reuses the first program."""
    hf = tiny_hf.make_qwen2(tmp_path / "hf", seed=6)
    tokens, attn, resp_mask, old, adv = _batch(hf, tiny_hf.BASE["vocab_size"], seed=6)
    batch = _jax_batch(tokens, attn, resp_mask, old, adv, 0.2)
    graphdef, params = nnx.split(M.from_pretrained(tmp_path / "hf"))
    opt = PU.make_optimizer(1e-4, schedule="cosine", warmup_steps=1, total_steps=5)
    opt_state = PU.init_optimizer(opt, params)
    settings = PU.UpdateSettings(loss=losses.preset("grpo"), temperature=1.0, micro_batch_size=4,
                                 logprob_chunk=8)
    before = PU._update_step._cache_size()
    for _ in range(3):
        params, opt_state, *_ = PU.update_step(params, opt_state, batch, graphdef=graphdef,
                                               optimizer=opt, settings=settings)
    assert PU._update_step._cache_size() == before + 1
