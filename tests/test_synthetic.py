"""The synthetic arithmetic task: deterministic, correct answers, disjoint splits, pipeline-ready."""
import json
import re

import pytest

from sspo_jax.data import synthetic
from sspo_jax.data.pipeline import PromptPipeline
from sspo_jax.data.tokenizer import build_tokenizer

STEP_PATTERNS = (
    (re.compile(r"^(\w+) (?:buys|finds|gets) (\d+) more$"), lambda v, k: v + k),
    (re.compile(r"^(\w+) (?:gives (\d+) away|loses (\d+)|sells (\d+))$"), lambda v, k: v - k),
    (re.compile(r"^(\w+) doubles them()$"), lambda v, k: v * 2),
    (re.compile(r"^(\w+) triples them()$"), lambda v, k: v * 3),
)


def solve_independently(problem):
    """Parse the English and compute the answer; returns (answer, values after each step)."""
    sentences = [s.strip() for s in re.split(r"[.?]", problem) if s.strip()]
    name, start, item = re.fullmatch(r"(\w+) has (\d+) (\w+)", sentences[0]).groups()
    assert sentences[-1] == f"How many {item} does {name} have now"
    value, values = int(start), []
    for sentence in sentences[1:-1]:
        for pattern, apply in STEP_PATTERNS:
            match = pattern.fullmatch(sentence)
            if match:
                assert match.group(1) == name
                numbers = [g for g in match.groups()[1:] if g]
                value = apply(value, int(numbers[0]) if numbers else 0)
                values.append(value)
                break
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return value, int(start), values


@pytest.mark.parametrize("level", sorted(synthetic.LEVELS))
def test_answers_are_correct_and_levels_are_respected(level):
    spec = synthetic.LEVELS[level]
    for row in synthetic.generate(200, levels=(level,), seed=level):
        answer, start, values = solve_independently(row["problem"])
        assert row["answer"] == str(answer) and row["level"] == level
        assert len(values) == spec.steps and 1 <= start <= spec.max_start
        assert all(0 <= v <= synthetic.MAX_VALUE for v in values)
        # The solution: one correct "a op b = c." line per step, chained, then the boxed answer.
        *lines, last = row["solution"].split("\n")
        assert last == f"The answer is \\boxed{{{answer}}}."
        current = start
        for line, value in zip(lines, values, strict=True):
            a, op, b, c = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)\.", line).groups()
            a, b, c = int(a), int(b), int(c)
            assert a == current and c == value
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            if op != "*":
                assert 1 <= b <= spec.max_operand
            current = c


def test_generation_is_deterministic_by_seed():
    a = synthetic.generate(50, levels=(1, 2, 3), seed=11)
    assert a == synthetic.generate(50, levels=(1, 2, 3), seed=11)
    assert a != synthetic.generate(50, levels=(1, 2, 3), seed=12)
    assert {row["level"] for row in a} == {1, 2, 3}


def test_train_and_test_never_share_a_problem():
    train = synthetic.generate(3000, split="train", levels=(1,), seed=0)
    test = synthetic.generate(500, split="test", levels=(1,), seed=0)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert all(synthetic.split_of(r["problem"]) == "test" for r in test)
    # The split is a fixed fraction of problem texts, not of the seed.
    train_2 = synthetic.generate(2000, split="train", levels=(2,), seed=5)
    assert all(synthetic.split_of(r["problem"]) == "train" for r in train_2)
    fraction = sum(synthetic.split_of(f"Tom has {i} pens.") == "test" for i in range(5000)) / 5000
    assert abs(fraction - synthetic.TEST_FRACTION) < 0.03


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="split='dev'"):
        synthetic.generate(1, split="dev")
    with pytest.raises(ValueError, match="levels"):
        synthetic.generate(1, levels=(6,))
    with pytest.raises(ValueError, match="levels"):
        synthetic.generate(1, levels=())


def test_rows_written_as_jsonl_feed_the_pipeline(tmp_path):
    rows = synthetic.generate(12, levels=(1, 2), seed=3)
    path = tmp_path / "sub" / "train.jsonl"
    synthetic.write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    pipeline = PromptPipeline(path, build_tokenizer(), batch_size=4, max_prompt_len=64,
                              num_epochs=1, shuffle=False, shard_index=0, shard_count=1)
    assert pipeline.stats["rows_used"] == 12
    answers = [a for batch in pipeline for a in batch["answer"]]
    assert answers == [r["answer"] for r in rows]


def test_solution_text_format():
    expected = "3 + 4 = 7.\n7 - 2 = 5.\n5 * 3 = 15.\nThe answer is \\boxed{15}."
    assert synthetic.solution_text(3, [("+", 4), ("-", 2), ("*", 3)]) == expected
