"""Peak scratch memory of token log-probs + entropies, forward and backward, chunked vs naive.

Nothing runs: each program is compiled for abstract inputs and XLA's memory analysis is read
(`jax.jit(f).lower(...).compile().memory_analysis()`), so the figures are what the compiled
program would allocate on this backend. The peer is the naive version that materialises the
full `[B, T, V]` float32 logits. The differentiated function is `sum(logp) + sum(entropy)`
w.r.t. hidden and the LM head.

    python benchmarks/logprobs_memory.py [--batch 8] [--length 4096] [--vocab 151936] [--hidden 1536]
"""
import argparse
import platform

import jax
import jax.numpy as jnp

from sspo_jax.rl.logprobs import token_logprobs_and_entropy


def naive_logprobs_and_entropy(hidden, lm_head, targets, temperature=1.0):
    """The peer: the same math on the full [B, T, V] float32 logits."""
    logits = jnp.einsum("bth,hv->btv", hidden, lm_head,
                        preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    probs = jnp.exp(logits - lse[..., None])
    return logp, lse - jnp.sum(probs * logits, axis=-1)


def grad_memory(fn, B, T, H, V, dtype):
    def loss(hidden, head, targets):
        logp, ent = fn(hidden, head, targets)
        return jnp.sum(logp) + jnp.sum(ent)

    args = (jax.ShapeDtypeStruct((B, T, H), dtype), jax.ShapeDtypeStruct((H, V), dtype),
            jax.ShapeDtypeStruct((B, T), jnp.int32))
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--chunks", default="64,128,256")
    a = ap.parse_args()
    B, T, V, H = a.batch, a.length, a.vocab, a.hidden
    gb = 1e9
    print(f"\nB={B}, T={T}, V={V}, H={H}; forward+backward w.r.t. hidden and head; "
          f"{platform.machine()} {jax.devices()[0].platform}, jax {jax.__version__}; "
          f"full float32 logits = {B * T * V * 4 / gb:.1f} GB\n")
    print("| version | dtype | scratch (temp) GB | arguments GB | outputs (grads) GB | "
          "temp / naive |")
    print("|---|---|---|---|---|---|")
    for dtype in (jnp.float32, jnp.bfloat16):
        naive = grad_memory(naive_logprobs_and_entropy, B, T, H, V, dtype)
        rows = [(f"chunked, chunk={c}",
                 grad_memory(lambda h, w, t, c=c: token_logprobs_and_entropy(h, w, t, 1.0, c),
                             B, T, H, V, dtype))
                for c in map(int, a.chunks.split(","))]
        for name, m in rows + [("naive full logits", naive)]:
            print(f"| {name} | {jnp.dtype(dtype).name} | {m.temp_size_in_bytes / gb:.2f} | "
                  f"{m.argument_size_in_bytes / gb:.2f} | {m.output_size_in_bytes / gb:.2f} | "
                  f"{m.temp_size_in_bytes / naive.temp_size_in_bytes:.3f} |")


if __name__ == "__main__":
    main()
