"""Is an extracted answer equivalent to the gold? And the grading of one response.

Order (the first test that says "equal" wins; all are tried before "wrong"):
1. exact match of `comparison_key` (normalised, whitespace removed);
2. numeric: both sides plain numbers (integer, decimal, `a/b`, `\\frac{a}{b}`, optional sign),
   compared as exact fractions: a gold that is an integer needs exactly that integer (`10000.0`
   and `10{,}000` are it, `9999.857` and `10000.5` are not: a near-integer hedge must not earn
   a reward), otherwise relative tolerance 1e-4; when both are plain numbers and neither has a
   `%`, this verdict is final;
3. math-verify: the gold parsed first, then the prediction, both with LaTeX extraction only
   (never math-verify's plain-expression mode, which would hand model text to sympy's
   `parse_expr`, an `eval`); `verify(gold, pred)` handles sets, intervals, tuples, matrices,
   equations and symbolic equality.

No timeouts here: math-verify is called with its own signal timeouts disabled, and the caller
(the pool worker, or the in-process grader) bounds the whole item instead.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from fractions import Fraction

from sspo_jax.rewards.extract import RULES, extract, last_boxed_content, last_line_boxes
from sspo_jax.rewards.normalize import comparison_key, normalize_answer

REASONS = ("correct", "wrong", "no_answer", "timeout", "error")
# Which test found the answers equal (GradeResult.match): the first that says so, in order.
MATCHES = ("exact", "numeric", "math_verify")
# Relative tolerance of the numeric test when the gold is not an integer (an integer gold is
# matched exactly: stricter than Qwen2.5-Math's grader, whose 1e-4 accepts 9999.857 for 10000).
NUMERIC_REL_TOL = Fraction(1, 10_000)
# Longer answers are compared exactly only: they are never a short math answer, and this bounds
# the cost of normalisation and of sympy.
MAX_ANSWER_CHARS = 2_000
# Digits allowed in each part of a number in the numeric test (keeps Fraction arithmetic cheap).
_MAX_DIGITS = 60
_DEC = r"\d{1,%d}(?:\.\d{1,%d})?|\.\d{1,%d}" % (_MAX_DIGITS, _MAX_DIGITS, _MAX_DIGITS)
# A plain number may carry a short exponent (`1e4`, `2.5E-3`): read exactly, like the rest.
_PLAIN_NUMBER = re.compile(r"(?P<sign>[-+]?)(?P<num>(?:%s)(?P<exp>[eE][-+]?\d{1,2})?)" % _DEC)
_NUMBER_LIST = re.compile(r"-?\d+(?:\.\d+)?(?:,-?\d+(?:\.\d+)?)+")
_FRACTION = re.compile(r"(?P<sign>[-+]?)\\frac\{(?P<nsign>-?)(?P<num>%s)\}\{(?P<den>%s)\}" % (_DEC, _DEC))


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response: `score` 1.0/0.0, `reason` in REASONS, the `extracted`
    answer (None when there is none or grading did not finish), for `error` a short `detail`,
    `rule`: how the answer was read (extract.RULES), `match`: which test found it equal
    (MATCHES; None unless correct)."""

    score: float
    reason: str
    extracted: str | None
    detail: str | None = None
    rule: str | None = None
    match: str | None = None


def parse_number(key: str) -> tuple[Fraction, bool] | None:
    """(value, is_integer) of a plain number written as a comparison key; None otherwise."""
    m = _PLAIN_NUMBER.fullmatch(key)
    if m:
        value = Fraction(m.group("num"))
        is_int = "." not in m.group("num") and m.group("exp") is None
        return (-value if m.group("sign") == "-" else value), is_int
    m = _FRACTION.fullmatch(key)
    if m:
        den = Fraction(m.group("den"))
        if den == 0:
            return None
        value = Fraction(m.group("num")) / den
        negative = (m.group("sign") == "-") != (m.group("nsign") == "-")
        return (-value if negative else value), value.denominator == 1
    return None


def numeric_equal(pred_key: str, gold_key: str) -> bool:
    """Both keys plain numbers and equal: exactly when the gold is an integer (or both are), else
    within NUMERIC_REL_TOL."""
    a, b = parse_number(pred_key), parse_number(gold_key)
    if a is None or b is None:
        return False
    (x, x_int), (y, y_int) = a, b
    if x == y:
        return True
    if y_int or y.denominator == 1 or (x_int and y_int):
        return False
    return abs(x - y) <= NUMERIC_REL_TOL * max(abs(x), abs(y))


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify  # lazy: sympy is heavy and only the grading processes need it

    # Its "timeout disabled" and per-failure warnings would flood the worker logs.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _mv_parse(latex: str):
    mv = _math_verify()
    return mv.parse("\\boxed{" + latex + "}", [mv.LatexExtractionConfig(boxed_match_priority=0)],
                    parsing_timeout=None)


