"""Sampler throughput: `sspo_jax.generate.sampler.generate` against `transformers` `generate`, same run.

Both sides get the same random Qwen2 weights (built by transformers, saved, loaded by sspo_jax),
the same prompts (batch x prompt_len real tokens, no padding), greedy decoding, and exactly
`max_new_tokens` new tokens (no EOS: `eos_ids=()` here, `eos_token_id=None` and
`min_new_tokens=max_new_tokens` there). Times cover a whole generate call (prefill + decode);
throughput is new tokens per second. JAX's first call (trace + compile + run) is reported
separately as compile time; after one warm-up call per side, `--reps` interleaved timed calls,
minimum kept. The peer uses the SDPA attention path and a KV cache (transformers' defaults), and
is timed at 1 torch thread and at all cores; the faster is reported.

With `--peak-gbs B` the table adds the fraction of the memory-bandwidth roofline of one decode
step: (bytes of all weights + bytes of the KV cache read at the mean context) / step time / B.
The step time is (generate time - prefill time) / (max_new_tokens - 1), prefill timed on its own.
`--peak-gbs measure` (for CPUs, whose peak is rarely published for a VM) uses this host's
measured read bandwidth instead: the best of torch summing a 512 MiB float32 array at 1 thread and
at all cores (a pure streaming read, the same access a decode step makes to its weights).

    python benchmarks/sampling.py --peak-gbs measure     # CPU: ~5M and ~40M configs
    python benchmarks/sampling.py --sizes 1.5b --peak-gbs 3350 --dtype bfloat16 --no-hf   # GPU

`--workload skewed` times the rollout engines on RL-like response lengths instead: each row's
length is drawn from a lognormal with median max_new_tokens / 6 (sigma 1), the two longest set to
the budget (rows that never emit an EOS), and forced by the benchmark's model, a Qwen2 whose
decoder puts the EOS first once the row has written its drawn length minus one tokens (rows
have distinct prompt lengths; the length is looked up by it). Greedy, one sample per prompt. The
static engine, the continuous engine at three slot counts (a quarter, a half and all of the rows) and
tunix's vanilla sampler (benchmarks/tunix_sampler.py in its own virtualenv, `--tunix-python`;
a static sampler with a row at the budget runs every row for max_new_tokens steps, so it is timed
generating that with no EOS) on the same weights and prompt lengths, in one run; throughput counts
real tokens (up to and including each EOS):

    python benchmarks/sampling.py --workload skewed --tunix-python /work/tunix-venv/bin/python
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from flax import nnx

from sspo_jax import model as M
from sspo_jax.generate import sampler

# Qwen2 shapes; embeddings tied as in the small Qwen2.5 models.
SIZES = {
    "5m": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=5,
               num_attention_heads=4, num_key_value_heads=2),
    "40m": dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                num_attention_heads=8, num_key_value_heads=2),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
}
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def build(size: str, out_dir: str, torch_dtype):
    config = transformers.Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096,
                                      rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).to(torch_dtype).eval()
    hf.save_pretrained(out_dir, safe_serialization=True)
    return hf, sum(p.numel() for p in hf.parameters())


def timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measured_read_gbs(reps: int = 5) -> float:
    """This host's streaming read bandwidth in GB/s: best of summing 512 MiB at 1 thread / all cores."""
    a = torch.ones(2 ** 27, dtype=torch.float32)
    best = 0.0
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        for _ in range(reps):
            t0 = time.perf_counter()
            a.sum().item()
            best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    del a
    return best


def roofline_bytes(cfg: M.Qwen2Config, n_params: int, dtype_bytes: int, batch: int, prompt_len: int,
                   new: int) -> float:
    """Bytes one decode step must read: every weight once, plus K and V at the mean context length."""
    mean_context = prompt_len + new / 2
    kv = 2 * cfg.num_hidden_layers * batch * mean_context * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return n_params * dtype_bytes + kv


