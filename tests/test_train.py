"""The training program end to end on CPU: files written, NaN steps skipped, bad configs refused
before compiling, and a run killed with SIGKILL resumes to exactly the uninterrupted metrics."""
import json
import os
import signal
import subprocess
import sys
import time

import multiproc as mp
import pytest

from sspo_jax import specs
from sspo_jax.train import loop
from sspo_jax.train import metrics as metrics_lib

# A very small demo: enough to exercise every stage, a few seconds per step on 2 cores.
TINY = {
    "steps": 4, "warm_start.steps": 5, "warm_start.examples": 64, "warm_start.batch_size": 8,
    "rollout.prompts_per_step": 4, "rollout.num_samples": 4, "rollout.max_new_tokens": 24,
    "train.ppo_mini_batches": 2, "train.micro_batch_size": 4, "eval.every": 2,
    "eval.num_prompts": 8, "eval.max_new_tokens": 24, "checkpoint.every": 1,
    "data.synthetic_train_size": 200, "model.tiny.hidden_size": 32,
    "model.tiny.intermediate_size": 64, "mesh.devices": 1,
}
# Timing metrics differ between any two runs; everything else must be identical.
TIMING = ("time/", "tokens_per_s", "train_tokens_per_s")


def tiny_config(**extra):
    return mp.config_with({**TINY, **extra})


def _cli(workdir, **extra):
    flags = [f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]
    return [sys.executable, "-m", "sspo_jax.train", "--config=configs/demo.py",
            f"--workdir={workdir}", *flags]


