"""The evaluation program: files written, greedy responses equal transformers' greedy decoding,
and a training checkpoint is what gets evaluated when there is one."""
import json
import os

import tiny_hf
import torch
from flax import nnx

from sspo_jax import run_config, specs
from sspo_jax.data.templates import render_prompt
from sspo_jax.data.tokenizer import build_tokenizer
from sspo_jax.train import evaluation
from sspo_jax.train.checkpoint import Checkpointer
from sspo_jax.train.setup import build_policy, run_optimizer


def _config(**eval_overrides):
    c = run_config.get_config()
    c.eval.num_prompts = 6
    c.eval.max_new_tokens = 12
    c.eval.batch_size = 4
    c.model.tiny.hidden_size = 32
    c.model.tiny.intermediate_size = 64
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


def test_hf_checkpoint_greedy_responses_equal_transformers_generate(tmp_path):
    tok = build_tokenizer()
    hf_dir = tmp_path / "hf"
    hf = tiny_hf.make_qwen2(hf_dir, seed=4, vocab_size=len(tok), tie_word_embeddings=True)
    tok.save_pretrained(hf_dir)
    c = _config(num_samples=3, temperature=1.0)
    c.model.hf_dir = str(hf_dir)
    summary = evaluation.run_evaluation(c, str(tmp_path / "run"))
    assert summary["policy"] == str(hf_dir)
    out = json.load(open(tmp_path / "run" / "eval" / "synthetic.json"))
    assert out["greedy"]["problems"] == 6 and len(out["records"]) == 6
    assert set(summary["benchmarks"]["synthetic"]) >= {"pass@1", "avg@3", "pass@3"}
    assert os.path.exists(tmp_path / "run" / "eval" / "summary.md")
    for rec in out["records"][:3]:
        ids = tok(render_prompt(rec["problem"], c.data.template, tok), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=12, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["responses"] == [expected]
        assert len(rec["extracted"]) == len(rec["scores"]) == len(rec["reasons"]) == 1
    assert len(out["sampled_records"][0]["responses"]) == 3


def test_newest_training_checkpoint_is_evaluated(tmp_path):
    c = _config()
    _, model = build_policy(specs.parse(c).model, c.seed)
    graphdef, params = nnx.split(model)
    zeros = jax_zeros(params)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1)
    opt_state = run_optimizer(specs.parse(c).optimizer, 1).init(zeros)
    ckpt.save(7, {"params": zeros, "opt_state": opt_state}, {"data": {}}, force=True)
    ckpt.close()
    summary = evaluation.run_evaluation(c, str(tmp_path))
    assert summary["policy"].startswith("checkpoint step 7")
    out = json.load(open(tmp_path / "eval" / "synthetic.json"))
    # An all-zero policy has uniform logits: greedy picks token 0 (<|endoftext|>, not an EOS of
    # the project tokenizer) every step, so every response is empty text with no answer.
    assert all(r["responses"] == [""] for r in out["records"])
    assert summary["benchmarks"]["synthetic"]["no_answer"] == 6


def jax_zeros(tree):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(jnp.zeros_like, tree)
