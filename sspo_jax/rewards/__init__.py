"""Verifiable math rewards: answer extraction, equivalence, and grading in a process pool.

Imports no JAX (architecture rule); sympy/math-verify are imported only where grading runs.

    from sspo_jax import rewards
    rewards.reward(r"... \\boxed{\\frac12}", "0.5")          # 1.0
    results = rewards.grade(responses, golds, timeout=5.0)   # [GradeResult(score, reason, extracted)]
    rewards.reason_counts(results)                           # {"correct": 3, "wrong": 1, ...}
    rewards.rule_counts(results)                             # {"rule/box": 3, "match/exact": 2, ...}
"""
from __future__ import annotations

import atexit
import threading

from sspo_jax.rewards.equivalence import (
    MATCHES,
    MAX_ANSWER_CHARS,
    NUMERIC_REL_TOL,
    REASONS,
    GradeResult,
    answers_equivalent,
    gold_answer,
    grade_response,
    reason_counts,
    rule_counts,
)
from sspo_jax.rewards.extract import RULES, Extraction, extract, extract_answer, last_boxed_content
from sspo_jax.rewards.normalize import comparison_key, normalize_answer
from sspo_jax.rewards.pool import Grader
from sspo_jax.rewards.shaping import combine_rewards, format_reward, overlong_penalty, shaped_rewards

__all__ = [
    "MATCHES", "MAX_ANSWER_CHARS", "NUMERIC_REL_TOL", "REASONS", "RULES", "Extraction",
    "GradeResult", "Grader", "answers_equivalent", "close_default_grader", "combine_rewards",
    "comparison_key", "default_grader", "extract", "extract_answer", "format_reward", "gold_answer",
    "grade", "grade_response", "last_boxed_content", "normalize_answer", "overlong_penalty",
    "reason_counts", "reward", "rule_counts", "shaped_rewards",
]

_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The module-level Grader behind `grade`/`reward`, created on first use, closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
            atexit.register(close_default_grader)
        return _default


def close_default_grader() -> None:
    """Shut the default Grader's processes down (a later `grade` starts a new one)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None


def grade(responses, golds, timeout: float = 5.0) -> list[GradeResult]:
    """Grade each response against its gold in the default process pool (see `Grader.grade`)."""
    return default_grader().grade(responses, golds, timeout=timeout)


def reward(response: str, gold: str, timeout: float = 5.0) -> float:
    """1.0 if the response's final answer equals the gold, else 0.0 (graded in the pool)."""
    return grade([response], [gold], timeout=timeout)[0].score
