"""Unit tests of extraction, normalisation, numeric equivalence and the shaping terms (no pool)."""
import subprocess
import sys
from fractions import Fraction

import pytest

from sspo_jax.rewards import (
    GradeResult,
    answers_equivalent,
    combine_rewards,
    shaped_rewards,
    comparison_key,
    extract_answer,
    format_reward,
    last_boxed_content,
    normalize_answer,
    overlong_penalty,
    reason_counts,
)
from sspo_jax.rewards.equivalence import clean_text, gold_answer, numeric_equal, parse_number
from sspo_jax.rewards.extract import count_boxes, has_box, last_number, match_brace_group
from sspo_jax.rewards.normalize import unwrap_commands, word_to_number


def test_brace_matching_skips_escaped_braces():
    s = r"{a\{b\}{c}}d"
    assert match_brace_group(s, 0) == len(s) - 1
    assert match_brace_group("{{}", 0) == -1
    assert last_boxed_content(r"\boxed{\{1,2\}} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed_content(r"\boxed {8}") == "8"
    assert last_boxed_content(r"\boxed 5$ and more") == "5"
    assert last_boxed_content(r"\boxedfoo{3}") is None  # another macro, not a box
    assert not has_box(r"\boxedfoo{3}") and has_box(r"\fbox{")


def test_extraction_is_iterative_on_deep_and_huge_inputs():
    depth = 10**5
    nested = r"\boxed{" + "{" * depth + "7" + "}" * depth + "}"
    assert extract_answer(nested) == "{" * depth + "7" + "}" * depth  # no RecursionError
    assert extract_answer(r"\boxed{" + "{" * depth) is None  # unclosed: no answer
    big = "word " * 200_000 + r"\boxed{3}"  # 1 MB
    assert extract_answer(big) == "3"
    assert last_number("1" * 10**6) == "1" * 10**6
    assert count_boxes(r"\boxed{1}" * 10_000) == 10_000


def test_fallbacks_and_count_boxes():
    assert extract_answer("The answer is $\\frac{1}{2}$. I hope it is correct.") == r"\frac{1}{2}"
    assert extract_answer("final answer is 3\nthe end 9") == "3"
    assert extract_answer("no digits here") is None
    assert last_number("a -1,234.5 b 2") == "2" and last_number("x = -1,234.5") == "-1,234.5"
    assert count_boxes(r"\boxed{\boxed{1}} and \fbox{2} and \boxed{") == 2
    assert count_boxes("none") == 0


@pytest.mark.parametrize("raw,key", [
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"30^{\circ}", "30"), (r"30^\circ", "30"), ("45°", "45"),
    (r"25\%", "25"), (r"\$15.50", "15.50"),
    (r"5 \text{ cm}^2", "5"), (r"12\mbox{ inches}", "12"),
    ("x = 5", "5"), (r"\theta=\frac\pi3", r"\frac\pi3"), ("x_1 = 2", "2"),
    ("1,000,000", "1000000"), ("1{,}000", "1000"), (r"1\,000", "1000"),
    ("7.", "7"), ("five", "5"), ("Twenty-One", "21"),
    (r"\frac12", r"\frac{1}{2}"), (r"\frac1{3}", r"\frac{1}{3}"), (r"\sqrt2", r"\sqrt{2}"),
    (".5", "0.5"), ("3/4", r"\frac{3}{4}"), ("(B)", "B"), (r"\text{(B)}", "B"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("x + y = 1", "x+y=1"),  # not a single-variable assignment: kept
    ("2m", "2m"),  # a one-letter "unit" is never stripped (it may be a variable)
])
def test_comparison_key(raw, key):
    assert comparison_key(raw) == key


def test_normalize_keeps_spaces_between_commands_and_unwraps_iteratively():
    assert normalize_answer(r"\pi r^2") == r"\pi r^2"
    assert unwrap_commands(r"\text{a\textbf{b}c}{d}") == "abc{d}"
    assert unwrap_commands("{" * 10**5 + r"\text{x}") == "{" * 10**5 + "x"
    assert word_to_number("forty two") == "42" and word_to_number("twenty zero") == "twenty zero"


def test_numeric_tolerance_is_relative_1e4_and_integers_are_exact():
    assert parse_number(r"-\frac{-3}{4}") == (Fraction(3, 4), False)
    assert parse_number("12") == (Fraction(12), True)
    assert parse_number(r"\frac{1}{0}") is None and parse_number("1e5") == (Fraction(100000), False)
    assert parse_number("2.5E-3") == (Fraction(1, 400), False) and parse_number("1e100") is None
    assert numeric_equal("0.3333", r"\frac{1}{3}")  # |diff| = 1/30000 = 1e-4 * 1/3 exactly
    assert not numeric_equal("0.3332", r"\frac{1}{3}")
    assert numeric_equal("100.01", "100.011") and not numeric_equal("100.03", "100.011")
    assert not numeric_equal("100.01", "100") and not numeric_equal("100.01", "100.0")  # integer gold: exact
    assert not numeric_equal("12346", "12345")  # two integers: exact
    assert numeric_equal("2.0", "2") and not numeric_equal("x", "2")


def test_answers_equivalent_order_and_long_answers():
    assert answers_equivalent("0.5", r"\frac12", use_math_verify=False)
    assert not answers_equivalent(r"2\sqrt2", r"\sqrt8", use_math_verify=False)
    assert answers_equivalent(r"2\sqrt2", r"\sqrt8")
    long = "1+" * 1500 + "1"  # over MAX_ANSWER_CHARS: compared verbatim only
    assert answers_equivalent(long, long) and not answers_equivalent(long, "1501")


def test_gold_and_text_cleaning():
    assert gold_answer(r"so \boxed{42}.") == "42" and gold_answer(" 7 ") == "7"
    assert clean_text("a\ud800b") == "a?b"
    clean_text("x\udfff").encode("utf-8")  # encodable afterwards


def test_reason_counts_has_every_reason():
    results = [GradeResult(1.0, "correct", "1"), GradeResult(0.0, "timeout", None), GradeResult(0.0, "correct", "2")]
    assert reason_counts(results) == {"correct": 2, "wrong": 0, "no_answer": 0, "timeout": 1, "error": 0}
    assert reason_counts([]) == {"correct": 0, "wrong": 0, "no_answer": 0, "timeout": 0, "error": 0}


def test_format_reward():
    assert format_reward(r"work \boxed{3}") == 1.0
    assert format_reward(r"\boxed{1} \boxed{2}") == 0.0
    assert format_reward("no box, answer 3") == 0.0
    assert format_reward(r"\boxed{3") == 0.0


def test_overlong_penalty_matches_dapo_formula():
    # max 100 tokens, L_cache 20: free up to 80, then (80 - L) / 20 down to -1 at 100, -1 beyond.
    assert overlong_penalty(0, 100, 20) == 0.0 and overlong_penalty(80, 100, 20) == 0.0
    assert overlong_penalty(81, 100, 20) == pytest.approx(-0.05, abs=1e-12)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5, abs=1e-12)
    assert overlong_penalty(100, 100, 20) == -1.0 and overlong_penalty(150, 100, 20) == -1.0
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(10, 100, 200)
    with pytest.raises(ValueError, match="length must be"):
        overlong_penalty(-1, 100, 20)
    assert combine_rewards(1.0, format_score=1.0, format_weight=0.1, overlong=-0.5) == pytest.approx(0.6)
    assert combine_rewards(0.0) == 0.0


