"""Math-aware subsentence boundaries (`protect_math`): vocabulary tables plus a jit state pass.

A plain delimiter split cuts Qwen2.5-Math chains of thought inside formulas (`$(1,` | ` 6)$`),
factorials (`n!`), thin spaces (`\\,`), ratios (`3:4`) and abbreviations (`e.g.`). The rules
below keep such pieces whole. They are stated on token texts, each token decoded alone, with one
token of context either side (the text a rule looks at is the token's own text, the previous
token's last characters and the next token's first character):

1. Math regions: `$...$` and `$$...$$` (each maximal run of `$` not right after a `\\` or a `$`
   opens or closes one), `\\(...\\)` and `\\[...\\]` (the last of these four events decides),
   and `\\boxed{...}` (opened by a `{` token after `\\boxed`, closed once the unescaped brace
   level falls back to the level before that brace; the latest `\\boxed` counts). A token holding
   a blank line closes every region: LaTeX allows none inside math, and it bounds the damage of a
   stray `$` (a currency sign) to one paragraph.
2. A delimiter token that has math open both before and after it is not a boundary unless it
   holds a newline: inside math only a newline ends a subsentence. A token that opens or closes
   math (`)$.`, `$.`) is judged as prose.
3. A delimiter character is no boundary when it directly follows `\\` (`\\,` `\\;` `\\:` `\\!` are
   LaTeX spaces); an `!` after a letter, digit or `)]}` (a factorial); a `:` between digits (a
   ratio or a time); a `.` before a letter (`e.g`, `i.e`, `x.y`) or after `.` + letter (the last
   dot of `e.g.`); and, with the decimal guard, a `.` before a digit. A token is a boundary when
   any of its delimiter characters is one.
4. The last response token, when its text is empty (EOS or another special token), joins the
   subsentence before it instead of standing alone.

`MathTables.build` turns a vocabulary into the tables once (Python, `[V]`); `boundaries` runs
inside jit: one gather of a packed per-token word, shifts for the neighbours, a gather of rule 3
by neighbour class, and one `lax.scan` along T carrying the region state; no per-token Python.
The plain Python statement of the same rules, the tests' reference, is
`tests/segment_reference.py`; the rules and their measured effect are in docs/algorithms.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Context classes of a neighbour's text (see `_prev_class`, `_next_class`), with a text standing
# for each class when the per-token decision table is built.
# previous token ends with: other, backslash, digit, letter or closer, dot + letter, dot
PREV_CLASSES = (" ", "\\", "1", "a", ".g", ".")
NEXT_CLASSES = (" ", "1", "a")                     # other, digit, letter
_CLOSERS = ")]}"

# Bit layout of the packed per-token word (one gather per token instead of one per table).
_FIELDS = (  # (name, bits)
    ("end", 1), ("hard", 1), ("empty", 1), ("blank", 1),
    ("dollar_odd", 1), ("starts_dollar", 1), ("ends_dollar_or_bs", 1), ("ends_bs", 1),
    ("starts_open", 1), ("starts_close", 1), ("ends_boxed_cmd", 1), ("boxed_word", 1),
    ("own_event", 2), ("first_event", 2), ("prev_class", 3), ("next_class", 2), ("brace", 8),
)


def _layout(fields):
    """{name: (shift, bits)} of consecutive bit fields in an int32."""
    out, offset = {}, 0
    for name, bits in fields:
        out[name] = (offset, bits)
        offset += bits
    assert offset <= 31, fields
    return out


_SHIFT = _layout(_FIELDS)
_BRACE_BIAS = 127  # brace delta stored as delta + bias in 8 bits


def _ascii_letter(c: str) -> bool:
    return len(c) == 1 and c.isascii() and c.isalpha()


def _ascii_digit(c: str) -> bool:
    return len(c) == 1 and c in "0123456789"


def _prev_class(text: str) -> int:
    """Class of a token's text as the previous token: what rule 3 may read of its last chars."""
    last = text[-1:]
    if last == "\\":
        return 1
    if _ascii_digit(last):
        return 2
    if _ascii_letter(last):
        return 4 if text[-2:-1] == "." else 3
    if last and last in _CLOSERS:
        return 3
    if last == ".":
        return 5
    return 0


def _next_class(text: str) -> int:
    first = text[:1]
    return 1 if _ascii_digit(first) else 2 if _ascii_letter(first) else 0


def char_protected(c: str, before: str, after: str, decimal_guard: bool) -> bool:
    """Rule 3 for one delimiter character `c`: `before` its (up to) two preceding characters,
    `after` the next one ('' where none)."""
    prev = before[-1:]
    if prev == "\\":
        return True
    if c == "!" and (prev.isascii() and prev.isalnum() or (prev != "" and prev in _CLOSERS)):
        return True
    if c == ":" and _ascii_digit(prev) and _ascii_digit(after):
        return True
    if c == ".":
        if _ascii_letter(after):
            return True
        if len(before) == 2 and before[0] == "." and _ascii_letter(before[1]):
            return True
        if decimal_guard and _ascii_digit(after):
            return True
    return False


