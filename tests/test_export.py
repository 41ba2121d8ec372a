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
from transformers import Qwen2ForCausalLM

from sspo_jax import run_config, specs
from sspo_jax.data.tokenizer import load_tokenizer
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

    hf = Qwen2ForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(str(out))
    ids = tok("12 + 30 =", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits.numpy()
    ours = nnx.merge(graphdef, params)(jnp.asarray([ids]))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)
