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


def test_a_workdir_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    live = run_record.WorkdirLock(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"another run \(.*:%d: host:pid\) is training" % os.getpid()):
        run_record.WorkdirLock(str(tmp_path))
    live.release()
    assert not os.path.exists(tmp_path / run_record.LOCK_FILE)
    # A lock left by a process that is gone (killed with SIGKILL) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / run_record.LOCK_FILE).write_text(f"{socket.gethostname()}:{dead}")
    with run_record.WorkdirLock(str(tmp_path)) as lock:
        assert (tmp_path / run_record.LOCK_FILE).read_text() == lock.mine
    assert not os.path.exists(tmp_path / run_record.LOCK_FILE)
