"""The decode step's weight matmuls alone: [8, K] x [K, N] over many distinct weights, as one dot
each and as independent blocks of the output axis, against torch's `linear`, same run.

Why: at batch 8 a decode step is a chain of such dots, each streaming its weights once. With
more weight bytes than the last-level cache holds they come from DRAM, and XLA CPU runs a single
dot below the host's read bandwidth; `Qwen2ForCausalLM.decode_weights` therefore hands large
models' matrices over as blocks that run as concurrent dots. This script measures that choice.
Each dot depends on the previous one's result (as layers do), so chains cannot overlap.

    python benchmarks/decode_matmul.py                     # the ~40M config's MLP shapes
    python benchmarks/decode_matmul.py --k 256 --n 768 --count 10   # ~5M's (cache-resident)
"""
import argparse
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sampling import timed  # benchmarks/sampling.py, this script's sibling


def chain(dot):
    """A jitted chain of `dot(h, w)` over a list of weights, each input depending on the last output."""
    @jax.jit
    def run(x, weights):
        acc = None
        h = x
        for w in weights:
            y = dot(h, w)
            acc = y if acc is None else acc + y
            h = h + y[:, :1].sum() * 1e-9
        return acc
    return run


def blocks_dot(h, w_blocks):
    return jnp.concatenate([h @ w for w in w_blocks], axis=1)


def best_time(fn, reps: int) -> float:
    """Min of `reps` calls after one warm-up call (compilation, first touch of the weights)."""
    fn()
    return timed(fn, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--count", type=int, default=40, help="distinct weight matrices in the chain")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    k, n, b = args.k, args.n, args.batch
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((k, n), dtype=np.float32) * 0.01 for _ in range(args.count)]
    x_host = rng.standard_normal((b, k), dtype=np.float32) * 0.01
    x, weights = jnp.asarray(x_host), [jnp.asarray(w) for w in host]
    cases = {"one dot": (chain(lambda h, w: h @ w), weights)}
    for parts in (2, 4):
        cases[f"{parts} blocks"] = (chain(blocks_dot), [tuple(jnp.array_split(w, parts, axis=1)) for w in weights])
    nbytes = k * n * 4 * args.count
    print(f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores; [{b}, {k}] x [{k}, {n}] float32, "
          f"{args.count} matrices ({nbytes / 2**20:.0f} MiB), min of {args.reps}\n")
    print("| form | ms per chain | GB/s of weights |\n| --- | ---: | ---: |")
    results = {}
    for name, (run, w) in cases.items():
        results[f"XLA, {name}"] = best_time(lambda: run(x, w).block_until_ready(), args.reps)
    xt = torch.from_numpy(x_host)
    wt = [torch.from_numpy(w).T.contiguous() for w in host]  # torch.nn.Linear's [out, in]

    def torch_chain():
        h, acc = xt, None
        for w in wt:
            y = torch.nn.functional.linear(h, w)
            acc = y if acc is None else acc + y
            h = h + y[:, :1].sum() * 1e-9
        return acc

    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            results[f"torch linear, {threads} thread(s)"] = best_time(torch_chain, args.reps)
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
