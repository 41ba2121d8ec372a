"""`python -m sspo_jax.export`: a training checkpoint becomes a Hugging Face directory that
transformers loads with the same logits."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from sspo_jax import run_config, specs
from sspo_jax.data.templates import render_prompt
from sspo_jax.data.tokenizer import load_tokenizer
from sspo_jax.generate import sampler
from sspo_jax.train.checkpoint import Checkpointer
from sspo_jax.train.setup import build_policy, run_optimizer
from sspo_jax.train.update import init_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"model.tiny.hidden_size": 32, "model.tiny.intermediate_size": 64}


def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    c = run_config.get_config()
    c.model.tiny.hidden_size, c.model.tiny.intermediate_size = 32, 64
    spec = specs.parse(c)
    _, model = build_policy(spec.model, spec.seed)
    graphdef, params = nnx.split(model)
    # A policy unlike the seed's initialisation, so the export cannot pass by rebuilding it.
    params = jax.tree.map(lambda x: x * 1.5 + 0.01, params)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", save_every=1)
    ckpt.save(7, {"params": params, "opt_state": init_optimizer(run_optimizer(spec.optimizer, spec.optimizer_steps), params)},
              {"data": {}}, force=True)
    ckpt.close()

    out = tmp_path / "hf"
    flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.export", "--config=configs/demo.py",
                           f"--workdir={tmp_path / 'run'}", f"--out={out}", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported the policy of step 7" in proc.stdout

    # Plain transformers, as a user (or vLLM, an evaluation harness) loads it.
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = render_prompt("Tom has 12 apples. Tom buys 30 more. How many apples does Tom have now?",
                           "qwen25-math-cot")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == load_tokenizer(str(out))(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    ours = nnx.merge(graphdef, params)(jnp.asarray([ids]))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)
    # Greedy text: transformers generate == the project's sampler.
    eos = sorted(sampler.default_eos_ids(tok), key=lambda e: e != tok.eos_token_id)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    mine = sampler.generate(nnx.merge(graphdef, params), np.array([ids]), np.ones((1, len(ids))),
                            jax.random.key(0), max_new_tokens=12, temperature=0.0, eos_ids=eos,
                            pad_id=sampler.default_pad_id(tok, eos))
    mine_ids = np.asarray(mine.tokens[0])[np.asarray(mine.mask[0]).astype(bool)].tolist()
    assert tok.decode(gen[0, len(ids):]) == tok.decode(mine_ids)
    # transformers' generate stops where the sampler stops; the files are readable by all.
    assert hf.generation_config.eos_token_id == eos and hf.config.eos_token_id == eos[0] == tok.eos_token_id
    assert hf.config.pad_token_id == hf.generation_config.pad_token_id == tok.pad_token_id
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert all(os.stat(out / f).st_mode & 0o777 == 0o644 for f in os.listdir(out))
    # The sampler stops at an EOS and so does transformers generate: a row forced to pick the
    # EOS first (its logit raised) ends there in both.
    with torch.no_grad():
        hf.lm_head.weight[eos[0]] += 100.0  # every position now prefers the EOS
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == len(ids) + 1 and int(gen[0, -1]) == eos[0]


def test_a_qwen25_checkpoint_exports_what_plain_transformers_loads_and_generates_alike(
        tmp_path, qwen25_tokenizer):
    """A run of a Qwen2 checkpoint with the real Qwen2.5 tokenizer, exported, loads with plain
    `AutoTokenizer` + `AutoModelForCausalLM`, and greedy `generate` gives the project's greedy
    text (stopping at the same EOS)."""
    from tiny_hf import make_qwen2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sspo_jax.data.qwen_tokenizer import write_qwen25_tokenizer
    from sspo_jax.data.templates import render_prompt
    hf_dir = tmp_path / "qwen"
    make_qwen2(hf_dir, seed=5, vocab_size=151936, hidden_size=32, intermediate_size=64)
    write_qwen25_tokenizer(hf_dir)
    overrides = {"model.hf_dir": str(hf_dir), "rollout.max_new_tokens": 16}
    c = run_config.get_config()
    c.model.hf_dir = str(hf_dir)
    spec = specs.parse(c)
    tokenizer, model = build_policy(spec.model, spec.seed)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 1.2, params)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", save_every=1)
    ckpt.save(3, {"params": params, "opt_state": init_optimizer(run_optimizer(spec.optimizer, spec.optimizer_steps), params)},
              {"data": {}}, force=True)
    ckpt.close()
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.export", "--config=configs/demo.py",
                           f"--workdir={tmp_path / 'run'}", f"--out={out}",
                           *[f"--config.{k}={v}" for k, v in overrides.items()]],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == len(tokenizer)
    prompt = render_prompt("What is $2 + 3$?", "qwen25-math-cot")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    theirs = tok.decode(gen[0, len(ids):], skip_special_tokens=False)

    eos = sampler.default_eos_ids(tokenizer)
    out_ = sampler.generate(nnx.merge(graphdef, params), np.array([ids]), np.ones((1, len(ids))),
                            jax.random.key(0), max_new_tokens=16, temperature=0.0, eos_ids=eos,
                            pad_id=sampler.default_pad_id(tokenizer, eos))
    mine = np.asarray(out_.tokens[0])[np.asarray(out_.mask[0]).astype(bool)]
    assert theirs == tokenizer.decode(mine.tolist(), skip_special_tokens=False)
    assert len(theirs) > 0
