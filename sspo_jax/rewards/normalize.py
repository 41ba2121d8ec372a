"""Normalisation of an extracted answer (and of the gold) before comparison.

`normalize_answer` returns LaTeX with cosmetic differences removed (the list is in
docs/rewards.md); `comparison_key` additionally drops all whitespace and is what the exact-match
step compares. The same function is applied to the prediction and the gold, so a rule can only
make two answers equal when they differ by that cosmetic detail.

Every rule is a single left-to-right pass or a regex without nested quantifiers; brace unwrapping
is a stack scan, not recursion. Callers cap the input length (equivalence.MAX_ANSWER_CHARS).
"""
from __future__ import annotations

import re

# Commands whose argument is kept and the command dropped: `\text{cm}` -> `cm`.
_UNWRAP = ("text", "textbf", "textit", "textnormal", "mathrm", "mathbf", "mbox", "boxed", "fbox")
_UNWRAP_RE = re.compile(r"\\(" + "|".join(_UNWRAP) + r")\s*\{")

# `\\\\` (a row break) is matched first so that its second backslash is never read as `\\ `.
_SPACING = re.compile(r"\\\\|\\[!,;: ]|\\q?quad(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_FRACS = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°")
_PERCENT_DOLLAR = re.compile(r"\\?%|\\?\$")
_GROUPED_COMMA = re.compile(r"\{,\}")
# Thousands groups: the first has no leading zero (`0,111` is a list, never 111), the others
# three digits. A comma is never a decimal point (`1000,99` and `3,14` are lists).
THOUSANDS_NUMBER = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_SHORT_FRAC = re.compile(r"\\frac\s*(\d)\s*(\d)")
_SHORT_FRAC_NUM = re.compile(r"\\frac\s*(\d)\s*\{")
_SHORT_FRAC_DEN = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SHORT_SQRT = re.compile(r"\\sqrt\s*(\d)")
_LEADING_DOT = re.compile(r"(?<![\d}])\.(\d)")
_SLASH_FRAC = re.compile(r"(-?\d+)\s*/\s*(\d+)")
# `x = 5`, `x_1 = 5`, `\theta = 5`: a single variable on the left of the only `=`.
_ASSIGNMENT = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=")
_CHOICE = re.compile(r"\(([A-Ea-e])\)")
_UNITS = (
    "square units|sq units|square feet|square inches|square meters|square centimeters|"
    "cubic feet|cubic inches|cubic meters|cubic centimeters|units?|cm|mm|km|meters?|metres?|"
    "centimeters?|kilometers?|millimeters?|inch(?:es)?|feet|foot|ft|yards?|miles?|mph|kg|grams?|"
    "kilograms?|pounds?|lbs?|ounces?|oz|seconds?|sec|minutes?|mins?|hours?|hrs?|days?|weeks?|"
    "months?|years?|dollars?|cents?|degrees?|liters?|litres?|ml|people|students|ways"
)
# A number-like head ending in a digit, `}` or `)`, then one unit, optionally squared/cubed.
_TRAILING_UNIT = re.compile(r"(?P<head>.*[\d})])\s*(?:" + _UNITS + r")(?:\s*\^\s*\{?[23]\}?|[²³])?",
                            re.IGNORECASE)
_WORD_NUMBERS = {
    w: i for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split())
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}


def unwrap_commands(s: str) -> str:
    """Drop `\\text{`, `\\mathrm{`, ... and their matching `}`, keeping the argument. O(n), no recursion."""
    if not _UNWRAP_RE.search(s):
        return s
    out: list[str] = []
    stack: list[bool] = []  # one entry per open `{`: does its `}` belong to an unwrapped command?
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            m = _UNWRAP_RE.match(s, i)
            if m:
                stack.append(True)
                i = m.end()
                continue
            out.append(s[i : i + 2])
            i += 2
            continue
        if ch == "{":
            stack.append(False)
        elif ch == "}" and stack:
            if stack.pop():
                i += 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def word_to_number(s: str) -> str:
    """`"five"` -> `"5"`, `"twenty-one"` -> `"21"` (0..99, whole string only); otherwise `s` unchanged."""
    w = s.strip().lower()
    if w in _WORD_NUMBERS:
        return str(_WORD_NUMBERS[w])
    if w in _TENS:
        return str(_TENS[w])
    parts = w.replace("-", " ").split()
    if len(parts) == 2 and parts[0] in _TENS and parts[1] in _WORD_NUMBERS and 0 < _WORD_NUMBERS[parts[1]] < 10:
        return str(_TENS[parts[0]] + _WORD_NUMBERS[parts[1]])
    return s


def _strip_units(s: str) -> str:
    m = _TRAILING_UNIT.fullmatch(s)
    return m.group("head").strip() if m else s


def _strip_assignment(s: str) -> str:
    if s.count("=") != 1:
        return s
    m = _ASSIGNMENT.match(s)
    return s[m.end() :].strip() if m else s


def normalize_answer(s: str) -> str:
    """Cosmetic normalisation of one answer (rules listed in docs/rewards.md); spaces collapsed."""
    s = " ".join(s.split())
    s = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else " ", s)
    s = _FRACS.sub(r"\\frac", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT_DOLLAR.sub("", s)
    s = unwrap_commands(s)
    s = " ".join(s.split())
    s = s.rstrip(".").rstrip("\\").strip()
    s = _strip_units(s)
    s = _strip_assignment(s)
    s = _GROUPED_COMMA.sub(",", s)
    if THOUSANDS_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    s = word_to_number(s)
    s = _SHORT_FRAC.sub(r"\\frac{\1}{\2}", s)
    s = _SHORT_FRAC_NUM.sub(r"\\frac{\1}{", s)
    s = _SHORT_FRAC_DEN.sub(r"\\frac{\1}{\2}", s)
    s = _SHORT_SQRT.sub(r"\\sqrt{\1}", s)
    s = _LEADING_DOT.sub(r"0.\1", s)
    m = _SLASH_FRAC.fullmatch(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    m = _CHOICE.fullmatch(s)
    if m:
        s = m.group(1)
    return s.rstrip(".").strip()


def comparison_key(s: str) -> str:
    """`normalize_answer(s)` with all whitespace removed: the exact-match key."""
    return "".join(normalize_answer(s).split())
