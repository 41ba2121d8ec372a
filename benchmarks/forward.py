"""Forward pass (prefill of a left-padded batch): jitted JAX vs transformers on the same weights.

    python benchmarks/forward.py [--reps 5] [--batch 4] [--seq 128]

Builds a ~5M and a ~40M parameter random Qwen2 with transformers, loads the same checkpoint with
sspo_jax.model.from_pretrained, and times both on the same batch in one run (float32, CPU).
Compile time is excluded from the JAX median and reported on its own; repetitions of the two
alternate, and each side's median is reported. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from sspo_jax import model as M

SIZES = {
    "~5M": dict(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "~40M": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, overrides: dict, batch: int, seq: int, reps: int) -> dict:
    """Times one config; returns a table row."""
    config = transformers.Qwen2Config(**overrides, rope_theta=1e6)
    config._attn_implementation = "sdpa"  # transformers' fastest CPU attention: the fair peer
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    lengths = np.linspace(seq, seq // 2, batch).astype(int)  # left padding up to half the row
    mask = (np.arange(seq)[None, :] >= (seq - lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, config.vocab_size, (batch, seq)), 0).astype(np.int32)

    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model = M.from_pretrained(tmp)
    forward = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    start = time.perf_counter()
    jax_logits = jax.block_until_ready(forward(model, ids_j, mask_j))
    compile_s = time.perf_counter() - start
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
    jax_times, torch_times = [], []
    with torch.no_grad():
        torch_logits = ref(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits.numpy()  # warm-up
        for _ in range(reps):  # interleaved, so a burst of load on the shared machine hits both
            jax_times.append(_timed(lambda: jax.block_until_ready(forward(model, ids_j, mask_j))))
            torch_times.append(_timed(lambda: ref(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t)))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    diff = float(np.abs(np.asarray(jax_logits) - torch_logits)[mask.astype(bool)].max())
    params = sum(p.numel() for p in ref.parameters())
    return dict(name=name, params=params, compile_s=compile_s, jax_ms=jax_s * 1e3, torch_ms=torch_s * 1e3,
                ratio=torch_s / jax_s, diff=diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [bench(name, cfg, args.batch, args.seq, args.reps) for name, cfg in SIZES.items()]
    print(f"batch {args.batch} x {args.seq} tokens (left padded), float32, median of {args.reps}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}\n")
    print("| model | params | JAX compile (s) | JAX forward (ms) | transformers forward (ms) | "
          "transformers / JAX time | max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['compile_s']:.2f} | {r['jax_ms']:.1f} | "
              f"{r['torch_ms']:.1f} | {r['ratio']:.2f}x | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
