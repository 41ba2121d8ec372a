"""Optional reward terms that compose with the correctness score (pure functions, no JAX).

How they combine (`combine_rewards`):
    total = correctness + format_weight * format_reward + overlong_penalty
with correctness in {0, 1}, format_reward in {0, 1} and overlong_penalty in [-1, 0]. Each term is
off by default in the trainer (config block `reward`: format_weight 0, overlong_buffer 0);
enabling one never changes another. `shaped_rewards` is what the trainer calls.
"""
from __future__ import annotations

from typing import Sequence

from sspo_jax.rewards.extract import count_boxes


def format_reward(response: str) -> float:
    """1.0 when the response holds exactly one closed top-level `\\boxed{}`/`\\fbox{}`, else 0.0."""
    return 1.0 if count_boxes(response) == 1 else 0.0


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment for a response of `length` tokens.

    0 up to `max_length - cache_length` tokens, then falling linearly to -1 at `max_length`
    (`(max_length - cache_length - length) / cache_length`), and -1 beyond it.
    """
    if max_length <= 0 or cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    if length < 0:
        raise ValueError(f"length must be >= 0 tokens, got {length}")
    free = max_length - cache_length
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache_length
    return -1.0


def combine_rewards(correctness: float, format_score: float = 0.0, format_weight: float = 0.0,
                    overlong: float = 0.0) -> float:
    """`correctness + format_weight * format_score + overlong` (see the module docstring)."""
    return correctness + format_weight * format_score + overlong


def shaped_rewards(correctness: Sequence[float], responses: Sequence[str], lengths: Sequence[int],
                   *, max_length: int, format_weight: float = 0.0, overlong_buffer: int = 0) -> list[float]:
    """The trainer's reward per response (config block `reward`): correctness, plus
    `format_weight` x `format_reward`, plus DAPO's `overlong_penalty` over the last
    `overlong_buffer` tokens of the `max_length` budget (0 = off). With both off it is the
    correctness itself."""
    out = []
    for score, text, length in zip(correctness, responses, lengths, strict=True):
        fmt = format_reward(text) if format_weight else 0.0
        over = overlong_penalty(int(length), max_length, overlong_buffer) if overlong_buffer else 0.0
        out.append(combine_rewards(score, fmt, format_weight, over))
    return out