def _start_and_wait_for_step(cmd, jsonl, step, log_path, timeout=900):
    """Starts the training CLI (output to log_path, so no pipe can fill up and block it) and
    returns once metrics.jsonl has a row of `step` or later (or the process ended)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(jsonl) and any(r["step"] >= step for r in metrics_lib.read_jsonl(jsonl)):
            break
        time.sleep(0.2)
    return proc


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_cli(tmp_path / "full"), cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = metrics_lib.read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in reference] == [0, 1, 2, 3, 4]

    killed_dir = tmp_path / "killed"
    jsonl = killed_dir / "metrics.jsonl"
    proc = _start_and_wait_for_step(_cli(killed_dir), jsonl, 2, tmp_path / "killed.log")
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(_cli(killed_dir), cwd=repo, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from the checkpoint of step" in rerun.stdout
    resumed = metrics_lib.read_jsonl(jsonl)
    assert _comparable(resumed) == _comparable(reference)


@pytest.mark.slow
def test_nan_step_is_skipped_and_the_run_goes_on(tmp_path):
    rows = loop.train_and_evaluate(tiny_config(**{"debug.inject_nan_step": 2, "steps": 3,
                                                   "eval.every": 0}), str(tmp_path))
    by_step = {r["step"]: r for r in rows}
    assert by_step[2]["skipped_updates"] >= 1 and by_step[2]["bad_steps_total"] == 1
    assert by_step[1]["skipped_updates"] == 0 and by_step[3]["skipped_updates"] == 0
    assert by_step[3]["bad_steps_total"] == 1
    for name in ("metrics.jsonl", "config.json", "run_info.json", "summary.md", "curves.png"):
        assert os.path.exists(tmp_path / name), name
    assert "finished: step 3 of 3" in (tmp_path / "summary.md").read_text()
    assert os.listdir(tmp_path / "tensorboard")
    info = json.load(open(tmp_path / "run_info.json"))
    assert info["versions"]["jax"] and info["devices"]


@pytest.mark.parametrize("overrides,message", [
    ({"train.ppo_mini_batches": 3}, "not divisible into train.ppo_mini_batches=3"),
    ({"train.micro_batch_size": 3}, "micro-batches of train.micro_batch_size=3"),
    ({"loss.name": "ppo2"}, "unknown loss preset 'ppo2'"),
    ({"model.hf_dir": "/no/such/checkpoint"}, "model.hf_dir='/no/such/checkpoint'"),
    ({"rollout.num_samples": 1}, "num_samples=1"),
    ({"rollout.old_logprobs": "cache"}, "old_logprobs='cache'"),
    ({"data.source": "jsonl", "data.path": "/no/file.jsonl"}, "data.path='/no/file.jsonl'"),
    ({"optimizer.schedule": "linear"}, "optimizer.schedule='linear'"),
    ({"loss.eps_low": 1.5}, "eps_low"),
    ({"rollout.top_k": -3}, "rollout.top_k=-3"),  # before the warm start, not after it
    ({"train.max_tokens_per_micro_batch": 4096}, "applies to packed rows only"),
    ({"train.packing": True, "train.max_tokens_per_micro_batch": 50}, "holds less than one packed row"),
])
def test_bad_config_fails_before_anything_compiles(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_kl_to_the_starting_policy_and_recomputed_old_logprobs(tmp_path):
    rows = loop.train_and_evaluate(
        tiny_config(**{"loss.kl_beta": 0.1, "rollout.old_logprobs": "recompute", "steps": 2,
                       "eval.every": 0}), str(tmp_path))
    for row in rows[1:]:
        assert row["kl_ref"] >= 0 and row["kl_ref"] == row["kl_ref"]  # k3 >= 0, not NaN
    # Step 1 starts from the reference itself, so its KL is tiny; it grows as the policy moves.
    assert rows[1]["kl_ref"] < 1e-3 and rows[2]["kl_ref"] > rows[1]["kl_ref"]


@pytest.mark.slow
def test_too_many_bad_steps_in_a_row_stop_the_run_with_a_message(tmp_path):
    config = tiny_config(**{"debug.inject_nan_step": 1, "train.max_bad_steps": 1, "steps": 3,
                            "eval.every": 0, "warm_start.steps": 0})
    with pytest.raises(RuntimeError, match=r"1 steps in a row had non-finite losses"):
        loop.train_and_evaluate(config, str(tmp_path))
    rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 1 and rows[-1]["skipped_updates"] >= 1


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    log = tmp_path.parent / f"{tmp_path.name}-sigterm.log"
    proc = _start_and_wait_for_step(_cli(tmp_path, steps=50, **{"checkpoint.every": 100}), jsonl,
                                    1, log)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    err = open(log).read()
    assert proc.returncode == 0, err[-3000:]
    last = max(r["step"] for r in metrics_lib.read_jsonl(jsonl))
    assert 1 <= last < 50
    assert "SIGTERM: saved the checkpoint of step" in err
    from sspo_jax.train.checkpoint import Checkpointer
    assert Checkpointer(tmp_path / "checkpoints", save_every=1).latest_step() == last
    # The report says where the run stopped, not that it finished.
    assert f"stopped at step {last} of 50 (SIGTERM)" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_an_error_after_an_async_save_is_one_line_and_a_corrupt_checkpoint_is_skipped(tmp_path):
    """A run that fails while a background save is in flight: exit status 1, under 30 lines
    ending in the error, no orbax noise, no temporary checkpoint directory. Then its newest
    checkpoint is truncated on disk: the rerun says so, resumes from the one before and
    finishes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = _cli(tmp_path, steps=3, **{"eval.every": 0, "debug.raise_at_step": 2})
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) < 30, "\n".join(lines)
    assert lines[-1].startswith("error: debug.raise_at_step=2: the injected failure"), lines[-5:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    ckpt = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["0", "1", "2"]  # the save in flight completed
    assert not (tmp_path / ".lock").exists()

    from test_checkpoint import _corrupt
    _corrupt(ckpt / "2", "truncated")
    rerun = subprocess.run(_cli(tmp_path, steps=3, **{"eval.every": 0}) + ["--allow_config_change"],
                           cwd=repo, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoint 2" in rerun.stderr and "unreadable" in rerun.stderr, rerun.stderr[-3000:]
    assert "resumed from the checkpoint of step 1" in rerun.stdout
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_sampling_in_passes_gives_the_rows_of_one_call():
    """rollout.sample_batch_size splits the sampler call; greedy rows do not depend on it."""
    import types

    import jax
    import numpy as np
    from flax import nnx

    from sspo_jax import model as M
    from sspo_jax.generate import sampler
    from sspo_jax.train import rollout
    cfg = M.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=64)
    model = M.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    lengths = [3, 7, 5, 2]
    ids = rng.integers(2, 64, (4, 8)).astype(np.int32)
    mask = (np.arange(8)[None] >= 8 - np.array(lengths)[:, None]).astype(np.int32)
    batch = {"prompt_ids": ids, "prompt_mask": mask}
    settings = dict(num_samples=2, max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0,
                    engine="static", slots=0, chunk_steps=32)
    one = rollout.sample_passes(model, batch, jax.random.key(0), types.SimpleNamespace(sample_batch_size=0, **settings), (1,), 0)
    two = rollout.sample_passes(model, batch, jax.random.key(0), types.SimpleNamespace(sample_batch_size=2, **settings), (1,), 0)
    assert isinstance(two, sampler.GenerateOutput) and two.tokens.shape == (8, 6)
    # Decode steps and slot-steps add over the passes: 2 passes of 6 steps x 4 rows, against
    # one pass of 6 steps x 8 rows.
    assert int(two.decode_steps) == 12 == 2 * int(one.decode_steps)
    assert int(two.slot_steps) == 48 == int(one.slot_steps)
    np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(two.logprobs), np.asarray(one.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="rollout.sample_batch_size=3 must divide"):
        specs.parse(tiny_config(**{"rollout.sample_batch_size": 3}))


@pytest.mark.slow
def test_packed_run_equals_the_padded_run_step_for_step(tmp_path):
    """train.packing=True (padding-free rows, micro-batches of a token budget) against the same
    run padded, with the KL term and recomputed old log-probs on the packed layout too: every
    loss and evaluation metric within float32 rounding (relative 1e-4 over 3 steps, where the
    updates' rounding differences compound), the packing's own metrics added."""
    common = {"loss.kl_beta": 0.05, "rollout.old_logprobs": "recompute", "steps": 3, "eval.every": 3}
    padded = loop.train_and_evaluate(tiny_config(**common), str(tmp_path / "padded"))
    packed = loop.train_and_evaluate(tiny_config(**common, **{
        "train.packing": True, "train.max_tokens_per_micro_batch": 2 * (48 + 24)}),  # 2 rows per micro-batch
        str(tmp_path / "packed"))
    assert [r["step"] for r in packed] == [r["step"] for r in padded]
    for a, b in zip(packed[1:], padded[1:]):
        assert 0 < a["packing/padding_frac"] < 1 and a["packing/rows"] > 0
        for k, v in b.items():
            if k.startswith(TIMING) or not isinstance(v, float):
                continue
            assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (a["step"], k, a[k], v)
