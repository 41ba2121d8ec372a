"""A workdir resumes only the run it holds: a changed config is refused with the fields named
(safe changes allowed when asked), and two runs never share a workdir."""
import os
import socket
import subprocess
import sys

import pytest
from test_train import tiny_config

from sspo_jax.train import loop
from sspo_jax.train import metrics as metrics_lib
from sspo_jax.train import run_record

RUN = {"steps": 1, "eval.every": 0, "warm_start.steps": 0}


@pytest.mark.slow
def test_resume_refuses_another_loss_and_allows_more_steps_when_asked(tmp_path):
    loop.train_and_evaluate(tiny_config(**RUN), str(tmp_path))
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    # Another objective in the same workdir (e.g. the default runs/demo): refused, named.
    with pytest.raises(ValueError, match=r"loss.name: 'sspo' -> 'grpo'.*use another --workdir"):
        loop.train_and_evaluate(tiny_config(**{**RUN, "loss.name": "grpo"}), str(tmp_path))
    with pytest.raises(ValueError, match=r"optimizer.lr: 0.0001 -> 0.001"):
        loop.train_and_evaluate(tiny_config(**{**RUN, "optimizer.lr": 1e-3}), str(tmp_path),
                                allow_config_change=True)  # not a safe change, even when asked
    # More steps: safe, but only when asked.
    with pytest.raises(ValueError, match=r"\(steps: 1 -> 2\); rerun with --allow_config_change"):
        loop.train_and_evaluate(tiny_config(**{**RUN, "steps": 2}), str(tmp_path))
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    rows = loop.train_and_evaluate(tiny_config(**{**RUN, "steps": 2}), str(tmp_path),
                                   allow_config_change=True)
    assert [r["step"] for r in rows] == [2]
    assert run_record.config_changes(str(tmp_path), tiny_config(**{**RUN, "steps": 2})) == {}
    assert not os.path.exists(tmp_path / run_record.LOCK_FILE)  # released at the end
    # Fewer steps than the checkpoint holds: nothing to train, said so.
    with pytest.raises(ValueError, match=r"at step 2; steps=1 is below it"):
        loop.train_and_evaluate(tiny_config(**RUN), str(tmp_path), allow_config_change=True)


def test_evaluate_and_export_refuse_another_model_than_the_run_recorded(tmp_path):
    from sspo_jax.train import setup
    setup.write_run_info(str(tmp_path), tiny_config(**RUN), None)
    run_record.check_reader(str(tmp_path), tiny_config(**{**RUN, "eval.num_prompts": 7}), "evaluate")
    run_record.check_reader(str(tmp_path / "no-record"), tiny_config(**RUN), "export")
    with pytest.raises(ValueError, match=r"model.tiny.hidden_size: 32 -> 48.*export would read"):
        run_record.check_reader(str(tmp_path), tiny_config(**{**RUN, "model.tiny.hidden_size": 48}),
                                "export")


def test_a_workdir_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    lock_file = tmp_path / run_record.LOCK_FILE
    host = socket.gethostname()
    # Another live process (here: pytest's parent) holds the workdir.
    lock_file.write_text(f"{host}:{os.getppid()}")
    with pytest.raises(RuntimeError, match=r"another run \(.*:%d: host:pid\) is training.*delete" % os.getppid()):
        run_record.WorkdirLock(str(tmp_path))
    assert lock_file.read_text() == f"{host}:{os.getppid()}"  # left alone
    # A lock left by a process that is gone (killed with SIGKILL), or by this very pid (a
    # restarted container), is taken over; the lock is released on exit.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for stale in (dead, str(os.getpid())):
        lock_file.write_text(f"{host}:{stale}")
        with run_record.WorkdirLock(str(tmp_path)) as lock:
            assert lock_file.read_text() == lock.mine == f"{host}:{os.getpid()}"
        assert not lock_file.exists()


def test_which_changes_are_safe_depends_on_where_the_evaluation_rows_come_from(tmp_path):
    own = tiny_config(**{"data.source": "jsonl", "data.path": "mine.jsonl"})
    (tmp_path / run_record.CONFIG_FILE).write_text(own.to_json_best_effort())
    assert run_record.check_resume(str(tmp_path), own, allow_changes=False) == {}
    more_eval = tiny_config(**{"data.source": "jsonl", "data.path": "mine.jsonl", "eval.num_prompts": 4})
    # The held-out rows come out of the training data: changing how many changes training.
    with pytest.raises(ValueError, match=r"cannot change on resume: \['eval.num_prompts'\]"):
        run_record.check_resume(str(tmp_path), more_eval, allow_changes=True)
    synthetic = tiny_config()
    (tmp_path / run_record.CONFIG_FILE).write_text(synthetic.to_json_best_effort())
    changed = tiny_config(**{"eval.num_prompts": 4, "steps": 9})
    assert run_record.check_resume(str(tmp_path), changed, allow_changes=True) == {
        "eval.num_prompts": (8, 4), "steps": (4, 9)}


def test_a_field_added_after_the_run_started_is_no_change_at_its_default(tmp_path):
    """A record written before a config field existed (here rollout.engine and rollout.slots)
    resumes with the field at its default (the behaviour the run had) and not at another value."""
    import json
    config = tiny_config(**RUN)
    record = json.loads(config.to_json_best_effort())
    del record["rollout"]["engine"], record["rollout"]["slots"]
    (tmp_path / run_record.CONFIG_FILE).write_text(json.dumps(record))
    assert run_record.config_changes(str(tmp_path), config) == {}
    changed = tiny_config(**{**RUN, "rollout.engine": "continuous", "rollout.slots": 4})
    assert run_record.config_changes(str(tmp_path), changed) == {
        "rollout.engine": (None, "continuous"), "rollout.slots": (None, 4)}


def test_the_objective_is_compared_as_resolved_not_as_spelled(tmp_path):
    """A demo run recorded before loss.clip_by_preset existed (its clip range spelled as
    eps_low / eps_high) resumes under today's config, which takes the same range from
    clip_by_preset; another range is still a change of the objective, and refused."""
    import json
    config = tiny_config(**RUN)
    assert config.loss.eps_low is None and config.loss.clip_by_preset.sspo == (0.05, 0.06)
    record = json.loads(config.to_json_best_effort())
    record["loss"]["eps_low"], record["loss"]["eps_high"] = 0.05, 0.06
    del record["loss"]["clip_by_preset"]
    (tmp_path / run_record.CONFIG_FILE).write_text(json.dumps(record))
    assert run_record.config_changes(str(tmp_path), config) == {}
    wider = tiny_config(**{**RUN, "loss.eps_high": 0.08})
    assert run_record.config_changes(str(tmp_path), wider) == {"loss.eps_high": (0.06, 0.08)}
    with pytest.raises(ValueError, match="loss.eps_high"):
        run_record.check_resume(str(tmp_path), wider, allow_changes=True)


def test_a_run_trained_with_another_tokenizer_is_refused(tmp_path):
    from sspo_jax.data.tokenizer import build_tokenizer
    tok = build_tokenizer()
    run_record.check_tokenizer(str(tmp_path), tok, record=False)       # no record: nothing to say
    assert not (tmp_path / run_record.TOKENIZER_FILE).exists()
    run_record.check_tokenizer(str(tmp_path), tok, record=True)        # the trainer records it
    run_record.check_tokenizer(str(tmp_path), build_tokenizer(), record=False)  # rebuilt: the same
    other = build_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match=r"another tokenizer \(vocabulary 452 tokens.*this one has 453"):
        run_record.check_tokenizer(str(tmp_path), other, record=True)
