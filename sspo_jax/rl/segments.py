"""Subsentences: which vocabulary tokens end one, and segment ids per response token.

Two halves with different lives:
- `ends_table` / `decimal_guard_tables` run once, in Python, over a tokenizer's vocabulary and
  return NumPy `[V]` bool tables.
- `segment_ids` runs inside jit on `[B, T]` token arrays and those tables.

How a token's text is found: every id is decoded *alone* (`skip_special_tokens=True`, so EOS and
other special tokens never end a subsentence). For byte-level BPE a token may hold an incomplete
UTF-8 sequence; decoding replaces the incomplete bytes with U+FFFD, so a token still counts when
it holds a whole delimiter next to partial bytes, and a multi-byte delimiter (e.g. the full-width
`。`) that the tokenizer splits over several tokens is not detected. Byte-fallback pieces such as
`<0x2E>` decode to their byte, so a fallback `.` counts. Real tokenizers keep ASCII punctuation
and the common full-width marks as whole tokens, so this is a corner case, documented rather than
guessed at.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sspo_jax.rl import math_boundaries
from sspo_jax.rl.math_boundaries import MathTables

# The spec's default set: ASCII . , ; : ? ! and newline, and their full-width forms.
DEFAULT_DELIMITERS: tuple[str, ...] = (
    ".", ",", ";", ":", "?", "!", "\n", "。", "，", "；", "：", "？", "！")


def _vocab_texts(tokenizer, vocab_size: int | None) -> list[str]:
    """Decoded text of every token id alone; '' for special tokens and ids past the tokenizer."""
    if hasattr(tokenizer, "get_vocab_size"):  # a raw `tokenizers.Tokenizer`
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
    elif hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
    else:
        raise TypeError(
            f"ends_table needs a Hugging Face tokenizer (transformers or tokenizers), got "
            f"{type(tokenizer).__name__}; load one with AutoTokenizer.from_pretrained(...).")
    size = n if vocab_size is None else vocab_size
    if size < n:
        raise ValueError(
            f"vocab_size={size} is smaller than the tokenizer's {n} tokens; pass the model's "
            f"vocab_size (embedding rows), which is >= the tokenizer size.")
    # Models often have more embedding rows than tokens (Qwen2.5: 151936 vs 151665): pad with ''.
    return list(texts) + [""] * (size - n)


def ends_table(tokenizer, delimiters=DEFAULT_DELIMITERS, vocab_size: int | None = None) -> np.ndarray:
    """`[V]` bool: True where the token's decoded text contains any delimiter.

    `vocab_size` pads the table with False up to the model's embedding size so token ids the
    tokenizer never produces still index safely inside jit.
    """
    delimiters = tuple(delimiters)
    if not delimiters or any(not isinstance(d, str) or not d for d in delimiters):
        raise ValueError(f"delimiters must be non-empty strings, got {delimiters!r}")
    texts = _vocab_texts(tokenizer, vocab_size)
    return np.array([any(d in t for d in delimiters) for t in texts], dtype=bool)


def decimal_guard_tables(tokenizer, delimiters=DEFAULT_DELIMITERS,
                         vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(dot_end [V], digit_start [V])` bool tables for the decimal-point guard.

    dot_end: the text ends with '.' and holds no other delimiter, so the '.' is its only reason
    to end a subsentence (a token like '.\\n' is a real end whatever follows).
    digit_start: the text starts with a decimal digit (no leading space: "3. 5" is two numbers).
    """
    texts = _vocab_texts(tokenizer, vocab_size)
    others = tuple(delimiters)
    dot_end = np.array([t.endswith(".") and not any(d in t[:-1] for d in others) for t in texts],
                       dtype=bool)
    digit_start = np.array([t[:1].isdecimal() for t in texts], dtype=bool)
    return dot_end, digit_start


