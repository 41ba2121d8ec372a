"""Grading on several hosts: each process grades its own block of the responses in its own
pool, and the scores and reason, rule and match codes are all-gathered, so every process ends
with the same rewards and grading metrics."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from sspo_jax import rewards
from sspo_jax.parallel import hosts
from sspo_jax.rewards.equivalence import clean_text


def grade_across_hosts(grader, texts: Sequence[str], golds: Sequence[str], timeout: float):
    """GradeResult for every response, each process grading only its block.

    Every process passes all texts (they are decoded from the all-gathered tokens); the scores and
    codes of other processes' blocks arrive by all-gather, their extracted answers are recomputed
    here (extraction is cheap and deterministic; equivalence checks are not).
    """
    n = len(texts)
    block = hosts.process_block(n)
    mine = grader.grade(list(texts[block]), list(golds[block]), timeout=timeout)
    if jax.process_count() == 1:
        return mine
    rules, matches = (None,) + rewards.RULES, (None,) + rewards.MATCHES
    codes = np.array([[r.score, rewards.REASONS.index(r.reason), rules.index(r.rule),
                       matches.index(r.match)] for r in mine], np.float32)
    codes = hosts.allgather_blocks(codes.reshape(-1, 4), n)
    results = []
    for i, (score, code, rule, match) in enumerate(codes):
        if block.start <= i < block.stop:
            results.append(mine[i - block.start])
            continue
        reason = rewards.REASONS[int(code)]
        extracted = None
        if reason in ("correct", "wrong"):
            gold = rewards.gold_answer(clean_text(golds[i]))
            extracted = rewards.extract(clean_text(texts[i]), gold).answer
        results.append(rewards.GradeResult(float(score), reason, extracted,
                                           rule=rules[int(rule)], match=matches[int(match)]))
    return results