def _open_delimiters(text, prev, nxt, delimiters, decimal_guard) -> bool:
    """True when some non-newline delimiter character of `text` is a boundary under rule 3, the
    previous token's text being `prev` and the next token's `nxt`."""
    for j, c in enumerate(text):
        if c == "\n" or c not in delimiters:
            continue
        before = (prev + text[:j])[-2:]
        after = text[j + 1] if j + 1 < len(text) else nxt[:1]
        if not char_protected(c, before, after, decimal_guard):
            return True
    return False


def _dollar_runs(text: str) -> int:
    return sum(1 for j, c in enumerate(text) if c == "$" and (j == 0 or text[j - 1] not in "$\\"))


def _brace_delta(text: str) -> int:
    return sum((c == "{") - (c == "}") for j, c in enumerate(text)
               if c in "{}" and (j == 0 or text[j - 1] != "\\"))


def _own_event(text: str) -> int:
    """The last `\\(`/`\\[` (1) or `\\)`/`\\]` (2) inside the token's own text; 0 if none."""
    event = 0
    for j in range(1, len(text)):
        if text[j - 1] == "\\" and text[j] in "([)]":
            event = 1 if text[j] in "([" else 2
    return event


def _first_event(text: str) -> int:
    """The event the first character makes when the previous token ends with `\\`."""
    return 1 if text[:1] in ("(", "[") else 2 if text[:1] in (")", "]") else 0


@struct.dataclass
class MathTables:
    """`word [V+1]` int32 (the packed facts of each token; row V stands for no token) and
    `open_delims [(V+1) * 6 * 3]` bool (rule 3 per previous/next context class). A pytree, so it
    passes into jit as two arrays."""
    word: np.ndarray
    open_delims: np.ndarray

    @classmethod
    def build(cls, texts, delimiters, decimal_guard: bool = True) -> "MathTables":
        """From every token id's text decoded alone ('' for special tokens)."""
        delimiters = tuple(delimiters)
        newline_ends = "\n" in delimiters
        V = len(texts)
        word = np.zeros(V + 1, np.int64)
        open_delims = np.zeros((V + 1, len(PREV_CLASSES), len(NEXT_CLASSES)), bool)
        for i, s in enumerate(texts):
            end = any(d in s for d in delimiters)
            delta = _brace_delta(s)
            if abs(delta) > _BRACE_BIAS - 1:  # one more for an escape seen from the neighbour
                raise ValueError(f"token {i} {s!r} changes the brace level by {delta}; "
                                 f"the packed table holds at most {_BRACE_BIAS - 1}")
            facts = dict(
                end=end, hard=newline_ends and "\n" in s, empty=s == "", blank="\n\n" in s,
                dollar_odd=_dollar_runs(s) % 2, starts_dollar=s[:1] == "$",
                ends_dollar_or_bs=s[-1:] in ("$", "\\"), ends_bs=s[-1:] == "\\",
                starts_open=s[:1] == "{", starts_close=s[:1] == "}",
                ends_boxed_cmd=s.endswith("\\boxed"), boxed_word=s == "boxed",
                own_event=_own_event(s), first_event=_first_event(s),
                prev_class=_prev_class(s), next_class=_next_class(s), brace=delta + _BRACE_BIAS)
            word[i] = _pack(facts)
            if end:
                for p, prev in enumerate(PREV_CLASSES):
                    for n, nxt in enumerate(NEXT_CLASSES):
                        open_delims[i, p, n] = _open_delimiters(s, prev, nxt, delimiters,
                                                                decimal_guard)
        word[V] = _NO_TOKEN
        return cls(word.astype(np.int32), open_delims.reshape(-1))


def _pack(facts: dict) -> int:
    value = 0
    for name, v in facts.items():
        shift, bits = _SHIFT[name]
        value |= (int(v) & ((1 << bits) - 1)) << shift
    return value


_NO_TOKEN = _pack(dict(empty=True, brace=_BRACE_BIAS))


def _field(word, name):
    shift, bits = _SHIFT[name]
    return (word >> shift) & ((1 << bits) - 1)


def _flag(word, name):
    return _field(word, name) == 1


def _shift_right(x, fill):
    return jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)


def _shift_left(x, fill):
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


_NO_BOX = -(1 << 30)  # the level of "no \\boxed open"


# What one token does, packed into an int32 for the scan: (name, bits).
_STEP_FIELDS = (("dollar", 1), ("event", 2), ("opens", 1), ("reset", 1), ("candidate", 1),
                ("hard", 1), ("mask", 1), ("brace", 8))
_STEP_SHIFT = _layout(_STEP_FIELDS)
_STEP_BRACE_BIAS = 127


