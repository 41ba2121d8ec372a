"""Final-answer extraction from a model response, in the Qwen2.5-Math style.

Rules, in order (the first that applies decides):

1. The LAST `\\boxed` or `\\fbox` command in the response. `\\boxed{...}` takes the brace-matched
   group (`\\{` and `\\}` are literal braces, not grouping); `\\boxed 5` (no brace) takes the
   token after the space, up to whitespace or `$`. If that last box is never closed (the response
   was truncated inside it), there is no answer: earlier boxes are not consulted, because the
   model was still changing its final answer when it was cut off. An explicit "final answer
   is" after that box closed, followed by a `$...$` span or a number, wins over it (the box was
   an intermediate result).
2. Otherwise the text after the last "final answer is" / "the answer is" (case-insensitive), up
   to the end of its line; a `$...$` span there is unwrapped, otherwise the text stops at the
   end of the sentence (". ").
3. Otherwise the last number in the response (`-1,234.5`, `3/4`).

Every step is linear in the response length: `rfind`, one forward scan with a depth counter (no
recursion, so 10^5 nested braces are fine) and regexes without nested quantifiers.
"""
from __future__ import annotations

import re
import string

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_PHRASES = ("final answer is", "the answer is")
_BRACE_EVENTS = re.compile(r"\\[\s\S]|[{}]")  # an escaped pair (skipped) or a brace
_SPACES = re.compile(r"[ \t]*")
_BARE_TOKEN = re.compile(r"[^\s$]*")  # `\boxed 5`: up to whitespace or `$`
# ASCII-only lower-casing keeps every index in place (str.lower can change the length).
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_DIGITS = "0123456789"
_NUMBER_CHARS = _DIGITS + ",./"
# Thousands-grouped or plain integer, optional decimals, optional /denominator. No nested
# quantifiers, so matching is linear.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


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
    """The rest of the line after the last "final answer is" / "the answer is"; None if absent."""
    lowered = text.translate(_ASCII_LOWER)
    pos, phrase_len = -1, 0
    for phrase in _ANSWER_PHRASES:
        p = lowered.rfind(phrase)
        if p > pos:
            pos, phrase_len = p, len(phrase)
    if pos == -1:
        return None
    rest = text[pos + phrase_len :]
    newline = rest.find("\n")
    if newline != -1:
        rest = rest[:newline]
    rest = rest.strip().lstrip(":").strip()
    if rest.startswith("$"):
        # `$...$` or `$$...$$`: take the inside of the first math span.
        inner = rest.lstrip("$")
        close = inner.find("$")
        rest = inner if close == -1 else inner[:close]
    else:
        sentence_end = rest.find(". ")  # "The answer is 7. Next, ..." (a decimal point has no space)
        if sentence_end != -1:
            rest = rest[:sentence_end]
    rest = rest.strip().rstrip(".").strip()
    return rest or None


def _final_answer_after_last_box(text: str) -> str | None:
    """An explicit "final answer is <math or number>" after the last box closed: the model's
    answer, not the earlier (intermediate) box ("... so \\boxed{255} ... The final answer is
    $10,455$"). Only the explicit phrase, and only with a `$...$` span or a digit after it, so
    prose like "\\boxed{5}. The final answer is correct." keeps the box."""
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
    tail = text[pos:]
    answer = _after_answer_phrase(tail)
    line = tail[len("final answer is"):].split("\n", 1)[0].strip().lstrip(":").strip()
    if answer is None or not (line.startswith("$") or any(d in answer for d in _DIGITS)):
        return None
    return answer


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


def extract_answer(text: str) -> str | None:
    """The final answer of a response, as raw text (not normalised); None when there is none.

    See the module docstring for the rules. Never raises on a `str`.
    """
    if has_box(text):
        content = last_boxed_content(text)
        if content is None or not content.strip():
            return None
        later = _final_answer_after_last_box(text)
        return later if later is not None else content.strip()
    phrase = _after_answer_phrase(text)
    if phrase is not None:
        return phrase
    return last_number(text)


def count_boxes(text: str) -> int:
    """Number of closed top-level `\\boxed{}`/`\\fbox{}` groups (boxes nested inside one not counted).

    Linear: each command's next position is searched for only after the scan has passed it.
    """
    count, i, n = 0, 0, len(text)
    next_pos = {command: text.find(command) for command in _BOX_COMMANDS}
    while True:
        for command in _BOX_COMMANDS:
            if next_pos[command] != -1 and next_pos[command] < i:
                next_pos[command] = text.find(command, i)
        found = [(p, c) for c, p in next_pos.items() if p != -1]
        if not found:
            return count
        pos, command = min(found)
        j = _skip_spaces(text, pos + len(command))
        if j < n and text[j] == "{":
            end = match_brace_group(text, j)
            if end == -1:
                return count
            count += 1
            i = end
        else:
            i = pos + len(command)
