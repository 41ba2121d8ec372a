"""Math-aware subsentence boundaries (`protect_math`) with the real Qwen2.5 tokenizer: the jitted
tables against the plain Python reference (tests/segment_reference.py) on 32 Qwen2.5-Math style
solutions, and each rule on the text that motivated it."""
import json
import os

import jax
import numpy as np
import pytest
import segment_reference as ref

from sspo_jax.rl import segments

HERE = os.path.dirname(__file__)
ROWS = 151936  # the model's embedding rows (Qwen2.5-Math), > the tokenizer's 151,665


@pytest.fixture(scope="module")
def tables(qwen25_tokenizer):
    tok = qwen25_tokenizer
    return {
        "on": segments.math_tables(tok, vocab_size=ROWS),
        "on_no_guard": segments.math_tables(tok, vocab_size=ROWS, decimal_guard=False),
        "off": dict(zip(("dot_end", "digit_start"),
                        segments.decimal_guard_tables(tok, vocab_size=ROWS))),
        "ends": segments.ends_table(tok, vocab_size=ROWS),
    }


@pytest.fixture(scope="module")
def solutions(qwen25_tokenizer):
    with open(os.path.join(HERE, "data", "qwen_math_solutions.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    eos = qwen25_tokenizer.eos_token_id
    return [qwen25_tokenizer(r["response"], add_special_tokens=False).input_ids + [eos]
            for r in rows]


def batch(rows, pad=3):
    T = max(map(len, rows)) + pad
    tokens = np.full((len(rows), T), 7, np.int32)   # padding ids are never read as text
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, True
    return tokens, mask


def ids_for(tables, kind, tokens, mask, min_tokens):
    if kind == "off":
        kw = dict(table=tables["ends"], **tables["off"])
    else:
        kw = dict(table=tables[kind])
    fn = jax.jit(lambda t, m: segments.segment_ids(t, m, min_subsentence_tokens=min_tokens, **kw))
    return np.asarray(fn(tokens, mask))


@pytest.mark.parametrize("kind", ["on", "on_no_guard", "off"])
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_solutions_match_the_reference(qwen25_tokenizer, tables, solutions, kind, min_tokens):
    assert len(solutions) >= 30
    tokens, mask = batch(solutions)
    got = ids_for(tables, kind, tokens, mask, min_tokens)
    T = tokens.shape[1]
    for i, row in enumerate(solutions):
        texts = [qwen25_tokenizer.decode([t], skip_special_tokens=True) for t in row]
        flags = ref.boundaries(texts, protect_math=kind != "off", decimal_guard=kind != "on_no_guard")
        want = np.array(ref.segment_ids(flags, min_tokens)) + i * T
        np.testing.assert_array_equal(got[i, :len(row)], want, err_msg=f"solution {i}")


def test_protection_changes_real_boundaries(qwen25_tokenizer, tables, solutions):
    """The rules bite on these solutions: fewer, longer pieces, none cut inside math."""
    tokens, mask = batch(solutions)
    counts = {}
    for kind in ("on", "off"):
        seg = ids_for(tables, kind, tokens, mask, 1)
        counts[kind] = sum(len(np.unique(seg[i][mask[i]])) for i in range(len(solutions)))
    assert counts["on"] < 0.9 * counts["off"]


def pieces(tok, tables, text, *, protect=True, eos=True, min_tokens=1):
    ids = tok(text, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
    tokens, mask = batch([ids])
    seg = ids_for(tables, "on" if protect else "off", tokens, mask, min_tokens)[0][:len(ids)]
    return [tok.decode(np.array(ids)[seg == k].tolist()) for k in np.unique(seg)]


@pytest.mark.parametrize("text, want", [
    # Inside $...$, \(...\), \[...\] and \boxed{...} only a newline ends a subsentence.
    ("The pairs are $(1, 6)$ and $(2, 3)$. Next", ["The pairs are $(1, 6)$ and $(2, 3)$.", " Next"]),
    ("So \\(x, y\\) work, done", ["So \\(x, y\\) work,", " done"]),
    ("The answer is \\boxed{(-\\infty, -2) \\cup [1, \\infty)}. Done",
     ["The answer is \\boxed{(-\\infty, -2) \\cup [1, \\infty)}.", " Done"]),
    ("Then \\boxed{\\frac{a,b}{2}}, so", ["Then \\boxed{\\frac{a,b}{2}},", " so"]),
    ("\\[\nx = 1, y = 2.\n\\]\nSo", ["\\[\n", "x = 1, y = 2.\n", "\\]\n", "So"]),
    ("$$\nx = 1, y = 2\n$$\nSo", ["$$\n", "x = 1, y = 2\n", "$$\n", "So"]),
    # Factorials, LaTeX spaces, ratios and times, abbreviations.
    ("There are 5! ways, so", ["There are 5! ways,", " so"]),
    ("It is n! over k!(n-k)! here", ["It is n! over k!(n-k)! here"]),
    ("Pay 10\\,000 now", ["Pay 10\\,000 now"]),
    ("Mix 3:4 at 12:30 today", ["Mix 3:4 at 12:30 today"]),
    ("Some, e.g., this one", ["Some,", " e.g.,", " this one"]),
    ("That is, i.e. the sum", ["That is,", " i.e. the sum"]),
    # A stray $ (a price) is closed by the next blank line, not carried to the end.
    ("It costs $5, so.\n\nThen a, b", ["It costs $5, so.\n\n", "Then a,", " b"]),
])
def test_each_rule(qwen25_tokenizer, tables, text, want):
    got = pieces(qwen25_tokenizer, tables, text, eos=False)
    assert got == want


def test_rules_off_split_as_before(qwen25_tokenizer, tables):
    tok = qwen25_tokenizer
    assert pieces(tok, tables, "The pair $(1, 6)$ works", protect=False, eos=False) == [
        "The pair $(1,", " 6)$ works"]
    assert pieces(tok, tables, "There are 5! ways", protect=False, eos=False) == [
        "There are 5!", " ways"]


def test_trailing_eos_joins_the_last_subsentence(qwen25_tokenizer, tables):
    tok = qwen25_tokenizer
    assert pieces(tok, tables, "So x = 2.") == ["So x = 2.<|im_end|>"]
    assert pieces(tok, tables, "So x = 2.", protect=False) == ["So x = 2.", "<|im_end|>"]
    # A truncated response (no EOS) keeps its last boundary.
    assert pieces(tok, tables, "So x = 2. Then", eos=False) == ["So x = 2.", " Then"]


def test_short_pieces_merge_into_the_next(qwen25_tokenizer, tables):
    tok = qwen25_tokenizer
    text = "1. **Add:**\nSo $x = 1$.\n"
    assert pieces(tok, tables, text, eos=False) == ["1.", " **Add:", "**\n", "So $x = 1$.\n"]
    assert pieces(tok, tables, text, eos=False, min_tokens=3) == [
        "1. **Add:", "**\nSo $x = 1$.\n"]


def test_table_errors(qwen25_tokenizer, tables):
    tokens, mask = np.zeros((1, 4), np.int32), np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="decimal guard already"):
        segments.segment_ids(tokens, mask, tables["on"], **tables["off"])
    with pytest.raises(ValueError, match="non-empty strings"):
        segments.math_tables(qwen25_tokenizer, delimiters=(".", ""))
    with pytest.raises(ValueError, match=r"character by character; \['\.\.\.'\]"):
        segments.math_tables(qwen25_tokenizer, delimiters=(".", "..."))


def test_tokens_with_many_braces_are_counted():
    """A code-like vocabulary: a token closing eight groups at once still returns the level."""
    from sspo_jax.rl import math_boundaries
    texts = ["", "x", ",", "\\", "boxed", "{", "{{{{{{{{", "}}}}}}}}", "}", "."]
    tables = math_boundaries.MathTables.build(texts, (",", "."))
    # \boxed{ {{{{{{{{ x , }}}}}}}} } , x  -> the first comma is inside the box, the last is not
    row = [3, 4, 5, 6, 1, 2, 7, 8, 2, 1]
    b = np.asarray(math_boundaries.boundaries(np.array([row]), np.ones((1, len(row)), bool), tables))
    assert b[0].tolist() == [False] * 8 + [True, False]
