"""A built-in task with verifiable integer answers: multi-step arithmetic word problems.

    Tom has 3 apples. Tom buys 4 more. Tom gives 2 away. How many apples does Tom have now?

with the supervised warm-start solution

    3 + 4 = 7.
    7 - 2 = 5.
    The answer is \\boxed{5}.

The language is templated with a small vocabulary (the project's own tokenizer covers it
exactly), numbers are small at low levels, and every answer is a non-negative integer. A row is
``{"problem", "answer", "solution", "level"}``, so the prompt pipeline reads it like any file.

Train and test never share a problem text: a problem belongs to the split picked by a stable
hash of its text (``TEST_FRACTION`` of texts are test). They share arithmetic facts, as any two
sets of word problems do; generation is deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import Sequence

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Emma")
ITEMS = ("apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps")
ADD_VERBS = ("buys {k} more", "finds {k} more", "gets {k} more")
SUB_VERBS = ("gives {k} away", "loses {k}", "sells {k}")
MUL_VERBS = {2: "doubles them", 3: "triples them"}
OPENING = "{name} has {start} {item}."
STEP = " {name} {verb}."
QUESTION = " How many {item} does {name} have now?"
ANSWER_LINE = "The answer is \\boxed{{{answer}}}."
# Every literal text the task writes; the tokenizer builds its vocabulary from these.
TEXT_FRAGMENTS = (
    NAMES + ITEMS + ADD_VERBS + SUB_VERBS + tuple(MUL_VERBS.values())
    + (OPENING, STEP, QUESTION, ANSWER_LINE)
)
MAX_VALUE = 999  # running totals stay below this (at most three digits)
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Level:
    """Difficulty: number of steps, operand ranges, and whether doubling/tripling occurs."""

    steps: int
    max_start: int
    max_operand: int
    multiply: bool


LEVELS = {
    1: Level(steps=1, max_start=9, max_operand=9, multiply=False),
    2: Level(steps=2, max_start=9, max_operand=9, multiply=False),
    3: Level(steps=3, max_start=20, max_operand=9, multiply=True),
    4: Level(steps=4, max_start=50, max_operand=20, multiply=True),
    5: Level(steps=5, max_start=99, max_operand=50, multiply=True),
}


def _draw_problem(rng: random.Random, level: Level) -> tuple[str, str, int, list[tuple[str, int]]]:
    """Random (name, item, start, steps); a step is ("+", k), ("-", k) or ("*", k)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(1, level.max_start)
    value, steps = start, []
    for _ in range(level.steps):
        # At MAX_VALUE nothing can be added (only reached by tripling 333; the draws that never
        # get there are unchanged by this guard).
        ops = ((["+"] if value < MAX_VALUE else []) + (["-"] if value > 0 else [])
               + (["*"] if level.multiply and value * 2 <= MAX_VALUE else []))
        op = rng.choice(ops)
        if op == "+":
            k = rng.randint(1, min(level.max_operand, MAX_VALUE - value))
        elif op == "-":
            k = rng.randint(1, min(level.max_operand, value))
        else:
            k = rng.choice([f for f in (2, 3) if value * f <= MAX_VALUE])
        value = _apply(value, op, k)
        steps.append((op, k))
    return name, item, start, steps


def _apply(value: int, op: str, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


def _problem_text(rng: random.Random, name: str, item: str, start: int, steps) -> str:
    text = OPENING.format(name=name, start=start, item=item)
    for op, k in steps:
        verb = MUL_VERBS[k] if op == "*" else rng.choice(ADD_VERBS if op == "+" else SUB_VERBS)
        text += STEP.format(name=name, verb=verb.format(k=k))
    return text + QUESTION.format(item=item, name=name)


def solution_text(start: int, steps: Sequence[tuple[str, int]]) -> str:
    """The step-by-step solution: one ``a op b = c.`` line per step, then the boxed answer."""
    lines, value = [], start
    for op, k in steps:
        new_value = _apply(value, op, k)
        lines.append(f"{value} {op} {k} = {new_value}.")
        value = new_value
    return "\n".join(lines + [ANSWER_LINE.format(answer=value)])


def split_of(problem: str) -> str:
    """``train`` or ``test`` for a problem text, from a stable hash (same on every machine)."""
    bucket = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "big")
    return "test" if bucket % 1000 < TEST_FRACTION * 1000 else "train"


def generate(n: int, *, split: str = "train", levels: Sequence[int] = (1,), seed: int = 0) -> list[dict]:
    """``n`` rows ``{"problem", "answer", "solution", "level"}`` of ``split``, levels drawn
    uniformly from ``levels``; the same arguments give the same rows."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"levels {list(levels)} must be a non-empty subset of {sorted(LEVELS)}")
    rng = random.Random(f"sspo-synthetic-{seed}")
    rows, attempts = [], 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} {split} problems at levels {levels}")
        level = rng.choice(list(levels))
        name, item, start, steps = _draw_problem(rng, LEVELS[level])
        problem = _problem_text(rng, name, item, start, steps)
        if split_of(problem) != split:
            continue
        answer = start
        for op, k in steps:
            answer = _apply(answer, op, k)
        rows.append({
            "problem": problem, "answer": str(answer),
            "solution": solution_text(start, steps), "level": level,
        })
    return rows


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write rows as JSON Lines (one object per line), creating parent folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