def run_size(size, args, jdtype, tdtype):
    with tempfile.TemporaryDirectory() as tmp:
        hf, n_params = build(size, tmp, tdtype)
        model = M.from_pretrained(tmp, dtype=jdtype)
    vocab, b, p, n = SIZES[size]["vocab_size"], args.batch, args.prompt_len, args.new_tokens
    ids = np.random.default_rng(0).integers(1, vocab, (b, p)).astype(np.int32)
    mask = np.ones_like(ids)
    key = jax.random.key(0)

    def ours(new=n):
        out = sampler.generate(model, ids, mask, key, max_new_tokens=new, temperature=0.0, eos_ids=(), pad_id=0)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    first = ours()
    compile_s = time.perf_counter() - t0
    assert int(np.asarray(first.lengths).min()) == n  # really produced every token
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def theirs(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == p + n

    compile_s -= timed(ours, 1)  # first call minus a warm call
    # torch at 1 thread and at all cores: on a busy machine its spinning threads can lose 5x.
    thread_counts = sorted({1, os.cpu_count()}) if args.hf else []
    for threads in thread_counts:
        theirs(threads)  # warm-up
    t_ours, t_theirs = float("inf"), {k: float("inf") for k in thread_counts}
    for _ in range(args.reps):  # interleaved, so both sides see the same machine load
        t_ours = min(t_ours, timed(ours, 1))
        for threads in thread_counts:
            t_theirs[threads] = min(t_theirs[threads], timed(lambda: theirs(threads), 1))
    best = min(t_theirs, key=t_theirs.get) if args.hf else None
    row = dict(size=size, params=n_params, ours_s=t_ours, ours_tps=b * n / t_ours, compile_s=compile_s,
               hf_s=t_theirs[best] if args.hf else None, hf_tps=b * n / t_theirs[best] if args.hf else None,
               hf_threads=best)
    if args.peak_gbs:
        ours(1)  # compile the prefill-only program (one new token)
        step = (t_ours - timed(lambda: ours(1), args.reps)) / (n - 1)
        nbytes = roofline_bytes(model.config, n_params, jnp.dtype(jdtype).itemsize, b, p, n)
        row.update(step_ms=step * 1e3, roofline=nbytes / step / (args.peak_gbs * 1e9))
    return row


class ForcedLengthQwen2(M.Qwen2ForCausalLM):
    """The skewed workload's model: a Qwen2 whose rows end at drawn lengths. `targets[p]` is the
    length of the row whose prompt has p tokens; the decoder forces the EOS logit to the top when
    a row has written targets - 1 tokens (a target above max_new_tokens: never)."""

    def set_targets(self, targets: np.ndarray, eos: int, new_tokens: int):
        self.targets = nnx.Variable(jnp.asarray(targets, jnp.int32))
        self.eos, self.new_tokens = eos, new_tokens

    def decoder(self):
        inner = super().decoder()
        targets, eos, new_tokens = self.targets[...], self.eos, self.new_tokens

        class Forced:
            head = staticmethod(inner.head)  # the prefill's prediction: column 0 (targets >= 2)

            def __call__(self, token, cache):
                logits, cache = inner(token, cache)
                prompt_slots = cache.max_len - new_tokens  # both engines: prompt first, then the response
                prompt_len = cache.mask[:, :prompt_slots].sum(-1)
                written = cache.mask[:, prompt_slots:].sum(-1)
                force = written == targets[jnp.clip(prompt_len, 0, targets.shape[0] - 1)] - 1
                top = logits[:, 0].max(-1) + 1.0
                logits = logits.at[:, 0, eos].set(jnp.where(force, top, logits[:, 0, eos]))
                return logits, cache

        return Forced()


def skewed_lengths(rows: int, new: int, seed: int = 0) -> np.ndarray:
    """Lognormal lengths, median new/6, sigma 1, in [2, new]; the two longest at the budget."""
    lengths = np.clip(np.round(np.random.default_rng(seed).lognormal(np.log(new / 6), 1.0, rows)), 2, new)
    lengths[np.argsort(lengths)[-2:]] = new
    return lengths.astype(np.int64)


def run_skewed(size, args, jdtype, tdtype):
    vocab, rows, new = SIZES[size]["vocab_size"], args.batch, args.new_tokens
    eos = vocab - 1
    with tempfile.TemporaryDirectory() as tmp:
        _, n_params = build(size, tmp, tdtype)
        loaded = M.from_pretrained(tmp, dtype=jdtype)
        model = ForcedLengthQwen2(loaded.config, rngs=nnx.Rngs(0), dtype=jdtype)
        nnx.update(model, nnx.state(loaded))
        # Distinct prompt lengths (the key of each row's drawn length), 16 .. 16 + rows - 1.
        prompt_lens = 16 + np.random.default_rng(1).permutation(rows)
        lengths = skewed_lengths(rows, new)
        targets = np.full(prompt_lens.max() + 1, new + 1)
        targets[prompt_lens] = np.where(lengths >= new, new + 1, lengths)
        model.set_targets(targets, eos, new)
        width = int(prompt_lens.max())
        ids = np.random.default_rng(0).integers(1, vocab - 1, (rows, width)).astype(np.int32)
        mask = (np.arange(width)[None] >= width - prompt_lens[:, None]).astype(np.int32)
        ids = np.where(mask == 1, ids, 0)
        tunix = _tunix(tmp, args, rows, prompt_lens, new) if args.tunix_python else None
    key = jax.random.key(0)
    # A quarter, a half (the Qwen configs' 128 slots for 256 rows per shard) and one slot per row
    # (rollout.slots=0, the default).
    engines = {"static": {}, **{f"continuous, {s} slots": dict(engine="continuous", slots=s, chunk_steps=args.chunk_steps)
                                for s in (rows // 4, rows // 2, rows)}}
    results = {}
    for name, kw in engines.items():
        def call(kw=kw):
            out = sampler.generate(model, ids, mask, key, max_new_tokens=new, temperature=0.0, eos_ids=(eos,),
                                   pad_id=0, **kw)
            return jax.block_until_ready(out)
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        got = np.asarray(out.lengths)
        np.testing.assert_array_equal(np.sort(got), np.sort(lengths))  # the drawn lengths, really
        results[name] = dict(call=call, best=float("inf"), first=first, steps=int(out.decode_steps),
                             slot_steps=int(out.slot_steps), tokens=int(got.sum()))
    for _ in range(args.reps):  # interleaved: every engine sees the same machine load
        for r in results.values():
            r["best"] = min(r["best"], timed(r["call"], 1))
    return dict(size=size, params=n_params, lengths=lengths, results=results, tunix=tunix)


def _tunix(ckpt, args, rows, prompt_lens, new):
    cmd = [args.tunix_python, os.path.join(os.path.dirname(__file__), "tunix_sampler.py"), "--hf-dir", ckpt,
           "--rows", str(rows), "--prompt-lens", ",".join(map(str, prompt_lens)), "--max-new-tokens", str(new),
           "--reps", str(args.reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": jax.default_backend()})
    if done.returncode:
        sys.exit(f"tunix peer failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_skewed(rows, args, load_before):
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores; skewed "
          f"workload: {args.batch} rows, prompts 16-{15 + args.batch} tokens, {args.new_tokens} new tokens at most, "
          f"{args.dtype}, greedy, min of {args.reps} reps; continuous chunks of {args.chunk_steps} steps; "
          f"1-min load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print("| config | lengths (median / mean / at budget) | engine | s | real tok/s | decode steps | "
          "slot occupancy | vs static | vs tunix | first call s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        lengths, res, tunix = row["lengths"], row["results"], row["tunix"]
        desc = f"{np.median(lengths):.0f} / {lengths.mean():.0f} / {(lengths >= args.new_tokens).sum()}"
        static = res["static"]["best"]
        for name, r in res.items():
            vs_tunix = f"{tunix['best_s'] / r['best']:.2f}x" if tunix else "-"
            print(f"| {row['size']} ({row['params'] / 1e6:.1f}M) | {desc} | {name} | {r['best']:.2f} | "
                  f"{r['tokens'] / r['best']:.0f} | {r['steps']} | {r['tokens'] / r['slot_steps']:.2f} | "
                  f"{static / r['best']:.2f}x | {vs_tunix} | {r['first']:.1f} |")
        if tunix:
            tokens = res["static"]["tokens"]
            print(f"| {row['size']} ({row['params'] / 1e6:.1f}M) | {desc} | tunix {tunix['tunix_version']} vanilla | "
                  f"{tunix['best_s']:.2f} | {tokens / tunix['best_s']:.0f} | {tunix['max_new_tokens']} | "
                  f"{tokens / (args.batch * args.new_tokens):.2f} | {static / tunix['best_s']:.2f}x | 1.00x | "
                  f"{tunix['compile_s']:.1f} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="5m,40m", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--peak-gbs", default="0",
                        help="peak memory bandwidth in GB/s, or 'measure' (this host's streaming read "
                             "bandwidth); adds the roofline fraction")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers peer")
    parser.add_argument("--workload", default="uniform", choices=("uniform", "skewed"))
    parser.add_argument("--tunix-python", default="", help="skewed: the python of a virtualenv with google-tunix")
    parser.add_argument("--chunk-steps", type=int, default=32, help="skewed: the continuous engine's chunk_steps")
    args = parser.parse_args()
    if args.workload == "skewed":
        if args.batch == 8 and args.new_tokens == 128:  # the uniform defaults: RL-like sizes instead
            args.batch, args.new_tokens = 64, 512
        load_before = os.getloadavg()[0]
        rows = [run_skewed(size, args, *DTYPES[args.dtype]) for size in args.sizes.split(",")]
        print_skewed(rows, args, load_before)
        return
    jdtype, tdtype = DTYPES[args.dtype]
    measured = args.peak_gbs == "measure"
    try:
        args.peak_gbs = measured_read_gbs() if measured else float(args.peak_gbs)
    except ValueError:
        parser.error(f"--peak-gbs must be a number of GB/s or 'measure', got {args.peak_gbs!r}")

    load_before = os.getloadavg()[0]
    rows = [run_size(size, args, jdtype, tdtype) for size in args.sizes.split(",")]
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}; batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.dtype}, greedy, min of {args.reps} reps; "
          f"1-min load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end"
          + (f"; roofline at {args.peak_gbs:.1f} GB/s ({'measured read bandwidth' if measured else 'given'})"
             if args.peak_gbs else "") + "\n")
    head = "| config | params | sspo_jax s | sspo_jax new tok/s | transformers s (threads) | transformers new tok/s | speed-up | compile s |"
    extra = " decode step ms | roofline |" if args.peak_gbs else ""
    print(head + extra)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if extra else ""))
    for r in rows:
        hf = (f"{r['hf_s']:.3f} ({r['hf_threads']}) | {r['hf_tps']:.0f} | {r['ours_tps'] / r['hf_tps']:.2f}x" if r["hf_s"]
              else "- | - | -")
        line = (f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['ours_s']:.3f} | {r['ours_tps']:.0f} | {hf} | "
                f"{r['compile_s']:.1f} |")
        if args.peak_gbs:
            line += f" {r['step_ms']:.2f} | {100 * r['roofline']:.1f}% |"
        print(line)


if __name__ == "__main__":
    main()