def test_shaped_rewards_add_the_enabled_terms_only():
    correct, texts, lengths = [1.0, 0.0, 1.0], ["\\boxed{3}", "no box", "\\boxed{1} \\boxed{2}"], [10, 95, 100]
    # Both off: the correctness itself.
    assert shaped_rewards(correct, texts, lengths, max_length=100) == correct
    # format 0.5 x [exactly one box]; overlong over the last 20 of 100 tokens.
    got = shaped_rewards(correct, texts, lengths, max_length=100, format_weight=0.5, overlong_buffer=20)
    assert got == pytest.approx([1.0 + 0.5, 0.0 - 0.75, 1.0 - 1.0])
    assert shaped_rewards(correct, texts, lengths, max_length=100, overlong_buffer=20) == pytest.approx(
        [1.0, -0.75, 0.0])
    with pytest.raises(ValueError):
        shaped_rewards(correct, texts, lengths[:2], max_length=100)


def test_rewards_imports_no_jax():
    code = "import sys, sspo_jax.rewards; assert not any(m == 'jax' or m.startswith('jax.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_text_never_reaches_sympy_eval(monkeypatch):
    """sympy's parse_expr ends in `eval_expr` (an eval). Grading hostile text must hand it nothing
    but number tokens (latex2sympy's NUMBER -> sympy.Number(str))."""
    import re

    import sympy.parsing.sympy_parser as sympy_parser
    import sympy.physics.units  # noqa: F401 - sympy evaluates its own unit names on first import

    evaluated = []
    real_eval_expr = sympy_parser.eval_expr
    monkeypatch.setattr(sympy_parser, "eval_expr",
                        lambda code, local_dict, global_dict: (evaluated.append(code),
                                                               real_eval_expr(code, local_dict, global_dict))[1])
    hostile = [r"__import__('os').getcwd()", r"\text{__import__('os')}", r"\mathrm{exec}(1)", "eval(1)",
               r"\operatorname{open}(x)", "lambda: 1", r"x.__class__", "1,234.5", r"3.5\%"]
    for text in hostile:
        for response in (r"\boxed{%s}" % text, "The answer is " + text):
            answers_equivalent(extract_answer(response), "1")
    assert evaluated, "the spy saw nothing: grading no longer goes through sympy_parser"
    for code in evaluated:
        assert re.fullmatch(r"(Integer|Float) \('?[\d.]+'? \)", code), code


