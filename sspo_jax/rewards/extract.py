"""Final-answer extraction from a model response, in the Qwen2.5-Math style.

Rules, in order (the first that applies decides); each has a code, `Extraction.rule`:

1. `box`: the LAST `\\boxed` or `\\fbox` command in the response. `\\boxed{...}` takes the
   brace-matched group (`\\{` and `\\}` are literal braces, not grouping); `\\boxed 5` (no
   brace) takes the token after the space, up to whitespace or `$`. If that last box is never
   closed (the response was truncated inside it), there is no answer: earlier boxes are not
   consulted, because the model was still changing its final answer when it was cut off.
   - `final_phrase`: an explicit "final answer is" after that box closed, followed by a `$...$`
     span or a number, wins over it (the box was an intermediate result).
   - `boxes`: when the gold has several elements (a tuple, list or set) and the last box has
     one, the boxes on the last box's line are combined into one answer, in order and bracketed
     like the gold ("$\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$" for `\\{1,2,3\\}`).
2. `letter`: when the gold is a choice letter (A-E), the letter after "answer is" / "answer:" /
   "option" / "choice", or a last line that starts with one ("B. Because ...", "(C)"); no
   letter there means no answer.
3. `phrase`: the text after the last "final answer is" / "the answer is" / "answer:"
   (case-insensitive), up to the end of its line; a `$...$` span there is unwrapped, otherwise
   the text stops at the end of the sentence (". ").
4. `math_span` / `number`: the later of the last math span (`$...$`, `$$...$$`, `\\(...\\)`,
   `\\[...\\]`, taken whole, so `$x \\geq 5$` is the relation, not 5) and the last bare number
   outside it (`-1,234.5`, `3/4`; digits right after a letter, as in `AZYUK2A`, are no number).

Every step is linear in the response length: `rfind`, forward scans (a brace depth counter, no
recursion, so 10^5 nested braces are fine; one pass over the math delimiters) and regexes
without nested or unbounded adjacent quantifiers.
"""
from __future__ import annotations

import dataclasses
import re
import string

from sspo_jax.rewards.normalize import THOUSANDS_NUMBER

