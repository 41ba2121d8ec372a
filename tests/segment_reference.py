"""Plain Python statement of the subsentence rules (docs/algorithms.md, rl/math_boundaries.py),
one token at a time with the region state carried along: the reference the jitted tables are
tested against. It reads token texts only (each token decoded alone) and shares no code with
the project."""
DELIMITERS = (".", ",", ";", ":", "?", "!", "\n", "。", "，", "；", "：", "？", "！")
CLOSERS = ")]}"


def _letter(c):
    return len(c) == 1 and c.isascii() and c.isalpha()


def _digit(c):
    return len(c) == 1 and c in "0123456789"


def _kept_by_rule_3(c, before, after, decimal_guard):
    """A delimiter character that is not a boundary: a LaTeX space, a factorial, a ratio, an
    abbreviation dot, a decimal point."""
    if before.endswith("\\"):
        return True
    last = before[-1:]
    if c == "!" and (_letter(last) or _digit(last) or (last != "" and last in CLOSERS)):
        return True
    if c == ":" and _digit(last) and _digit(after):
        return True
    if c == "." and (_letter(after) or (len(before) >= 2 and before[-2] == "." and _letter(last))):
        return True
    return c == "." and decimal_guard and _digit(after)


class _Regions:
    """Open math regions: `$` parity, `\\(`/`\\[` state, the latest `\\boxed{` and its level."""

    def __init__(self):
        self.dollar = self.bracket = False
        self.level = 0
        self.boxed_level = None

    @property
    def open(self):
        return self.dollar or self.bracket or self.boxed_level is not None

    def read(self, text, prev, prev2):
        for j, c in enumerate(text):
            before = text[j - 1] if j else prev[-1:]
            if c == "$" and before not in ("$", "\\"):
                self.dollar = not self.dollar
            if before == "\\" and c in "([":
                self.bracket = True
            if before == "\\" and c in ")]":
                self.bracket = False
            if c in "{}" and before != "\\":
                if c == "{" and j == 0 and (prev.endswith("\\boxed")
                                            or (prev == "boxed" and prev2.endswith("\\"))):
                    self.boxed_level = self.level
                self.level += 1 if c == "{" else -1
        if self.boxed_level is not None and self.level <= self.boxed_level:
            self.boxed_level = None
        if "\n\n" in text:
            self.dollar = self.bracket = False
            self.boxed_level = None


def boundaries(texts, delimiters=DELIMITERS, *, protect_math=True, decimal_guard=True):
    """Whether each response token (its text; '' for special tokens) ends a subsentence."""
    out = []
    regions = _Regions()
    for t, text in enumerate(texts):
        prev = texts[t - 1] if t >= 1 else ""
        prev2 = texts[t - 2] if t >= 2 else ""
        nxt = texts[t + 1] if t + 1 < len(texts) else ""
        has_delim = any(d in text for d in delimiters)
        if not protect_math:
            guard = (decimal_guard and text.endswith(".")
                     and not any(d in text[:-1] for d in delimiters) and _digit(nxt[:1]))
            out.append(has_delim and not guard)
            continue
        math_before = regions.open
        regions.read(text, prev, prev2)
        inside = math_before and regions.open
        hard = "\n" in delimiters and "\n" in text
        prose = any(
            c in delimiters and c != "\n" and not _kept_by_rule_3(
                c, (prev + text[:j])[-2:], text[j + 1] if j + 1 < len(text) else nxt[:1],
                decimal_guard)
            for j, c in enumerate(text))
        out.append(has_delim and (hard or (prose and not inside)))
    if protect_math and len(texts) >= 2 and texts[-1] == "":
        out[-2] = False  # the trailing EOS joins the subsentence before it
    return out


def segment_ids(flags, min_tokens=1):
    """Ids from boundary flags: a boundary closing fewer than `min_tokens` tokens is dropped."""
    ids, current, count = [], 0, 0
    for flag in flags:
        ids.append(current)
        count += 1
        if flag and count >= min_tokens:
            current += 1
            count = 0
    return ids


def pieces(texts, flags):
    """The subsentences as strings."""
    out, cur = [], ""
    for text, flag in zip(texts, flags):
        cur += text
        if flag:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])