def test_two_plain_numbers_skip_math_verify_unless_percent(monkeypatch):
    import sspo_jax.rewards.equivalence as eq

    calls = []
    monkeypatch.setattr(eq, "math_verify_equal", lambda pred, gold: calls.append((pred, gold)) or False)
    assert not eq.answers_equivalent("12346", "12345") and not eq.answers_equivalent(r"\frac{1}{3}", "0.3")
    assert calls == []
    assert not eq.answers_equivalent(r"25\%", "0.25")  # math-verify is asked (stubbed to say no here)
    assert calls and calls[0] == (r"25\%", "0.25")
    assert not eq.answers_equivalent(r"\sqrt{2}", "1.414")  # not a plain number: asked too
    assert (r"\sqrt{2}", "1.414") in calls


def test_math_verify_equal_directly():
    from sspo_jax.rewards.equivalence import math_verify_equal

    assert math_verify_equal(r"\{2, 1\}", r"\{1,2\}")
    assert not math_verify_equal(r"(1,2]", r"[1,2)")
    assert not math_verify_equal("1", r"\frac{")  # gold that does not parse: never equal


def test_run_with_alarm_interrupts_python_and_grade_guarded_never_raises():
    import threading

    from sspo_jax.rewards.pool import GradeTimeout, grade_guarded, run_with_alarm

    def spin():
        while True:
            pass

    with pytest.raises(GradeTimeout):
        run_with_alarm(spin, 0.05)
    assert run_with_alarm(lambda: 3, 0.05) == 3
    out = []
    t = threading.Thread(target=lambda: out.append(run_with_alarm(lambda: 4, 0.05)))  # no alarm off main
    t.start()
    t.join()
    assert out == [4]
    res = grade_guarded(r"\boxed{1}", "1", timeout=5.0)
    assert (res.score, res.reason) == (1.0, "correct")


def test_grade_guarded_turns_a_grading_bug_into_error(monkeypatch):
    import sspo_jax.rewards.pool as pool

    def broken(response, gold, use_math_verify):
        raise KeyError("bug")

    monkeypatch.setattr(pool, "grade_response", broken)
    res = pool.grade_guarded(r"\boxed{1}", "1", timeout=1.0)
    assert (res.score, res.reason, res.extracted) == (0.0, "error", None) and res.detail.startswith("KeyError")


INTEGER_GOLDS = [r"10{,}000", "2024", "100", "123456", "7", "-15"]