def math_tables(tokenizer, delimiters=DEFAULT_DELIMITERS, vocab_size: int | None = None,
                decimal_guard: bool = True) -> MathTables:
    """The `protect_math` rules' tables (`math_boundaries.py`) for a tokenizer's vocabulary; the
    decimal guard is one of their rules."""
    delimiters = tuple(delimiters)
    if not delimiters or any(not isinstance(d, str) or not d for d in delimiters):
        raise ValueError(f"delimiters must be non-empty strings, got {delimiters!r}")
    if any(len(d) != 1 for d in delimiters):
        raise ValueError(f"protect_math reads delimiters character by character; "
                         f"{[d for d in delimiters if len(d) != 1]} are longer: use single "
                         f"characters, or loss.protect_math=False for the plain table")
    return MathTables.build(_vocab_texts(tokenizer, vocab_size), delimiters, decimal_guard)


def segment_ids(tokens, mask, table, *, dot_end=None, digit_start=None,
                min_subsentence_tokens: int = 1):
    """Segment id per response token, `[B, T]` int32, unique across the batch.

    tokens, mask: `[B, T]` (mask 1 on response tokens, EOS included). table: `[V]` bool from
    `ends_table` (plain delimiter rules), or a `MathTables` from `math_tables` (the
    `protect_math` rules, decimal guard included), covering every id the model can emit (pass
    the model's `vocab_size` there). A masked token that ends a subsentence closes it; the id
    of token t in row i is `i * T + (number of kept boundaries strictly before t)`, so ids are
    < B*T, the static `num_segments` for `jax.ops.segment_sum`. Masked tokens get ids too;
    every consumer weights them by the mask.

    Decimal guard (on when both `dot_end` and `digit_start` are given): a `dot_end` token whose
    next token is a masked `digit_start` token is not a boundary ("3.14").
    `min_subsentence_tokens`: a boundary that would close a subsentence of fewer tokens is
    ignored, and its tokens join the next subsentence (1 = off).
    """
    if (dot_end is None) != (digit_start is None):
        raise ValueError("the decimal guard needs both dot_end and digit_start "
                         "(from decimal_guard_tables), or neither to switch it off")
    if int(min_subsentence_tokens) < 1:
        raise ValueError(f"min_subsentence_tokens must be >= 1, got {min_subsentence_tokens}")
    tokens = jnp.asarray(tokens)
    mask = jnp.asarray(mask).astype(bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens and mask must both be [B, T], got {tokens.shape} and {mask.shape}")
    B, T = tokens.shape
    if isinstance(table, MathTables):  # the merge of short pieces rides in its scan
        if dot_end is not None:
            raise ValueError("the protect_math tables hold the decimal guard already; "
                             "pass dot_end/digit_start only with a plain ends_table")
        boundary = math_boundaries.boundaries(tokens, mask, table, int(min_subsentence_tokens))
    else:
        boundary = jnp.asarray(table, bool)[tokens] & mask                      # [B, T]
        if dot_end is not None:
            next_digit = jnp.asarray(digit_start, bool)[tokens[:, 1:]] & mask[:, 1:]
            next_digit = jnp.pad(next_digit, ((0, 0), (0, 1)))               # [B, T]
            boundary &= ~(jnp.asarray(dot_end, bool)[tokens] & next_digit)
        if min_subsentence_tokens > 1:
            boundary = _drop_short(boundary, mask, int(min_subsentence_tokens))
    before = jnp.cumsum(boundary, axis=1, dtype=jnp.int32) - boundary.astype(jnp.int32)
    return before + (jnp.arange(B, dtype=jnp.int32) * T)[:, None]


def _drop_short(boundary, mask, min_tokens: int):
    """Keep a boundary only when the subsentence it closes has >= min_tokens masked tokens.

    Sequential by nature (whether a boundary survives depends on the last kept one), so a scan
    over T with a `[B]` running count; only traced when the knob is on.
    """
    def step(count, bm):  # count: [B] masked tokens since the last kept boundary
        b, m = bm
        count = count + m.astype(jnp.int32)
        keep = b & (count >= min_tokens)
        return jnp.where(keep, 0, count), keep

    count0 = jnp.zeros(boundary.shape[0], jnp.int32)
    _, kept = jax.lax.scan(step, count0, (boundary.T, mask.T))
    return kept.T
