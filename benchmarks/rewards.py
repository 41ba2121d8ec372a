"""Grading throughput: the spawned process pool against in-process grading, timed in the same run.

Two batches: the verification table (math-verify does most of the work) and a batch of
512 typical RL responses (short reasoning, boxed integer; exact match decides, so this measures
the pool's per-item IPC overhead). Each mode grades each batch once to warm up (imports, the
per-process gold-parse cache), then `--reps` interleaved timed repetitions; the minimum is kept.
Worker start-up is excluded (reported on its own row).

    python benchmarks/rewards.py [--reps 2] [--processes 1,2]
"""
import argparse
import json
import pathlib
import platform
import time

from sspo_jax.rewards import Grader

TABLE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "grading_table.jsonl"


def batches():
    rows = [json.loads(line) for line in TABLE.read_text(encoding="utf-8").splitlines()]
    table = ([r["response"] for r in rows], [r["gold"] for r in rows])
    rl = ([f"Step 1: {i} + {i} = {2 * i}. Step 2: so the result is $\\boxed{{{2 * i + (i % 3 == 0)}}}$."
           for i in range(512)], [str(2 * i) for i in range(512)])
    return {f"verification table ({len(rows)})": table, "RL batch, boxed integers (512)": rl}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--processes", default="1,2")
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]

    graders = {"in-process": Grader(processes=0)}
    startup = {}
    for p in counts:
        t0 = time.perf_counter()
        g = Grader(processes=p)
        g.wait_until_ready()
        startup[p] = time.perf_counter() - t0
        graders[f"pool p={p}"] = g

    work = batches()
    best = {(m, b): float("inf") for m in graders for b in work}
    for b, (responses, golds) in work.items():
        for g in graders.values():
            g.grade(responses, golds, timeout=10.0)  # warm-up
    for _ in range(args.reps):
        for b, (responses, golds) in work.items():
            for m, g in graders.items():
                t0 = time.perf_counter()
                g.grade(responses, golds, timeout=10.0)
                best[(m, b)] = min(best[(m, b)], time.perf_counter() - t0)
    for g in graders.values():
        g.close()

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; reps={args.reps} (min)\n")
    print("| batch | mode | seconds | items/s | speed vs in-process |")
    print("| --- | --- | ---: | ---: | ---: |")
    for b, (responses, _) in work.items():
        base = best[("in-process", b)]
        for m in graders:
            s = best[(m, b)]
            print(f"| {b} | {m} | {s:.3f} | {len(responses) / s:.0f} | {base / s:.2f}x |")
    for p, s in startup.items():
        print(f"| worker start-up | pool p={p} | {s:.2f} | | |")


if __name__ == "__main__":
    main()