def _hedges(gold: int) -> list[str]:
    """Near-integer answers a policy could learn to hedge with: +-1e-3 relative (rounded to 6
    decimals), +0.5, +0.0001, and the 1e-4-tolerance edge case."""
    g = Fraction(gold)
    return [f"{float(g * Fraction(1001, 1000)):.6f}", f"{float(g * Fraction(999, 1000)):.6f}",
            f"{float(g + Fraction(1, 2))}", f"{gold}.0001", f"{float(g - g / 10001):.9f}"]


@pytest.mark.parametrize("gold", INTEGER_GOLDS)
def test_near_integer_hedges_never_score_against_integer_golds(gold):
    """Issue 18: an integer gold needs exactly that integer. Checked through grade_response with
    math-verify on, so no later rule accepts what the numeric rule refused."""
    from sspo_jax.rewards import grade_response
    value = int(gold.replace("{,}", ""))
    for hedge in _hedges(value):
        result = grade_response(rf"The answer is $\boxed{{{hedge}}}$.", gold)
        assert result.score == 0.0, (hedge, gold, result)


@pytest.mark.parametrize("pred,gold", [
    (r"10{,}000", r"10{,}000"), ("10,000", r"10{,}000"), ("10000", r"10{,}000"),
    ("10000.0", r"10{,}000"), ("10000.000", "10000"), (r"\frac{20000}{2}", "10000"),
    ("1.0e4", "10000"), ("1e4", "10000"), ("2024.0", "2024"), ("-15.00", "-15"),
])
def test_exact_forms_of_an_integer_gold_score(pred, gold):
    from sspo_jax.rewards import grade_response
    result = grade_response(rf"So $\boxed{{{pred}}}$", gold)
    assert result.score == 1.0, (pred, gold, result)


def test_non_integer_golds_keep_the_relative_tolerance():
    assert numeric_equal("0.3333", r"\frac{1}{3}") and not numeric_equal("0.333", r"\frac{1}{3}")
    assert numeric_equal("2.50001", "2.5") and not numeric_equal("2.5003", "2.5")
    assert not numeric_equal("1.00001", "1")  # the gold 1 is an integer: exact


@pytest.mark.parametrize("text,want", [
    # Issue 18, item 4: an explicit final answer after the last box wins over it.
    (r"So the first sum is $\boxed{255}$. Adding the rest, the final answer is $10,455$.", "10,455"),
    (r"We get \boxed{12}, then doubling: Final answer is 24.", "24"),
    (r"\boxed 7 and so the final answer is: $\frac{7}{2}$", r"\frac{7}{2}"),
    # The box stays the answer: the phrase comes first, or says no number or math.
    (r"The final answer is $\boxed{7}$.", "7"),
    (r"The final answer is \boxed{3}, as checked above.", "3"),
    (r"$\boxed{5}$. The final answer is correct.", "5"),
    (r"Thus \boxed{9}; the answer is 10 if we count zero.", "9"),  # only the explicit phrase
])
def test_a_later_explicit_final_answer_beats_an_intermediate_box(text, want):
    assert extract_answer(text) == want


