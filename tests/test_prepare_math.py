"""MATH level selection: levels, boxed answers from solutions, both input layouts."""
import json
import os
import subprocess
import sys

from sspo_jax.data.prepare_math import read_math, select_levels

ROWS = [
    {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra", "solution": "$\\boxed{2}$"},
    {"problem": "Find $x$.", "level": "Level 3", "type": "Algebra",
     "solution": "So $x = \\boxed{\\frac{1}{2}}$."},
    {"problem": "Count.", "level": "Level 5", "type": "Counting", "solution": "It is \\boxed{10}."},
    {"problem": "No box.", "level": "Level 4", "type": "Geometry", "solution": "It is 7."},
    {"problem": "Odd level.", "level": "Level ?", "type": "Algebra", "solution": "\\boxed{1}"},
]


def test_select_levels_keeps_boxed_rows_of_the_levels():
    kept, counts = select_levels(ROWS, {3, 4, 5})
    assert [(r["problem"], r["answer"], r["level"]) for r in kept] == [
        ("Find $x$.", "\\frac{1}{2}", 3), ("Count.", "10", 5)]
    assert counts == {"read": 5, "other_level": 2, "no_boxed_answer": 1, "kept": 2}


def test_reads_the_math_tree_and_jsonl_and_the_cli_writes_jsonl(tmp_path):
    for i, row in enumerate(ROWS):
        folder = tmp_path / "MATH" / "train" / row["type"].lower()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.json").write_text(json.dumps(row))
    assert len(list(read_math(str(tmp_path / "MATH" / "train")))) == 5
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [r["problem"] for r in read_math(str(jsonl))] == [r["problem"] for r in ROWS]
    out = tmp_path / "out" / "l35.jsonl"
    proc = subprocess.run([sys.executable, "-m", "sspo_jax.data.prepare_math",
                           f"--source={tmp_path / 'MATH' / 'train'}", "--levels=3,5", f"--out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in open(out)]
    assert sorted(r["answer"] for r in rows) == ["10", "\\frac{1}{2}"]
    assert "wrote 2 problems" in proc.stdout
