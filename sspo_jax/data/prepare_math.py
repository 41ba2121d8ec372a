"""Writes the MATH training problems of chosen difficulty levels as JSONL for the trainer.

    python -m sspo_jax.data.prepare_math --source=hf:DigitalLearningGmbH/MATH-lighteval \\
        --levels=3,4,5 --out=data/math_level3to5.jsonl
    python -m sspo_jax.data.prepare_math --source=/path/to/MATH/train --out=...

`--source` is a Hugging Face dataset (`hf:NAME`, needs `pip install datasets`), a JSONL / JSON /
Parquet file, or the original MATH release's directory (one JSON file per problem in subject
folders). Each row needs `problem`, `level` ("Level 3" or 3) and `solution`; the gold answer is
the last `\\boxed{}` of the solution. Rows of other levels, and rows without a boxed answer, are
counted and left out. Output rows: {"problem", "answer", "level", "type"}.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

from absl import app, flags

from sspo_jax.data.sources import iter_source, last_boxed

_LEVEL = re.compile(r"(\d+)")


def _iter_math_tree(root: str) -> Iterator[dict]:
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(".json"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    yield json.load(f)


def read_math(source: str, hub_split: str = "train") -> Iterable[dict]:
    """Raw MATH rows from a directory tree, a file, or a hub dataset."""
    if os.path.isdir(source):
        return _iter_math_tree(source)
    return (row for _, row in iter_source(source, hub_split=hub_split) if isinstance(row, dict))


def select_levels(rows: Iterable[dict], levels: set[int]) -> tuple[list[dict], dict[str, int]]:
    """(kept rows, counts): rows of `levels` with a boxed answer in their solution."""
    kept, counts = [], {"read": 0, "other_level": 0, "no_boxed_answer": 0, "kept": 0}
    for row in rows:
        counts["read"] += 1
        match = _LEVEL.search(str(row.get("level", "")))
        if match is None or int(match.group(1)) not in levels:
            counts["other_level"] += 1
            continue
        answer = last_boxed(str(row.get("solution") or ""))
        if not row.get("problem") or not answer:
            counts["no_boxed_answer"] += 1
            continue
        kept.append({"problem": row["problem"], "answer": answer, "level": int(match.group(1)),
                     "type": row.get("type", "")})
    counts["kept"] = len(kept)
    return kept, counts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    levels = {int(x) for x in FLAGS.levels.split(",")}
    rows, counts = select_levels(read_math(FLAGS.source, FLAGS.hub_split), levels)
    if not rows:
        raise SystemExit(f"no MATH row of levels {sorted(levels)} with a boxed answer in "
                         f"{FLAGS.source}: {counts}")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} problems to {FLAGS.out}; counts: {counts}")


if __name__ == "__main__":
    FLAGS = flags.FLAGS
    flags.DEFINE_string("source", "hf:DigitalLearningGmbH/MATH-lighteval",
                        "MATH directory, JSONL/JSON/Parquet file, or hf:DATASET")
    flags.DEFINE_string("levels", "3,4,5", "comma-separated difficulty levels to keep")
    flags.DEFINE_string("out", "data/math_level3to5.jsonl", "output JSONL path")
    flags.DEFINE_string("hub_split", "train", "split of a hub dataset")
    app.run(main)