# Issue 18, items 2, 3, 5, 6: several boxes, golds with boxes, the unboxed fallback, letters.
@pytest.mark.parametrize("text,gold,answer,rule", [
    (r"The roots are $\boxed{1}$, $\boxed{2}$ and $\boxed{3}$.", "1, 2, 3", "1, 2, 3", "boxes"),
    (r"The roots are $\boxed{1}$, $\boxed{2}$ and $\boxed{3}$.", r"\{1,2,3\}", r"\{1, 2, 3\}", "boxes"),
    (r"So $\boxed{2}$ and $\boxed{-3}$.", "(2, -3)", "(2, -3)", "boxes"),
    # An intermediate box on an earlier line does not join; a one-value gold takes the last box.
    ("First \\boxed{4}.\nThe roots are \\boxed{1} and \\boxed{2}.", "1, 2", "1, 2", "boxes"),
    (r"First \boxed{4}, then the final one \boxed{5}.", "5", "5", "box"),
    (r"So \boxed{1, 2}.", "1, 2", "1, 2", "box"),            # already a list: the box as is
    (r"We have \boxed{1}. Done.", "1, 2", "1", "box"),       # one box: nothing to combine
    # Multiple choice (no box).
    ("Checking each option, the answer is (B).", "B", "B", "letter"),
    ("**Answer: C**", "(C)", "C", "letter"),
    ("So the correct option is E.", r"\text{(E)}", "E", "letter"),
    ("Only one fits.\nA. Because B is not valid", "A", "A", "letter"),
    ("the answer is a prime number", "B", None, None),   # no letter: no choice made
    # No box: the later of the last math span and the last bare number; spans taken whole.
    (r"So $x \geq 5$.", r"x \geq 5", r"x \geq 5", "math_span"),
    (r"The matrix is $\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}$.", "M",
     r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", "math_span"),
    (r"Answer \( (9+1) \)", "10", "(9+1)", "math_span"),
    (r"Let $x$ be the count; we get 3 apples and 4 pears, so 7 in total", "7", "7", "number"),
    (r"It costs \$5 each, so $3 \cdot 5 = 15$", "15", r"3 \cdot 5 = 15", "math_span"),
])
def test_extraction_rules_that_see_the_gold(text, gold, answer, rule):
    from sspo_jax.rewards import extract
    assert extract(text, gold) == rewards_extraction(answer, rule)


def rewards_extraction(answer, rule):
    from sspo_jax.rewards import Extraction
    return Extraction(answer, rule)


def test_no_answer_in_a_code_word():
    from sspo_jax.rewards import extract
    assert extract("The code is AZYUK2A", "2").answer is None
    assert extract_answer("H2O and CO2") is None


@pytest.mark.parametrize("gold,want", [
    (r"\boxed{1}, \boxed{2}", "1, 2"), (r"$\boxed{2}$ and $\boxed{-3}$", "2, -3"),
    (r"so \boxed{7}", "7"), ("7", "7"),
])
def test_golds_with_several_boxes_are_combined(gold, want):
    assert gold_answer(gold) == want


@pytest.mark.parametrize("pred,gold,equal", [
    ("1,000", "1000", True), ("12,345,678", "12345678", True), (r"10{,}000", "10000", True),
    ("1000,99", "1000.99", False), ("0,111", "0.111", False), ("0,111", "111", False),
    ("3,14", "3.14", False), ("1,5", "1.5", False), ("1,5", "1, 5", True),
])
def test_commas_are_never_decimal_points(pred, gold, equal):
    assert answers_equivalent(pred, gold) == equal


def test_grade_result_names_the_rule_and_the_match():
    from sspo_jax.rewards import grade_response, rule_counts
    results = [grade_response(r"so \boxed{10{,}000}", "10000"),          # box, exact key
               grade_response(r"$\boxed{1}$, $\boxed{2}$", "1, 3"),       # boxes, wrong
               grade_response(r"so \boxed{\frac{2}{4}}", "0.5"),          # numeric
               grade_response("the answer is (B)", "B"),                  # letter, exact
               grade_response("nothing here", "3")]                       # no answer
    assert [(r.reason, r.rule, r.match) for r in results] == [
        ("correct", "box", "exact"), ("wrong", "boxes", None), ("correct", "box", "numeric"),
        ("correct", "letter", "exact"), ("no_answer", None, None)]
    counts = rule_counts(results)
    assert counts["rule/box"] == 2 and counts["rule/boxes"] == 1 and counts["rule/letter"] == 1
    assert counts["match/exact"] == 2 and counts["match/numeric"] == 1
    assert counts["match/math_verify"] == 0 and counts["rule/math_span"] == 0


@pytest.mark.parametrize("text,gold,want", [
    ("**Answer:** 12", "12", "12"),                           # markdown around the phrase
    ("Thus **Answer: 12**", "12", "12"),
    (r"\boxed{12}. The final answer is $12$. So the answer is correct.", "12", "12"),
    ("so it is 1,0001", "1000", "1"),                         # not a thousands group: no 1,000
    (r"Thus the limit is $e$.", "e", "e"),                    # a bare e is no choice letter
    (r"Thus the answer is (b).", "(b)", "B"),                 # in parentheses it is
])
def test_review_cases(text, gold, want):
    from sspo_jax.rewards import extract
    assert extract(text, gold).answer == want


def test_a_gold_repeating_its_box_on_another_line_is_one_answer():
    assert gold_answer("So $\\boxed{5}$.\nCheck: $\\boxed{5}$") == "5"
