"""Benchmark registry: sizes, the field mapping of each file, and the size-mismatch warning."""
import json
import warnings

import pytest

from sspo_jax.data.benchmarks import BENCHMARKS, FIVE_BENCHMARKS, load_benchmark


def write_benchmark(data_dir, name, rows):
    path = data_dir / name / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_registry_sizes_and_files():
    sizes = {name: b.size for name, b in BENCHMARKS.items()}
    assert sizes == {"aime24": 30, "amc23": 40, "amc83": 83, "math500": 500, "minerva_math": 272,
                     "olympiadbench": 675, "gsm8k": 1319}
    assert all(b.file == f"{name}/test.jsonl" and b.source for name, b in BENCHMARKS.items())
    assert set(FIVE_BENCHMARKS) <= set(BENCHMARKS)


def test_a_full_size_file_loads_without_warning(tmp_path):
    write_benchmark(tmp_path, "aime24", [{"problem": f"P{i}", "answer": str(i)} for i in range(30)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = load_benchmark("aime24", tmp_path)
    assert [r["answer"] for r in rows] == [str(i) for i in range(30)]


def test_a_size_mismatch_warns(tmp_path):
    write_benchmark(tmp_path, "amc23", [{"question": f"Q{i}", "answer": i} for i in range(83)])
    with pytest.warns(UserWarning, match=r"'amc23': 83 usable rows .* expected 40 .*83-problem"):
        rows = load_benchmark("amc23", tmp_path)
    assert rows[5]["problem"] == "Q5" and rows[5]["answer"] == "5"


def test_each_benchmark_reads_its_own_answer_format(tmp_path):
    write_benchmark(tmp_path, "minerva_math", [{"problem": "P", "solution": "so $\\boxed{3 \\times 10^8}$."}])
    write_benchmark(tmp_path, "olympiadbench", [{"question": "Q", "final_answer": ["$\\frac{\\pi}{3}$"]}])
    write_benchmark(tmp_path, "gsm8k", [{"question": "Q", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}])
    write_benchmark(tmp_path, "math500", [{"problem": "P", "solution": "\\boxed{1}", "answer": "\\frac{1}{2}"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-row files: the size warning is tested above
        answers = {name: load_benchmark(name, tmp_path)[0]["answer"]
                   for name in ("minerva_math", "olympiadbench", "gsm8k", "math500")}
    assert answers == {"minerva_math": "3 \\times 10^8", "olympiadbench": "\\frac{\\pi}{3}",
                       "gsm8k": "4", "math500": "\\frac{1}{2}"}


def test_missing_file_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="math500/test.jsonl.*download it from .*HuggingFaceH4/MATH-500"):
        load_benchmark("math500", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'aime25'"):
        load_benchmark("aime25", tmp_path)
