"""The grading pool: adversarial outputs stay within timeout + 2 s, dead workers are replaced,
the pool keeps working afterwards, and the public grade()/reward() API."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import sspo_jax.rewards as rewards
from sspo_jax.rewards import Grader, reason_counts

TIMEOUT = 1.0  # per item, seconds: small to keep the suite fast
NORMAL = ([r"so \boxed{\frac{1}{2}}", r"\boxed{(1,2]}", "nothing here"], [r"0.5", "[1,2)", "3"])
NORMAL_REASONS = ["correct", "wrong", "no_answer"]

DEPTH = 10**5
ADVERSARIAL = {
    "power tower 10": r"\boxed{10^{10^{10^{10}}}}",
    "power tower 9 factorial": r"we get \boxed{9^{9^{9^{9}}}}!",
    "huge factorial": r"\boxed{(10^{9})!}",
    "nested braces in a box": r"\boxed{" + "{" * DEPTH + "1" + "}" * DEPTH + "}",
    "unclosed nested braces": r"\boxed{" + "{" * DEPTH,
    "1 MB of digits": "1" * 10**6,
    "1 MB of prose, no answer": "blah " * 200_000,
    "lone surrogates": "\ud800\udfff \\boxed{\udc80}",
    "hard symbolic work": r"\boxed{(x+1)^{10000} - (x-1)^{10000}}",
    "deep sqrt": r"\boxed{" + r"\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "division by zero": r"\boxed{\frac{1}{0}}",
    "variable tower": r"\boxed{\sqrt{x^{x^{x^{x}}}}}",
}


# Hostile to the multiple-choice reader (a letter gold): long runs where its phrase regex
# could backtrack. Each must be read in linear time, well inside the timeout.
LETTER_HOSTILE = {
    "option then 1 MB of spaces": "option" + " " * 10**6 + "x",
    "answer is then 1 MB of spaces": "the answer is" + " " * 10**6 + "x",
    "1 MB of 'option is '": "option is " * 100_000,
    "1 MB of choice lines": "A. no\n" * 160_000,
}


@pytest.fixture(scope="module")
def grader():
    with Grader(processes=2, kill_grace=1.0) as g:
        g.wait_until_ready()
        yield g


@pytest.mark.parametrize("name", sorted(LETTER_HOSTILE))
def test_letter_reading_is_linear_on_hostile_output(grader, name):
    grader.wait_until_ready()
    results = grader.grade([LETTER_HOSTILE[name], "The answer is (B)."], ["B", "B"], timeout=TIMEOUT)
    assert results[0].reason != "timeout" and results[0].score == 0.0, (name, results[0])
    assert results[1].reason == "correct"


def _assert_normal_batch_works(grader):
    results = grader.grade(*NORMAL, timeout=TIMEOUT)
    assert [r.reason for r in results] == NORMAL_REASONS


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_output_returns_in_time_and_pool_survives(grader, name):
    grader.wait_until_ready()  # a previous case may have had its worker killed and restarted
    start = time.monotonic()
    results = grader.grade([ADVERSARIAL[name], r"\boxed{5}"], ["5", "5"], timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + 2.0, f"{name}: batch took {elapsed:.2f} s"
    assert results[0].reason in ("timeout", "wrong", "no_answer"), (name, results[0])
    assert results[0].score == 0.0
    assert results[1].reason == "correct"
    _assert_normal_batch_works(grader)


def test_correct_answer_at_the_end_of_a_1mb_response_and_invalid_utf8(grader):
    responses = ["word " * 200_000 + r"\boxed{42}", b"\xff\xfe bad bytes \\boxed{42}", "\ud800 \\boxed{42}"]
    results = grader.grade(responses, ["42"] * 3, timeout=TIMEOUT)
    assert [r.reason for r in results] == ["correct"] * 3


def test_non_text_response_is_an_error_not_an_exception(grader):
    results = grader.grade([None, 7, r"\boxed{7}"], ["7", "7", "7"], timeout=TIMEOUT)
    assert [r.reason for r in results] == ["error", "error", "correct"]
    assert "NoneType" in results[0].detail and results[0].extracted is None
    assert reason_counts(results) == {"correct": 1, "wrong": 0, "no_answer": 0, "timeout": 0, "error": 2}


def test_killed_idle_workers_are_replaced(grader):
    grader.wait_until_ready()
    old = grader.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    # The timeout starts when an item is sent, i.e. after the replacements have warmed up.
    results = grader.grade([r"\boxed{3}"] * 6, ["3"] * 6, timeout=TIMEOUT)
    assert [r.reason for r in results] == ["correct"] * 6
    new = grader.worker_pids()
    assert len(new) == 2 and not set(new) & set(old)


def test_worker_killed_mid_item_is_replaced_and_item_retried(grader):
    grader.wait_until_ready()
    pids = grader.worker_pids()
    # Both workers are busy on a C-level computation; kill both 0.3 s in. The items are retried on
    # fresh workers (which then time out on them too), and the batch still returns every result.
    killer = threading.Timer(0.3, lambda: [os.kill(p, signal.SIGKILL) for p in pids])
    killer.start()
    results = grader.grade([ADVERSARIAL["power tower 10"]] * 2, ["5", "5"], timeout=TIMEOUT)
    killer.join()
    assert [r.reason for r in results] == ["timeout", "timeout"]
    assert not set(grader.worker_pids()) & set(pids)
    grader.wait_until_ready()
    _assert_normal_batch_works(grader)


def test_pool_is_reusable_and_closable():
    g = Grader(processes=1)
    for _ in range(3):
        assert g.grade([r"\boxed{2}"], ["2"], timeout=5.0)[0].reason == "correct"
    procs = [w.process for w in g._workers]
    g.close()
    g.close()  # idempotent
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([r"\boxed{2}"], ["2"])


def test_caller_errors_are_clear():
    g = Grader(processes=0, use_math_verify=False)
    with pytest.raises(ValueError, match="one gold per response"):
        g.grade(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="gold 1"):
        g.grade(["a", "b"], ["1", " "])
    with pytest.raises(ValueError, match="timeout"):
        g.grade(["a"], ["1"], timeout=0)
    with pytest.raises(ValueError, match="processes"):
        Grader(processes=-1)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        Grader(processes=0, memory_limit_mb=0)


def test_in_process_mode_grades_and_soft_times_out():
    g = Grader(processes=0)
    results = g.grade(*NORMAL, timeout=TIMEOUT)
    assert [r.reason for r in results] == NORMAL_REASONS
    assert g.worker_pids() == []
    # Pure-Python sympy work is interrupted by the alarm in the main thread.
    slow = g.grade([ADVERSARIAL["hard symbolic work"]], [r"(x+1)^{9999}"], timeout=0.2)
    assert slow[0].reason in ("timeout", "wrong")


def test_module_level_grade_and_reward():
    try:
        assert rewards.reward(r"\boxed{\dfrac{1}{2}}", "0.5") == 1.0
        assert rewards.reward(r"\boxed{3}", "4") == 0.0
        results = rewards.grade([r"\boxed{3}", "x"], ["3", "3"], timeout=5.0)
        assert [(r.score, r.reason, r.extracted) for r in results] == [(1.0, "correct", "3"), (0.0, "no_answer", None)]
        assert rewards.default_grader() is rewards.default_grader()
    finally:
        rewards.close_default_grader()


def test_worker_that_ignores_the_soft_timeout_is_killed(grader):
    # A stopped process cannot run its SIGALRM handler, like one stuck in C arithmetic: only the
    # parent's hard deadline (timeout + kill_grace) can end the item.
    grader.wait_until_ready()
    first = grader.worker_pids()[0]  # items go to the first idle worker
    stopper = threading.Timer(0.2, os.kill, (first, signal.SIGSTOP))
    stopper.start()
    start = time.monotonic()
    results = grader.grade([ADVERSARIAL["hard symbolic work"]], ["5"], timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    stopper.join()
    assert results[0].reason == "timeout"
    assert TIMEOUT + grader.kill_grace - 0.1 < elapsed < TIMEOUT + 2.0
    assert first not in grader.worker_pids()
    grader.wait_until_ready()
    _assert_normal_batch_works(grader)


def test_item_that_kills_two_workers_is_an_error(grader):
    grader.wait_until_ready()
    stop = threading.Event()

    def kill_busy_workers():  # stands in for an item that crashes whichever process grades it
        while not stop.is_set():
            for w in list(grader._workers):
                if w.task is not None and w.process.pid is not None:
                    try:
                        os.kill(w.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.05)

    killer = threading.Thread(target=kill_busy_workers)
    killer.start()
    try:
        results = grader.grade([ADVERSARIAL["hard symbolic work"]], ["5"], timeout=5.0)
    finally:
        stop.set()
        killer.join()
    assert results[0].reason == "error" and results[0].detail == "grading process died twice"
    grader.wait_until_ready()
    _assert_normal_batch_works(grader)


def test_default_grader_workers_exit_with_the_program():
    code = ("import sspo_jax.rewards as r; assert r.reward(r'\\boxed{2}', '2') == 1.0; "
            "print(*r.default_grader().worker_pids())")  # exits without closing anything
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert pids
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert not alive, f"grading processes {alive} outlived their program"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting to be reaped is not running
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_grading_at_module_level_under_spawn_says_how_to_fix_it(tmp_path):
    """A user script that grades at import time: the spawned workers re-import it and die; the
    error names the `if __name__ == '__main__':` guard."""
    import subprocess
    import sys
    script = tmp_path / "grade_now.py"
    script.write_text('from sspo_jax import rewards\nprint(rewards.grade(["so \\\\boxed{2}"], ["2"]))\n')
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("RuntimeError: grading")]
    assert said and "if __name__ == '__main__':" in said[-1], proc.stderr[-2000:]
