"""A user's own data in one command: a JSONL file with its own field names, some bad rows,
no benchmarks. Trained and evaluated by the documented commands, as a user runs them."""
import json
import subprocess
import sys

import multiproc as mp
import pytest
from test_train import TINY

from sspo_jax import specs
from sspo_jax.data import synthetic
from sspo_jax.train.setup import load_task

pytestmark = pytest.mark.slow


def test_own_jsonl_trains_and_evaluates_on_a_held_out_split(tmp_path):
    data = tmp_path / "mine.jsonl"
    rows = synthetic.generate(100, split="train", levels=(1,), seed=3)
    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps({"question": row["problem"], "final": row["answer"]}) + "\n")
        f.write(json.dumps({"prompt": "no question field", "final": "1"}) + "\n")
        f.write("{not json\n")
        # Far past data.max_prompt_len tokens: dropped (and counted), wherever the split puts it.
        f.write(json.dumps({"question": "How many apples? " * 200, "final": "3"}) + "\n")
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "steps": 2, "warm_start.steps": 300,
                                               "eval.num_prompts": 16}.items()]
    flags += ["--config.data.source=jsonl", f"--config.data.path={data}",
              "--config.data.problem_field=question", "--config.data.answer_field=final"]
    run = lambda module: subprocess.run(  # noqa: E731
        [sys.executable, "-m", module, "--config=configs/demo.py", f"--workdir={tmp_path / 'run'}", *flags],
        cwd=mp.REPO, capture_output=True, text=True, timeout=900)
    train = run("sspo_jax.train")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "warm start skipped" in train.stdout
    assert f"data: {data}: rows_read 103" in train.stdout
    step0 = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert step0["data/rows_read"] == 103 and step0["data/held_out_for_eval"] == 16
    assert step0["data/skipped_missing_field"] == 1 and step0["data/skipped_not_json"] == 1
    assert step0["data/dropped_too_long"] + step0["eval/dropped_too_long"] == 1
    assert step0["eval/problems"] + step0["eval/dropped_too_long"] == 16
    evaluate = run("sspo_jax.evaluate")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "eval" / "summary.json"))
    assert summary["policy"].startswith("checkpoint step 2")
    held_out = summary["benchmarks"]["held_out"]
    assert held_out["problems"] + held_out["dropped_too_long"] == 16
    # Evaluation's held-out rows are the ones training left out (drawn with the seed).
    config = mp.config_with({**TINY, "steps": 2, "eval.num_prompts": 16, "data.source": "jsonl",
                             "data.path": str(data), "data.problem_field": "question",
                             "data.answer_field": "final"})
    spec = specs.parse(config)
    train_rows, held, _ = load_task(spec.data, spec.eval, spec.seed)
    evaluated = [r["problem"] for r in json.load(open(tmp_path / "run" / "eval" / "held_out.json"))["records"]]
    assert set(evaluated) <= {r["problem"] for r in held} and len(evaluated) == held_out["problems"]
    assert not set(evaluated) & {r["problem"] for r in train_rows} and len(train_rows) == 85


def test_own_parquet_file_trains(tmp_path):
    """The same in one parquet file with the default field names (problem, answer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = synthetic.generate(60, split="train", levels=(1,), seed=4)
    data = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"problem": [r["problem"] for r in rows],
                             "answer": [r["answer"] for r in rows]}), data)
    flags = [f"--config.{k}={v}" for k, v in {**TINY, "steps": 1, "eval.num_prompts": 8}.items()]
    train = subprocess.run(
        [sys.executable, "-m", "sspo_jax.train", "--config=configs/demo.py",
         f"--workdir={tmp_path / 'run'}", *flags, "--config.data.source=parquet",
         f"--config.data.path={data}"], cwd=mp.REPO, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"data: {data}: rows_read 60" in train.stdout
    rows_out = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows_out] == [0, 1]
    assert rows_out[0]["data/held_out_for_eval"] == 8 and rows_out[0]["eval/problems"] == 8
