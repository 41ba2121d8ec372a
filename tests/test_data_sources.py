"""Reading rows: formats, field mapping, answer extraction, skip counters, clear errors."""
import json
import logging
import sys
import types

import pytest

from sspo_jax.data.sources import FieldMap, last_boxed, load_rows, map_row


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7} end", "7"),
        ("\\boxed{x} and \\fbox{y}", "y"),
        ("no box at all", None),
        ("\\boxed{unclosed {", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed_matches_braces(text, expected):
    assert last_boxed(text) == expected


def test_map_row_field_candidates_and_answer_formats():
    fields = FieldMap()
    assert map_row({"question": " Q? ", "answer": 12}, fields) == ({"problem": "Q?", "answer": "12"}, None)
    # No answer field: the last \boxed{} of the solution; the solution is kept.
    row, reason = map_row({"problem": "P", "solution": "a \\boxed{1} b \\boxed{2}."}, fields)
    assert reason is None and row["answer"] == "2" and row["solution"].startswith("a ")
    # A list answer uses its first element and loses its $...$.
    olympiad = FieldMap(problem="question", answer=("final_answer",))
    row, _ = map_row({"question": "Q", "final_answer": ["$\\frac{1}{2}$", "x"]}, olympiad)
    assert row["answer"] == "\\frac{1}{2}"
    gsm8k = FieldMap(problem="question", answer_format="gsm8k")
    assert map_row({"question": "Q", "answer": "3 + 4 = 7\n#### 7"}, gsm8k)[0]["answer"] == "7"
    boxed = FieldMap(answer_format="boxed")
    assert map_row({"problem": "P", "answer": "it is \\boxed{9}"}, boxed)[0]["answer"] == "9"


@pytest.mark.parametrize(
    "raw, reason",
    [
        (["a list"], "not_json"),
        ({"answer": "1"}, "missing_field"),
        ({"problem": "P"}, "missing_field"),
        ({"problem": 5, "answer": "1"}, "missing_field"),
        ({"problem": "  ", "answer": "1"}, "empty"),
        ({"problem": "P", "answer": "  "}, "empty"),
        ({"problem": "P", "answer": []}, "empty"),
        ({"problem": "P", "solution": "no box"}, "empty"),
    ],
)
def test_map_row_reasons(raw, reason):
    assert map_row(raw, FieldMap()) == (None, reason)


def test_field_map_rejects_unknown_answer_format():
    with pytest.raises(ValueError, match="answer_format"):
        FieldMap(answer_format="latex")


def test_bad_rows_are_skipped_counted_and_logged_with_row_numbers(tmp_path, caplog):
    path = write_lines(tmp_path / "train.jsonl", [
        json.dumps({"problem": "P1", "answer": "1"}),
        "{not json",
        json.dumps({"problem": "P3"}),
        "",  # a blank line is not a row
        json.dumps({"problem": "P5", "answer": ""}),
        json.dumps({"question": "P6", "solution": "\\boxed{6}"}),
        "[1, 2]",
    ])
    with caplog.at_level(logging.WARNING, logger="sspo_jax.data.sources"):
        rows, counts = load_rows(path)
    assert [(r["problem"], r["answer"], r["row_number"]) for r in rows] == [("P1", "1", 1), ("P6", "6", 6)]
    assert counts == {"rows_read": 6, "skipped_not_json": 2, "skipped_missing_field": 1, "skipped_empty": 1}
    logged = " ".join(record.getMessage() for record in caplog.records)
    for line_number in (2, 3, 5, 7):
        assert f"row {line_number} skipped" in logged
    with pytest.raises(ValueError, match=r"row 2 skipped \(not_json"):
        load_rows(path, strict=True)


def test_only_the_first_few_bad_rows_are_logged_individually(tmp_path, caplog):
    path = write_lines(tmp_path / "bad.jsonl", ["x"] * 9 + [json.dumps({"problem": "P", "answer": "1"})])
    with caplog.at_level(logging.WARNING, logger="sspo_jax.data.sources"):
        rows, counts = load_rows(path)
    assert len(rows) == 1 and counts["skipped_not_json"] == 9
    per_row = [r for r in caplog.records if "skipped (" in r.getMessage()]
    assert len(per_row) == 5


def test_missing_empty_and_unusable_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.jsonl.*does not exist"):
        load_rows(tmp_path / "does_not_exist.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable row in .*empty.jsonl"):
        load_rows(tmp_path / "empty.jsonl")
    write_lines(tmp_path / "wrong_fields.jsonl", [json.dumps({"q": "P", "a": "1"})] * 3)
    with pytest.raises(ValueError, match="'skipped_missing_field': 3.*field names"):
        load_rows(tmp_path / "wrong_fields.jsonl")
    with pytest.raises(ValueError, match="supported files"):
        load_rows(tmp_path / "data.csv")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_rows(tmp_path / "broken.json")


def test_json_list_and_in_memory_sources(tmp_path):
    data = [{"problem": "A", "answer": "1"}, {"problem": "B", "answer": "2"}, 7]
    (tmp_path / "rows.json").write_text(json.dumps(data))
    rows, counts = load_rows(tmp_path / "rows.json")
    assert [r["problem"] for r in rows] == ["A", "B"] and counts["skipped_not_json"] == 1
    rows, _ = load_rows(data[:2])
    assert [r["row_number"] for r in rows] == [1, 2]


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"question": ["A", "B", ""], "answer": ["1", "2", "3"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows, counts = load_rows(tmp_path / "rows.parquet")
    assert [(r["problem"], r["answer"]) for r in rows] == [("A", "1"), ("B", "2")]
    assert counts["skipped_empty"] == 1


def test_hub_source_calls_datasets_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"problem": "A", "answer": "1"}, {"problem": "B"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows, counts = load_rows("hf:org/math", hub_split="test", hub_config="main")
    assert calls == [("org/math", "main", "test")]
    assert [r["problem"] for r in rows] == ["A"] and counts["skipped_missing_field"] == 1


def test_hub_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        load_rows("hf:org/math")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_rows(tmp_path / "rows.parquet")