@functools.lru_cache(maxsize=1024)
def _mv_parse_gold(gold: str):
    # The n samples of one prompt share the gold: parse it once per process.
    return _mv_parse(gold)


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict, gold parsed first; False when either side does not parse."""
    gold_parsed = _mv_parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = _mv_parse(pred)
    if not pred_parsed:
        return False
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None))


def answers_equivalent(pred: str, gold: str, use_math_verify: bool = True) -> bool:
    """Whether the extracted answer `pred` equals the gold answer `gold` (see module docstring)."""
    return equal_by(pred, gold, use_math_verify) is not None


def equal_by(pred: str, gold: str, use_math_verify: bool = True) -> str | None:
    """The test (MATCHES) that finds `pred` equal to `gold`; None when none does."""
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return "exact" if pred.strip() == gold.strip() else None
    pred_key, gold_key = comparison_key(pred), comparison_key(gold)
    if pred_key == gold_key and pred_key:
        return "exact"
    if numeric_equal(pred_key, gold_key):
        return "numeric"
    if _NUMBER_LIST.fullmatch(pred_key) and parse_number(gold_key) or (
            _NUMBER_LIST.fullmatch(gold_key) and parse_number(pred_key)):
        # Numbers joined by commas that are not thousands groups (`0,111`, `1000,99`) are a
        # list, never one number: math-verify would read some as a decimal comma.
        return None
    if "%" not in pred + gold and parse_number(pred_key) and parse_number(gold_key):
        # Two plain numbers: the numeric test is final (math-verify is stricter on them: exact for
        # integers, 6 decimals otherwise), which spares sympy on every wrong numeric answer.
        # A `%` keeps math-verify in play, which reads `25\%` as 0.25.
        return None
    if not use_math_verify:
        return None
    if math_verify_equal(pred, gold):
        return "math_verify"
    # Retry on the normalised forms (units, `x =`, word numbers that math-verify keeps), only
    # when normalisation changed something, so a plain wrong answer costs one verify.
    pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
    if (pred_norm, gold_norm) == (pred.strip(), gold.strip()):
        return None
    return "math_verify" if math_verify_equal(pred_norm, gold_norm) else None


def gold_answer(gold: str) -> str:
    """The gold answer text: the contents of the boxes on its last box's line joined by ", "
    when there are several ("$\\boxed{2}$ and $\\boxed{-3}$" -> "2, -3", the rule responses are
    read by), the last box's content when one, else the gold."""
    boxes = last_line_boxes(gold)
    if len(boxes) >= 2:
        return ", ".join(boxes)
    boxed = last_boxed_content(gold)
    return (boxed if boxed is not None else gold).strip()


def clean_text(text: str) -> str:
    """Replace lone surrogates and other unencodable code points by `?` (valid UTF-8 afterwards)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def grade_response(response: str, gold: str, use_math_verify: bool = True) -> GradeResult:
    """Grade one response against its gold: `correct`, `wrong` or `no_answer` (no timeout here)."""
    gold = gold_answer(clean_text(gold))
    found = extract(clean_text(response), gold)
    if found.answer is None:
        return GradeResult(0.0, "no_answer", None)
    match = equal_by(found.answer, gold, use_math_verify)
    if match is not None:
        return GradeResult(1.0, "correct", found.answer, rule=found.rule, match=match)
    return GradeResult(0.0, "wrong", found.answer, rule=found.rule)


def rule_counts(results) -> dict[str, int]:
    """How the answers were read (`rule/<code>`) and matched (`match/<test>`): every code, zeros
    included, over a list of GradeResult."""
    counts = {f"rule/{r}": 0 for r in RULES} | {f"match/{m}": 0 for m in MATCHES}
    for r in results:
        if r.rule is not None:
            counts[f"rule/{r.rule}"] += 1
        if r.match is not None:
            counts[f"match/{r.match}"] += 1
    return counts


def reason_counts(results) -> dict[str, int]:
    """Count of each reason code (all five keys, zeros included) in a list of GradeResult."""
    counts = {reason: 0 for reason in REASONS}
    for r in results:
        counts[r.reason] += 1
    return counts
