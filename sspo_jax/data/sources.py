"""Reading problem rows from JSONL / JSON / Parquet files, a `datasets` hub name, or memory.

Every source becomes a list of rows ``{"problem": str, "answer": str, "row_number": int}``
(plus ``"solution"`` when the source row has a string one), after field mapping. Malformed rows
are skipped and counted (or raise when ``strict``); a missing file or a source without a
single usable row is an error that says what to fix.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

# One reader of the last \boxed{} for gold solutions and model outputs alike.
from sspo_jax.rewards.extract import last_boxed_content as last_boxed

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
ANSWER_FORMATS = ("plain", "boxed", "gsm8k")
SKIP_REASONS = ("not_json", "missing_field", "empty")
MAX_LOGGED_ROWS = 5


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which source fields hold the problem and the gold answer.

    Each entry is a tuple of candidate names; the first one present (not None) in a row is
    used. ``answer_format`` says how to read the answer field: ``plain`` (as is), ``boxed``
    (the content of its last ``\\boxed{}``), ``gsm8k`` (the text after its last ``####``).
    When no answer field is present, the answer is the last ``\\boxed{}`` of the solution.
    A list-valued answer (OlympiadBench's ``final_answer``) uses its first element, and
    ``$...$`` around an answer is removed.
    """

    problem: tuple[str, ...] = ("problem", "question")
    answer: tuple[str, ...] = ("answer",)
    solution: tuple[str, ...] = ("solution",)
    answer_format: str = "plain"

    def __post_init__(self):
        for name in ("problem", "answer", "solution"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single name is a common way to write it
                object.__setattr__(self, name, (value,))
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format={self.answer_format!r} is not one of {ANSWER_FORMATS}"
            )
        if not self.problem:
            raise ValueError("FieldMap.problem needs at least one field name")


def _first_present(row: dict, names: Sequence[str]) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _clean_answer(value: Any, answer_format: str) -> str | None:
    """The gold answer as a stripped string, or None when nothing usable is there."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or isinstance(value, (dict, bool)):
        return None
    text = str(value).strip()
    if answer_format == "boxed":
        text = last_boxed(text)
    elif answer_format == "gsm8k":
        text = text.rsplit("####", 1)[1] if "####" in text else None
    if text is None:
        return None
    text = text.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text or None


def map_row(raw: Any, fields: FieldMap) -> tuple[dict | None, str | None]:
    """Apply the field mapping to one parsed row: ``(row, None)`` or ``(None, reason)``.

    ``reason`` is one of ``SKIP_REASONS``: ``not_json`` (not a JSON object),
    ``missing_field`` (no problem field, or neither an answer nor a solution field),
    ``empty`` (the problem is blank or no answer could be read from the fields).
    """
    if not isinstance(raw, dict):
        return None, "not_json"
    problem = _first_present(raw, fields.problem)
    answer_value = _first_present(raw, fields.answer)
    solution = _first_present(raw, fields.solution)
    if not isinstance(problem, str) or (answer_value is None and solution is None):
        return None, "missing_field"
    if answer_value is not None:
        answer = _clean_answer(answer_value, fields.answer_format)
    else:
        answer = _clean_answer(solution, "boxed") if isinstance(solution, str) else None
    if not problem.strip() or answer is None:
        return None, "empty"
    row = {"problem": problem.strip(), "answer": answer}
    if isinstance(solution, str):
        row["solution"] = solution
    return row, None


class _NotJson:
    """Marker for a line that did not parse as JSON."""


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError:
                yield line_number, _NotJson()


def _iter_json(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}); a .json source must hold one list of "
                "objects. For one object per line, name the file .jsonl."
            ) from e
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected a list of rows")
    yield from enumerate(data, start=1)


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed: pip install pyarrow"
        ) from e
    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _iter_hub(name: str, split: str, config: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading the hub dataset {name!r} needs the `datasets` package, which is not "
            "installed: pip install datasets (or download the split to a local JSONL/Parquet file)"
        ) from e
    yield from enumerate(datasets.load_dataset(name, config, split=split), start=1)


_FILE_READERS = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}


def iter_source(
    source: str | os.PathLike | Iterable[dict], *, hub_split: str = "train",
    hub_config: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(row_number, parsed_row)`` from a file, ``"hf:<name>"``, or an iterable of dicts.

    Row numbers are 1-based: the line in a JSONL file, else the position. Lines that are not
    JSON come out as a marker that ``map_row`` reports as ``not_json``.
    """
    if not isinstance(source, (str, os.PathLike)):
        return enumerate(source, start=1)
    source = os.fspath(source)
    if source.startswith(HUB_PREFIX):
        return _iter_hub(source[len(HUB_PREFIX):], hub_split, hub_config)
    extension = os.path.splitext(source)[1].lower()
    if extension not in _FILE_READERS:
        raise ValueError(
            f"cannot read {source!r}: supported files are {sorted(_FILE_READERS)}; for a "
            f"Hugging Face hub dataset write {HUB_PREFIX}<name>"
        )
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"data file {source!r} does not exist (working directory {os.getcwd()!r}); "
            "check the path in the config"
        )
    return _FILE_READERS[extension](source)


def load_rows(
    source: str | os.PathLike | Iterable[dict], fields: FieldMap = FieldMap(), *,
    strict: bool = False, hub_split: str = "train", hub_config: str | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """Read and field-map every row of ``source``: returns ``(rows, counts)``.

    ``counts`` has ``rows_read`` and ``skipped_<reason>`` for each reason in ``SKIP_REASONS``.
    Malformed rows are skipped (the first few row numbers logged) or, with ``strict``, raise
    ValueError naming the row. A source without one usable row raises ValueError.
    """
    name = source if isinstance(source, (str, os.PathLike)) else "<in-memory rows>"
    counts = {"rows_read": 0, **{f"skipped_{reason}": 0 for reason in SKIP_REASONS}}
    rows, logged = [], 0
    for row_number, raw in iter_source(source, hub_split=hub_split, hub_config=hub_config):
        counts["rows_read"] += 1
        row, reason = map_row(raw, fields)
        if row is None:
            message = (
                f"{name}: row {row_number} skipped ({reason}; problem fields {fields.problem}, "
                f"answer fields {fields.answer}, solution fields {fields.solution})"
            )
            if strict:
                raise ValueError(message + "; fix the row or pass strict=False to skip it")
            counts[f"skipped_{reason}"] += 1
            if logged < MAX_LOGGED_ROWS:
                log.warning(message)
                logged += 1
            continue
        row["row_number"] = row_number
        rows.append(row)
    if not rows:
        raise ValueError(
            f"no usable row in {name}: {counts}. Check the file and the field names "
            f"(problem fields {fields.problem}, answer fields {fields.answer}, "
            f"answer_format {fields.answer_format!r})"
        )
    skipped = counts["rows_read"] - len(rows)
    if skipped:
        log.warning("%s: %d of %d rows skipped: %s", name, skipped, counts["rows_read"], counts)
    return rows, counts
