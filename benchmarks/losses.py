"""Cost of the SSPO loss+gradient against GRPO's, timed in the same run, and its growth with T.

Inputs are token log-prob arrays (the logits are excluded: they cost the same for every
objective). Both objectives run the full `policy_loss` (metrics included) under one jit with
`value_and_grad` w.r.t. logp, with [B, T] clip bounds from `clip_bounds`; the once-per-rollout
work (segment ids, adaptive bounds) is timed on its own row. Repetitions are interleaved and
the minimum is kept, which is the figure least disturbed by other load on a shared machine.

    python benchmarks/losses.py [--batch 64] [--lengths 1024,2048,4096] [--reps 60]
"""
import argparse
import platform
import time

import jax
import numpy as np

from sspo_jax.rl import advantages, losses, segments


def make_inputs(B, T, seed=0):
    rng = np.random.default_rng(seed)
    V = 1000
    ends = np.zeros(V, bool)
    ends[rng.choice(V, 80, replace=False)] = True          # ~8%: ~12-token subsentences
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    lengths = rng.integers(T // 4, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.01, 3.0, size=(B, T)).astype(np.float32)
    old = (logp + rng.normal(size=(B, T)) * 0.05).astype(np.float32)
    adv = np.asarray(advantages.group_advantages(rng.integers(0, 2, B).astype(np.float32), 8))
    entropy = rng.uniform(0.0, 3.0, size=(B, T)).astype(np.float32)
    return dict(tokens=tokens, mask=mask, logp=logp, old=old, adv=adv, entropy=entropy, ends=ends)


def loss_and_grad_fn(cfg):
    def run(logp, old, adv, mask, seg, lo, hi):
        f = lambda lp: losses.policy_loss(cfg, lp, old, adv, mask, seg, lo, hi)  # noqa: E731
        return jax.value_and_grad(f, has_aux=True)(logp)
    return jax.jit(run)


def rollout_prep_fn(cfg, ends):
    def run(tokens, mask, entropy):
        seg = segments.segment_ids(tokens, mask, ends)
        return seg, losses.clip_bounds(cfg, mask, seg, entropy)
    return jax.jit(run)


def time_min(fns, reps):
    """{name: (min wall s, min process CPU s)} over interleaved repetitions, after a warm-up.

    CPU time (all threads of this process) is the steadier figure when other processes share
    the cores: waiting for a core does not count in it.
    """
    for f in fns.values():
        jax.block_until_ready(f())
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for _ in range(reps):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(f())
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return {k: (wall[k], cpu[k]) for k in fns}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    cfgs = {"grpo": losses.preset("grpo"), "sspo": losses.preset("sspo")}
    rows = []
    for T in [int(x) for x in args.lengths.split(",")]:
        x = make_inputs(args.batch, T)
        prep = rollout_prep_fn(cfgs["sspo"], x["ends"])
        seg, (lo_s, hi_s) = prep(x["tokens"], x["mask"], x["entropy"])
        lo_g, hi_g = jax.jit(lambda m, s, e: losses.clip_bounds(cfgs["grpo"], m, s, e))(
            x["mask"], seg, x["entropy"])
        common = (x["logp"], x["old"], x["adv"], x["mask"], seg)
        grpo, sspo = loss_and_grad_fn(cfgs["grpo"]), loss_and_grad_fn(cfgs["sspo"])
        fns = {"grpo": lambda: grpo(*common, lo_g, hi_g),
               "sspo": lambda: sspo(*common, lo_s, hi_s),
               "prep": lambda: prep(x["tokens"], x["mask"], x["entropy"])}
        best = time_min(fns, args.reps)
        n_sub = int(np.sum(np.bincount(np.asarray(seg)[x["mask"]]) > 0))
        rows.append((T, best["grpo"], best["sspo"], best["prep"], x["mask"].sum() / n_sub))
    print(f"\nB={args.batch}, {platform.machine()} with {jax.device_count()} device(s) "
          f"({jax.devices()[0].platform}), jax {jax.__version__}, min of {args.reps} reps; "
          f"ms as wall / process CPU time\n")
    print("| T | grpo loss+grad (ms) | sspo loss+grad (ms) | sspo / grpo (wall, CPU) | "
          "sspo CPU ms per 1k T | segment ids + adaptive bounds (ms, once per rollout) | "
          "tokens / subsentence |")
    print("|---|---|---|---|---|---|---|")
    for T, g, s, p, tps in rows:
        print(f"| {T} | {g[0] * 1e3:.1f} / {g[1] * 1e3:.1f} | {s[0] * 1e3:.1f} / {s[1] * 1e3:.1f} "
              f"| {s[0] / g[0]:.2f}, {s[1] / g[1]:.2f} | {s[1] * 1e3 / (T / 1024):.1f} "
              f"| {p[0] * 1e3:.1f} / {p[1] * 1e3:.1f} | {tps:.1f} |")

if __name__ == "__main__":
    main()
