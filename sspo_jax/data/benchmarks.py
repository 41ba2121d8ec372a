"""The evaluation benchmarks: expected local files, field names, sizes and public sources.

Files follow the layout of the Qwen2.5-Math evaluation harness (``<data_dir>/<name>/test.jsonl``,
the files in github.com/QwenLM/Qwen2.5-Math/tree/main/evaluation/data), which most RL papers on
Qwen2.5-Math evaluate with. Nothing is downloaded here: fetch the files once, put them under
``data_dir``, and ``load_benchmark`` reads them and warns when the row count is not the one the
papers report.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

from sspo_jax.data.sources import FieldMap, load_rows

QWEN_EVAL_DATA = "https://github.com/QwenLM/Qwen2.5-Math/tree/main/evaluation/data"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: ``file`` is relative to the data directory; ``size`` is the row count."""

    name: str
    size: int
    file: str
    fields: FieldMap
    source: str
    note: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "aime24", 30, "aime24/test.jsonl", FieldMap(problem=("problem", "question")),
            f"{QWEN_EVAL_DATA}/aime24 (hub mirror: HuggingFaceH4/aime_2024)",
            "AIME 2024 I and II, integer answers 0-999",
        ),
        Benchmark(
            "amc23", 40, "amc23/test.jsonl", FieldMap(problem=("question", "problem")),
            f"{QWEN_EVAL_DATA}/amc23 (hub mirror: math-ai/amc23)",
            "AMC 2023, 40 problems; some papers use the 83-problem set instead (see amc83)",
        ),
        Benchmark(
            "amc83", 83, "amc83/test.jsonl", FieldMap(problem=("problem", "question")),
            "hub: AI-MO/aimo-validation-amc (split train)",
            "AMC 12 2022 and 2023 problems, the 'AMC' of several RL papers; not the same as amc23",
        ),
        Benchmark(
            "math500", 500, "math500/test.jsonl", FieldMap(problem=("problem",)),
            f"{QWEN_EVAL_DATA}/math500 (hub mirror: HuggingFaceH4/MATH-500)",
            "the MATH test subset of Lightman et al. (Let's Verify Step by Step)",
        ),
        Benchmark(
            "minerva_math", 272, "minerva_math/test.jsonl",
            FieldMap(problem=("problem", "question"), answer=("answer",), solution=("solution",)),
            f"{QWEN_EVAL_DATA}/minerva_math (hub mirror: math-ai/minervamath)",
            "no answer field in the Qwen file: the gold answer is the last \\boxed{} of the solution",
        ),
        Benchmark(
            "olympiadbench", 675, "olympiadbench/test.jsonl",
            FieldMap(problem=("question", "problem"), answer=("final_answer", "answer")),
            f"{QWEN_EVAL_DATA}/olympiadbench (hub: Hothan/OlympiadBench, config OE_TO_maths_en_COMP)",
            "English open-ended competition maths, text only; final_answer is a list, first used",
        ),
        Benchmark(
            "gsm8k", 1319, "gsm8k/test.jsonl",
            FieldMap(problem=("question",), answer=("answer",), answer_format="gsm8k"),
            f"{QWEN_EVAL_DATA}/gsm8k (hub: openai/gsm8k, config main, split test)",
            "the answer field is a solution ending in '#### <number>'",
        ),
    )
}
# The five benchmarks whose average the SSPO/GSPO/GRPO papers on Qwen2.5-Math report.
FIVE_BENCHMARKS = ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")


def load_benchmark(name: str, data_dir: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """Rows ``{"problem", "answer", "row_number"[, "solution"]}`` of one registered benchmark.

    Raises FileNotFoundError (naming the source to download) when the file is missing; warns
    (UserWarning) when the usable row count differs from the benchmark's published size.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    path = os.path.join(os.fspath(data_dir), bench.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"benchmark {name!r} expects the file {path!r}; download it from {bench.source} "
            f"and place it there (fields: problem {bench.fields.problem}, answer {bench.fields.answer})"
        )
    rows, _ = load_rows(path, bench.fields, strict=strict)
    if len(rows) != bench.size:
        warnings.warn(
            f"benchmark {name!r}: {len(rows)} usable rows in {path}, expected {bench.size} "
            f"({bench.note}); scores will not be comparable with published ones",
            stacklevel=2,
        )
    return rows