RULES = ("box", "final_phrase", "boxes", "letter", "phrase", "math_span", "number")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_PHRASES = ("final answer is", "the answer is", "answer:")
_BRACE_EVENTS = re.compile(r"\\[\s\S]|[{}]")  # an escaped pair (skipped) or a brace
_SPACES = re.compile(r"[ \t]*")
_BARE_TOKEN = re.compile(r"[^\s$]*")  # `\boxed 5`: up to whitespace or `$`
# ASCII-only lower-casing keeps every index in place (str.lower can change the length).
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_DIGITS = "0123456789"
_NUMBER_CHARS = _DIGITS + ",./"
# Thousands-grouped (no leading zero: `0,111` is two numbers) or plain integer, optional
# decimals, optional /denominator. No nested quantifiers, so matching is linear.
_NUMBER = re.compile(r"-?(?:[1-9]\d{0,2}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# A bare number: not glued to a letter before it (`AZYUK2A`, `x2`, `\\sqrt2`).
_BARE_NUMBER = re.compile(r"(?<![A-Za-z\d.,/])(?:" + _NUMBER.pattern + ")")
# Math delimiters, for the last closed span: an escaped `\\$` first so it is never a delimiter.
_MATH_DELIMS = re.compile(r"\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_CLOSES = {"$": "$", "$$": "$$", "\\(": "\\)", "\\[": "\\]"}
# A choice letter after an answer phrase ("the answer is (B)", "**Answer: C**", "option E").
# Bounded gaps, so a hostile run of spaces costs constant work per match attempt (linear).
_LETTER_PHRASE = re.compile(
    r"(?i:answer[ \t]{0,8}(?:is|:)|option|choice)[\s*:]{0,12}(?i:is[\s*:]{1,12})?"
    r"(?:\(([A-Ea-e])\)|([A-E]))(?![A-Za-z])")
_LETTER_LINE = re.compile(r"[\s*]*\(?([A-E])(?:[.)]|\)?\s*$)")
_MATH_OR_NUMBER_START = re.compile(r"\$|\\\(|\\\[|[-+]?\.?\d")
_CHOICE_GOLD = re.compile(r"\(([A-Ea-e])\)|([A-E])")  # a bare `e` is Euler's number


@dataclasses.dataclass(frozen=True)
class Extraction:
    """The answer read from a response (None when there is none) and the rule that read it."""
    answer: str | None
    rule: str | None


def _last_box_start(text: str) -> tuple[int, int]:
    """(position, command length) of the last `\\boxed`/`\\fbox`; position -1 when none."""
    best, length = -1, 0
    for command in _BOX_COMMANDS:
        pos = text.rfind(command)
        while pos != -1:
            # `\boxedfoo` is a different macro; accept `\boxed{`, `\boxed 5`, `\boxed` at the end.
            after = pos + len(command)
            if after >= len(text) or not text[after].isalpha():
                break
            pos = text.rfind(command, 0, pos)
        if pos > best:
            best, length = pos, len(command)
    return best, length


def _skip_spaces(text: str, i: int) -> int:
    return _SPACES.match(text, i).end()


def match_brace_group(text: str, open_pos: int) -> int:
    """Index just past the `}` closing the `{` at `open_pos`, or -1 if it is never closed.

    A backslash escapes the next character, so `\\{` and `\\}` do not count. Iterative, O(n),
    and the regex jumps straight from one brace or backslash to the next.
    """
    depth = 0
    for m in _BRACE_EVENTS.finditer(text, open_pos):
        token = m.group(0)
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return m.end()
    return -1


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed`/`\\fbox` in `text`; None when absent or unclosed."""
    pos, length = _last_box_start(text)
    if pos == -1:
        return None
    i = _skip_spaces(text, pos + length)
    n = len(text)
    if i < n and text[i] == "{":
        end = match_brace_group(text, i)
        return None if end == -1 else text[i + 1 : end - 1]
    return _BARE_TOKEN.match(text, i).group(0) or None  # `\boxed 5`


def _after_answer_phrase(text: str) -> str | None:
    """The rest of the line after the last "final answer is" / "the answer is" / "answer:";
    None if absent."""
    lowered = text.translate(_ASCII_LOWER)
    pos, phrase_len = -1, 0
    for phrase in _ANSWER_PHRASES:
        p = lowered.rfind(phrase)
        if p > pos:
            pos, phrase_len = p, len(phrase)
    return None if pos == -1 else _phrase_answer(text[pos + phrase_len:])


def _phrase_answer(rest: str) -> str | None:
    """The answer in the text right after an answer phrase: to the end of the line, `:` and
    markdown `**` dropped; the inside of a `$...$` span there, else up to the end of the
    sentence."""
    newline = rest.find("\n")
    if newline != -1:
        rest = rest[:newline]
    rest = rest.strip().lstrip(":*").strip()
    if rest.startswith("$"):
        # `$...$` or `$$...$$`: take the inside of the first math span.
        inner = rest.lstrip("$")
        close = inner.find("$")
        rest = inner if close == -1 else inner[:close]
    else:
        sentence_end = rest.find(". ")  # "The answer is 7. Next, ..." (a decimal point has no space)
        if sentence_end != -1:
            rest = rest[:sentence_end]
    rest = rest.strip().rstrip("*").rstrip(".").strip()
    return rest or None


def _final_answer_after_last_box(text: str) -> str | None:
    """An explicit "final answer is <math or number>" after the last box closed: the model's
    answer, not the earlier (intermediate) box ("... so \\boxed{255} ... The final answer is
    $10,455$"). Only the explicit phrase, and only with math or a number right after it (a `:`
    and markdown `**` allowed between), so prose like "\\boxed{5}. The final answer is correct
    since $3 \\cdot 4 = 12$." keeps the box."""
    pos = text.translate(_ASCII_LOWER).rfind("final answer is")
    start, length = _last_box_start(text)
    if pos == -1 or pos < start:
        return None
    j = _skip_spaces(text, start + length)
    if j < len(text) and text[j] == "{":
        end = match_brace_group(text, j)
    else:  # `\boxed 5`: the token after the space
        end = j + len(_BARE_TOKEN.match(text, j).group(0))
    if end == -1 or pos < end:
        return None
    after = text[pos + len("final answer is"):]
    if not _MATH_OR_NUMBER_START.match(after.split("\n", 1)[0].lstrip(" \t:*")):
        return None
    return _phrase_answer(after)


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands commas, decimals and a `/denominator` kept).

    Finds the last digit with `rfind` and the start of its run of number characters with
    `rstrip` (both in C), then runs the number regex on that tail only.
    """
    end = max(text.rfind(d) for d in _DIGITS) + 1
    if end == 0:
        return None
    start = len(text[:end].rstrip(_NUMBER_CHARS))
    tail = text[max(0, start - 1) : end]  # one more character for a minus sign
    last = None
    for m in _NUMBER.finditer(tail):
        last = m
    return None if last is None else last.group(0)


def has_box(text: str) -> bool:
    """Whether `text` contains a `\\boxed`/`\\fbox` command (closed or not)."""
    return _last_box_start(text)[0] != -1


def last_math_span(text: str) -> tuple[str, int] | None:
    """(content, end index) of the last closed math span (`$..$`, `$$..$$`, `\\(..\\)`,
    `\\[..\\]`); None when there is none. One forward pass over the delimiters."""
    opener, start, last = None, 0, None
    for m in _MATH_DELIMS.finditer(text):
        token = m.group(0)
        if token == "\\$":
            continue
        if opener is None:
            if token in _CLOSES:
                opener, start = token, m.end()
        elif token == _CLOSES[opener]:
            content = text[start:m.start()].strip()
            if content:
                last = (content, m.end())
            opener = None
    return last


def last_bare_number(text: str) -> str | None:
    """The last number in `text` that is not glued to a letter before it."""
    last = None
    for m in _BARE_NUMBER.finditer(text):
        last = m
    return None if last is None else last.group(0)


def top_level_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of each closed top-level `\\boxed{}`/`\\fbox{}`, in order. Linear:
    each command's next position is searched for only after the scan has passed it."""
    out, i, n = [], 0, len(text)
    next_pos = {command: text.find(command) for command in _BOX_COMMANDS}
    while True:
        for command in _BOX_COMMANDS:
            if next_pos[command] != -1 and next_pos[command] < i:
                next_pos[command] = text.find(command, i)
        found = [(p, c) for c, p in next_pos.items() if p != -1]
        if not found:
            return out
        pos, command = min(found)
        j = _skip_spaces(text, pos + len(command))
        if j < n and text[j] == "{":
            end = match_brace_group(text, j)
            if end == -1:
                return out
            out.append((pos, end, text[j + 1:end - 1].strip()))
            i = end
        else:
            i = pos + len(command)


def last_line_boxes(text: str) -> list[str]:
    """Contents of the last top-level box and of the boxes before it on the same line (one
    content when that line holds more than _MAX_COMBINED boxes: no answer is that long)."""
    start = _last_box_start(text)[0]
    if start == -1:
        return []
    line_start = text.rfind("\n", 0, start) + 1
    line = text[line_start:]
    if sum(line.count(c) for c in _BOX_COMMANDS) > _MAX_COMBINED:
        return []
    return [content for _, _, content in top_level_boxes(line)]


_MAX_COMBINED = 64


def _strip_outer(s: str) -> tuple[str, str, str]:
    """(opener, inside, closer) when one bracket pair encloses all of `s`, else ('', s, '')."""
    for left, right in (("\\{", "\\}"), ("(", ")"), ("[", "]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            inside = s[len(left):len(s) - len(right)]
            if _balanced(inside):
                return left, inside, right
    return "", s, ""


def _bracket_depths(s: str):
    """(character, bracket depth after it) along `s`: `([{` open, `)]}` close."""
    depth = 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        yield ch, depth


def _balanced(s: str) -> bool:
    depth = 0
    for _, depth in _bracket_depths(s):
        if depth < 0:
            return False
    return depth == 0


def has_several_elements(answer: str) -> bool:
    """A tuple, list or set: a comma at bracket depth 0 inside an optional outer bracket pair
    (`1, 2, 3`, `(1, 2)`, `\\{1,2,3\\}`), not a grouped number (`10,000`), not a union."""
    s = answer.strip().replace("{,}", "")
    if len(s) > _MAX_ELEMENTS_CHARS or "\\cup" in s or THOUSANDS_NUMBER.fullmatch(s):
        return False
    _, inside, _ = _strip_outer(s)
    return any(ch == "," and depth == 0 for ch, depth in _bracket_depths(inside))


_MAX_ELEMENTS_CHARS = 2_000  # longer answers are compared exactly anyway (MAX_ANSWER_CHARS)


def combine_like(gold: str, parts: list[str]) -> str:
    """Several answers as one, bracketed like the gold: `\\{a, b\\}`, `(a, b)`, or `a, b`."""
    left, _, right = _strip_outer(gold.strip())
    return left + ", ".join(parts) + right


def choice_letter_of(gold: str) -> str | None:
    """The letter of a multiple-choice gold (`B`, `(B)`, `\\text{(B)}`), else None."""
    g = gold.strip()
    for wrapper in ("\\text{", "\\textbf{", "\\mathrm{"):
        if g.startswith(wrapper) and g.endswith("}"):
            g = g[len(wrapper):-1].strip()
    m = _CHOICE_GOLD.fullmatch(g)
    return (m.group(1) or m.group(2)).upper() if m else None


def _choice_letter(text: str) -> str | None:
    last = None
    for m in _LETTER_PHRASE.finditer(text):
        last = m
    if last is not None:
        return (last.group(1) or last.group(2)).upper()
    lines = [line for line in text.rstrip().split("\n") if line.strip()]
    if lines:
        m = _LETTER_LINE.match(lines[-1])
        if m:
            return m.group(1)
    return None


def extract(text: str, gold: str | None = None) -> Extraction:
    """The final answer of a response and the rule that found it (module docstring). The gold
    (its answer text, `equivalence.gold_answer`) decides only whether several boxes combine and
    whether a choice letter is looked for. Never raises on a `str`."""
    if has_box(text):
        content = last_boxed_content(text)
        if content is None or not content.strip():
            return Extraction(None, None)
        later = _final_answer_after_last_box(text)
        if later is not None:
            return Extraction(later, "final_phrase")
        if (gold is not None and has_several_elements(gold)
                and not has_several_elements(content)):
            parts = last_line_boxes(text)
            if len(parts) >= 2:
                return Extraction(combine_like(gold, parts), "boxes")
        return Extraction(content.strip(), "box")
    if gold is not None and choice_letter_of(gold) is not None:
        # A choice question: a letter, or no answer (a value instead of a letter is no choice).
        letter = _choice_letter(text)
        return Extraction(letter, "letter" if letter is not None else None)
    phrase = _after_answer_phrase(text)
    if phrase is not None:
        return Extraction(phrase, "phrase")
    span = last_math_span(text)
    number = last_bare_number(text[span[1]:] if span else text)
    if number is not None:
        return Extraction(number, "number")
    if span is not None:
        return Extraction(span[0], "math_span")
    return Extraction(None, None)


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as raw text (not normalised); None when there is none.
    The gold-independent rules of `extract`."""
    return extract(text).answer


def count_boxes(text: str) -> int:
    """Number of closed top-level `\\boxed{}`/`\\fbox{}` groups (boxes nested inside one not counted)."""
    return len(top_level_boxes(text))
