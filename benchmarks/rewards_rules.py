"""Cost per item of the current grading rules against an earlier version's, timed in one run.

The earlier `sspo_jax/rewards/` is read from git (`--ref`, default: the commit before the issue-18
rules) into a temporary package and imported beside the current one. Both grade the same batches
in this process (`grade_response`, no pool: the rules' own cost): the verification table, and
512 typical RL responses (short reasoning, one boxed integer). Interleaved repetitions after a
warm-up pass (imports, math-verify's gold cache); the minimum is kept.

    python benchmarks/rewards_rules.py [--ref 90a1860] [--reps 3]
"""
import argparse
import importlib
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE = ROOT / "tests" / "data" / "grading_table.jsonl"


def load_old(ref: str):
    """The rewards package at `ref`, importable as `old_rewards`."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{ref}:sspo_jax/rewards"],
                           check=True, capture_output=True, text=True).stdout.split()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="old-rewards-")) / "old_rewards"
    tmp.mkdir()
    for name in files:
        if not name.endswith(".py"):
            continue
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:sspo_jax/rewards/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (tmp / name).write_text(text.replace("sspo_jax.rewards", "old_rewards"), encoding="utf-8")
    sys.path.insert(0, str(tmp.parent))
    return importlib.import_module("old_rewards.equivalence")


def batches():
    rows = [json.loads(line) for line in TABLE.read_text(encoding="utf-8").splitlines()]
    table = [(r["response"], r["gold"]) for r in rows]
    rl = [(f"Step 1: {i} + {i} = {2 * i}. Step 2: so the result is $\\boxed{{{2 * i + (i % 3 == 0)}}}$.",
           str(2 * i)) for i in range(512)]
    return {f"verification table ({len(rows)})": table, "RL batch, boxed integers (512)": rl}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", default="90a1860")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from sspo_jax.rewards import equivalence as new
    old = load_old(args.ref)
    graders = {f"rules at {args.ref}": old.grade_response, "current rules": new.grade_response}
    print(f"\n{platform.machine()}, Python {platform.python_version()}, in-process grading, "
          f"min of {args.reps} interleaved reps\n")
    print("| batch | rules | seconds | ms / item | vs earlier |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, items in batches().items():
        best = {}
        for grade in graders.values():
            for response, gold in items:  # warm-up
                grade(response, gold)
        for _ in range(args.reps):
            for label, grade in graders.items():
                t0 = time.perf_counter()
                for response, gold in items:
                    grade(response, gold)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - t0)
        base = best[f"rules at {args.ref}"]
        for label, seconds in best.items():
            print(f"| {name} | {label} | {seconds:.3f} | {1e3 * seconds / len(items):.3f} "
                  f"| {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
