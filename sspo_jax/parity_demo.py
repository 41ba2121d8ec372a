"""`python -m sspo_jax.parity_demo`: the JAX Qwen2 against transformers on a tiny random model.

Builds a random Qwen2 with transformers in a temporary directory, loads it with
`from_pretrained`, runs a left-padded batch through both (float32 and bfloat16), decodes a few
greedy steps with the KV cache and compares them with the full forward pass. Prints a table and
exits with status 1 if any check fails. Needs the [test] extra (torch).
"""
from __future__ import annotations

import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sspo_jax import model as M

F32_MAX_ABS = 1e-4      # float32 logits vs transformers float32
# bf16 (params + compute) vs transformers float32, relative Frobenius norm, may be at most this
# multiple of transformers' own bf16 error (measured ratios 0.94-1.05 in tests/test_model_parity.py).
BF16_VS_TORCH_BF16 = 1.15
CACHE_MAX_ABS = 1e-5    # KV-cache decoding vs the full forward, float32
CONFIG = dict(vocab_size=151, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
LENGTHS = [12, 7, 3]
INF = float("inf")  # a row that is reported, not checked
STEPS = 6


def build_reference(out_dir: str, seed: int = 0):
    """A random transformers Qwen2ForCausalLM (std-0.1 weights, norms near 1) saved to out_dir."""
    import torch
    import transformers

    config = transformers.Qwen2Config(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0.0, 0.1) if not name.endswith("norm.weight") else p.uniform_(0.5, 1.5)
    ref.eval().save_pretrained(out_dir)
    return ref


def reference_logits(ref, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with the project's positions: real tokens before each token."""
    import torch

    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    with torch.no_grad():
        out = ref(input_ids=ids_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0))
    return out.logits.float().numpy()


def left_padded(lengths, vocab: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, max(lengths)] int32, left padded with 0, and their mask."""
    rng = np.random.default_rng(seed)
    total = max(lengths)
    ids, mask = np.zeros((len(lengths), total), np.int32), np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = rng.integers(1, vocab, n)
        mask[row, total - n:] = 1
    return ids, mask


def run_checks() -> list[tuple[str, float, float]]:
    """(check, measured, tolerance) rows."""
    import torch

    forward = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    cached = nnx.jit(lambda m, i, a, c: m(i, attention_mask=a, cache=c))
    ids, mask = left_padded(LENGTHS, CONFIG["vocab_size"])
    real = mask.astype(bool)
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_reference(tmp)
        expected = reference_logits(ref, ids, mask)
        expected_bf16 = reference_logits(ref.to(torch.bfloat16), ids, mask)
        m32 = M.from_pretrained(tmp, dtype=jnp.float32)
        m16 = M.from_pretrained(tmp, dtype=jnp.bfloat16)
    f32 = np.asarray(forward(m32, ids, mask))
    bf16 = np.asarray(forward(m16, ids, mask))

    def rel(x):
        return float(np.linalg.norm((x - expected)[real]) / np.linalg.norm(expected[real]))

    rows = [("float32 logits vs transformers fp32, max abs", float(np.abs(f32 - expected)[real].max()), F32_MAX_ABS),
            ("bfloat16 logits vs transformers fp32, max abs", float(np.abs(bf16 - expected)[real].max()), INF),
            ("transformers' own bf16 vs its fp32, rel. Frobenius", rel(expected_bf16), INF),
            ("bfloat16 logits vs transformers fp32, rel. Frobenius", rel(bf16),
             BF16_VS_TORCH_BF16 * rel(expected_bf16))]

    cache = m32.init_cache(len(LENGTHS), ids.shape[1] + STEPS)
    logits, cache = cached(m32, ids, mask, cache)
    steps = [np.asarray(logits[:, -1])]
    seq, seq_mask = ids, mask
    for _ in range(STEPS):
        token = steps[-1].argmax(-1).astype(np.int32)[:, None]
        seq, seq_mask = np.concatenate([seq, token], 1), np.concatenate([seq_mask, np.ones_like(token)], 1)
        logits, cache = cached(m32, token, np.ones_like(token), cache)
        steps.append(np.asarray(logits[:, 0]))
    full = np.asarray(forward(m32, seq, seq_mask))[:, ids.shape[1] - 1:]
    rows.append((f"KV-cache greedy decode ({STEPS} steps) vs full forward, max abs",
                 float(np.abs(np.stack(steps, 1) - full).max()), CACHE_MAX_ABS))
    return rows


def main() -> int:
    import importlib.util
    if importlib.util.find_spec("torch") is None:  # the reference; only the [test] extra has it
        print("parity_demo compares with transformers' PyTorch model and needs torch: "
              "pip install -e '.[test]'", file=sys.stderr)
        return 2
    rows = run_checks()
    print("| check | measured | tolerance | ok |\n|---|---|---|---|")
    failed = 0
    for name, value, tol in rows:
        ok = value <= tol
        failed += not ok
        print(f"| {name} | {value:.2e} | {'(reported)' if tol == INF else f'{tol:.3g}'} | "
              f"{'yes' if ok else 'NO'} |")
    print("parity OK" if not failed else f"parity FAILED in {failed} check(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