def _step_code(word, prev_word, prev2_word, candidate, hard, mask):
    """`[B, T]` int32: per token its `$`-run parity, `\\(`..`\\]` event (0 none, 1 open,
    2 close), whether it opens `\\boxed`, holds a blank line, is a rule-3 candidate, holds a
    newline, is a response token, and its brace-level change. The neighbour corrections: a first
    `$` right after `$` or `\\` starts no run; a first brace right after `\\` is escaped."""
    ends_bs_prev = _flag(prev_word, "ends_bs")
    dollar = _flag(word, "dollar_odd") ^ (_flag(word, "starts_dollar")
                                          & _flag(prev_word, "ends_dollar_or_bs"))
    own = _field(word, "own_event")
    event = jnp.where(own > 0, own, jnp.where(ends_bs_prev, _field(word, "first_event"), 0))
    brace = (_field(word, "brace") - _BRACE_BIAS
             - (_flag(word, "starts_open") & ends_bs_prev).astype(jnp.int32)
             + (_flag(word, "starts_close") & ends_bs_prev).astype(jnp.int32))
    opens = _flag(word, "starts_open") & (
        _flag(prev_word, "ends_boxed_cmd")
        | (_flag(prev_word, "boxed_word") & _flag(prev2_word, "ends_bs")))
    parts = dict(dollar=dollar, event=event, opens=opens, reset=_flag(word, "blank"),
                 candidate=candidate, hard=hard, mask=mask, brace=brace + _STEP_BRACE_BIAS)
    code = jnp.zeros(word.shape, jnp.int32)
    for name, value in parts.items():
        code = code | (value.astype(jnp.int32) << _STEP_SHIFT[name][0])
    return code


def _scan_regions(code, min_tokens: int):
    """The region state carried along T, and with it rule 2 and the `min_tokens` merge.

    Returns `[B, T]` bool, the kept boundaries, and `[B, T]` bool, math open before and after
    the token. The state is three `[B]` int32: flags (`$` open, `\\(`/`\\[` open, math open
    after the previous token) with the tokens since the last kept boundary above them, the brace
    level, and the level of the open `\\boxed`. A sequential scan is the cheapest form found on
    CPU (parallel prefix forms need four cumulative scans and measured slower; so did unrolling,
    a fourth carry or a stacked carry, which XLA does not fuse as well); on an accelerator it
    costs some milliseconds once per rollout batch.
    """
    def token(state, c):
        flags, level, box = state  # flags: 3 bits, then the count (one carry less is faster)
        f = {name: (c >> shift) & ((1 << bits) - 1) for name, (shift, bits) in _STEP_SHIFT.items()}
        keep_state = 1 - f["reset"]
        dollar = ((flags & 1) ^ f["dollar"]) & keep_state
        bracket = jnp.where(f["event"] == 1, 1, jnp.where(f["event"] == 2, 0, (flags >> 1) & 1))
        bracket = bracket & keep_state
        box = jnp.where(f["opens"] == 1, level, box)
        level = level + f["brace"] - _STEP_BRACE_BIAS
        box = jnp.where((level <= box) | (keep_state == 0), _NO_BOX, box)
        inside = dollar | bracket | (box != _NO_BOX).astype(jnp.int32)
        interior = (flags >> 2) & inside
        boundary = f["mask"] & (f["hard"] | (f["candidate"] & (1 - interior)))
        count = (flags >> 3) + f["mask"]
        keep = boundary & (count >= min_tokens).astype(jnp.int32)
        count = jnp.where(keep == 1, 0, count)
        flags = dollar | (bracket << 1) | (inside << 2) | (count << 3)
        return (flags, level, box), (keep | (interior << 1)).astype(jnp.int8)

    zero = jnp.zeros(code.shape[0], jnp.int32)
    _, out = jax.lax.scan(token, (zero, zero, zero + _NO_BOX), code.T)
    return (out.T & 1) == 1, (out.T & 2) == 2


def boundaries(tokens, mask, tables: MathTables, min_tokens: int = 1):
    """`[B, T]` bool: the tokens that end a subsentence under rules 1-4 (mask applied), a
    boundary that would close fewer than `min_tokens` response tokens dropped."""
    return _boundaries_and_interior(tokens, mask, tables, min_tokens)[0]


def math_interior(tokens, mask, tables: MathTables):
    """`[B, T]` bool: math is open before and after the token (where rule 2 applies)."""
    return _boundaries_and_interior(tokens, mask, tables, 1)[1] & jnp.asarray(mask).astype(bool)


def _boundaries_and_interior(tokens, mask, tables, min_tokens):
    mask = jnp.asarray(mask).astype(bool)
    V = tables.word.shape[0] - 1
    tok = jnp.where(mask, jnp.asarray(tokens).astype(jnp.int32), V)
    word = jnp.asarray(tables.word)[tok]
    none = _NO_TOKEN
    prev_word = _shift_right(word, none)
    next_word = _shift_left(word, none)
    ctx = (tok * len(PREV_CLASSES) + _field(prev_word, "prev_class")) * len(NEXT_CLASSES) \
        + _field(next_word, "next_class")
    end = _flag(word, "end")
    # Rule 4: the next token is the row's last response token and has no text.
    next_mask = _shift_left(mask, False)
    eos_joins = next_mask & ~_shift_left(next_mask, False) & _flag(next_word, "empty")
    candidate = end & jnp.asarray(tables.open_delims)[ctx] & ~eos_joins
    hard = end & _flag(word, "hard") & ~eos_joins
    code = _step_code(word, prev_word, _shift_right(prev_word, none), candidate, hard, mask)
    return _scan_regions(code, int(min_tokens))
