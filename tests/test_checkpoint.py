"""Checkpoints restore exactly: arrays bit for bit, shardings as asked, JSON meta as saved; each
item can be read alone."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sspo_jax.parallel import abstract
from sspo_jax.train.checkpoint import Checkpointer, PreemptionWatcher


def _state(seed):
    k = jax.random.key(seed)
    k1, k2 = jax.random.split(k)
    return {
        "params": {"w": jax.random.normal(k1, (8, 4)), "b": jnp.arange(4, dtype=jnp.bfloat16)},
        "opt": {"mu": jax.random.normal(k2, (8, 4)), "count": jnp.array(7, jnp.int32)},
        "extra": {"rng": jax.random.key_data(k), "step": jnp.array(seed, jnp.int32)},
    }


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_and_keep_last(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, keep=2)
    saved = {}
    for step in range(0, 8):
        state = _state(step)
        if ckpt.save(step, state, meta={"data": {"epoch": 0, "index": step * 3}}):
            saved[step] = state
    ckpt.wait()
    assert sorted(saved) == [0, 2, 4, 6]
    assert ckpt.all_steps() == [0, 4, 6]  # keep=2 deleted step 2; step 0 is always kept
    assert ckpt.latest_step() == 6
    restored, meta = ckpt.restore(_state(0))
    _assert_same(restored, saved[6])
    assert meta == {"data": {"epoch": 0, "index": 18}}
    restored4, meta4 = ckpt.restore(_state(0), step=4)
    _assert_same(restored4, saved[4])
    assert meta4["data"]["index"] == 12
    ckpt.close()


def test_force_save_off_interval_and_reopen(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=100, keep=3)
    assert not ckpt.save(5, _state(5))
    assert ckpt.save(5, _state(5), meta={"why": "preempted"}, force=True)
    ckpt.close()
    # A new process (here: a new manager on the same directory) sees the checkpoint.
    again = Checkpointer(tmp_path, save_every=100)
    assert again.latest_step() == 5
    state, meta = again.restore(_state(0))
    _assert_same(state, _state(5))
    assert meta == {"why": "preempted"}
    again.close()


def test_restore_into_sharding(tmp_path):
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("fsdp", "tensor"))
    ckpt = Checkpointer(tmp_path, save_every=1)
    state = _state(3)
    ckpt.save(1, state)
    ckpt.wait()
    target = NamedSharding(mesh, P("fsdp", "tensor"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target)
    restored, _ = ckpt.restore(abstract)
    assert restored["params"]["w"].sharding.is_equivalent_to(target, 2)
    _assert_same(restored, state)
    ckpt.close()


def test_one_item_is_read_alone(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1)
    state = _state(2)
    ckpt.save(3, state, meta={"n": 1})
    ckpt.wait()
    restored, meta = ckpt.restore({"params": abstract(state["params"])})
    assert set(restored) == {"params"} and meta == {"n": 1}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    _assert_same(restored["params"], state["params"])
    with pytest.raises(FileNotFoundError, match="no item 'moments'"):
        ckpt.restore({"moments": abstract(state["opt"])})
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save(4, {"meta": state["params"]})
    ckpt.close()


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    ckpt = Checkpointer(tmp_path / "empty", save_every=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        ckpt.restore(_state(0))
    ckpt.save(1, _state(1))
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match="step 9"):
        ckpt.restore(_state(0), step=9)
    ckpt.close()


def test_sigterm_sets_the_flag_instead_of_killing():
    watcher = PreemptionWatcher()
    try:
        assert not watcher.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested()
    finally:
        watcher.restore_handlers()


def _corrupt(step_dir, kind):
    """One way a newest checkpoint breaks: a data file truncated or zeroed, the arrays' manifest
    or the JSON metadata (the data iterator's state) gone."""
    data = sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)[-1]
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "zeroed":
        data.write_bytes(bytes(data.stat().st_size))
    elif kind == "no_manifest":
        for p in step_dir.rglob("manifest.ocdbt"):
            p.unlink()
    elif kind == "no_metadata":
        (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "no_manifest", "no_metadata"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, kind, caplog):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), meta={"step": step})
    ckpt.close()
    _corrupt(tmp_path / "3", kind)
    again = Checkpointer(tmp_path, save_every=1, keep=5)
    with caplog.at_level("WARNING"):
        step, items, meta = again.restore_latest(_state(0))
    assert step == 2 and meta == {"step": 2}
    _assert_same(items, _state(2))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint 3" in said and "unreadable" in said and "resuming from checkpoint 2" in said
    # Moved aside (kept for a look), so the resumed run can save its step 3 again.
    assert (tmp_path / "3.unreadable").is_dir() and again.all_steps() == [1, 2]
    assert again.save(3, _state(5), meta={"step": 3}, force=True)
    again.wait()
    _assert_same(again.restore(_state(0), step=3)[0], _state(5))
    again.close()


def test_no_checkpoint_restores_names_every_step(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, _state(1))
    ckpt.close()
    _corrupt(tmp_path / "1", "zeroed")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* restores \(step 1: "):
        Checkpointer(tmp_path, save_every=1).restore_latest(_state(0))


def test_a_failed_save_stops_the_run_with_the_step_and_the_fix(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=True)
    assert ckpt.save(1, _state(1))
    ckpt.wait()

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", full_disk)
    with pytest.raises(RuntimeError, match=r"the save of step 2 .* failed \(OSError: .*No space left"
                                           r".*newest complete checkpoint is step 1: fix the cause"):
        ckpt.save(2, _state(2))
    monkeypatch.undo()
    # A background save that failed surfaces at the next save (and at close), not later.
    monkeypatch.setattr(ckpt._manager, "check_for_errors", full_disk)
    with pytest.raises(RuntimeError, match="an earlier background save"):
        ckpt.save(3, _state(3))
    with pytest.raises(RuntimeError, match="a background save"):
        ckpt.close()


def test_abandon_after_an_error_finishes_the_save_in_flight_and_removes_temp_dirs(tmp_path):
    """What the trainer does when a step fails (train/loop.py's cleanup): the background save
    completes, a temporary directory left by an interrupted earlier write is removed, nothing
    raises, and a second abandon or close is harmless."""
    big = {"w": jnp.ones((2048, 2048), jnp.float32)}  # 16 MB: still writing when abandon starts
    ckpt = Checkpointer(tmp_path / "c", save_every=1, async_save=True)
    ckpt.save(0, {"params": _state(0)["params"]}, force=True)
    ckpt.wait()
    leftover = tmp_path / "c" / "5.orbax-checkpoint-tmp-1234"
    leftover.mkdir()
    (leftover / "partial").write_bytes(b"x")
    ckpt.save(1, {"params": big}, {"note": "in flight"}, force=True)
    ckpt.abandon()
    ckpt.abandon()
    assert sorted(os.listdir(tmp_path / "c")) == ["0", "1"]
    items, meta = Checkpointer(tmp_path / "c", save_every=1).restore({"params": abstract(big)})
    assert meta == {"note": "in flight"}
    _assert_same(items["params"], big)


def test_a_checkpointer_as_context_abandons_on_error_only(tmp_path, monkeypatch):
    calls = []
    ckpt = Checkpointer(tmp_path / "c", save_every=1)
    monkeypatch.setattr(ckpt, "abandon", lambda: calls.append("abandon"))
    with ckpt:
        pass
    with pytest.raises(KeyError):
        with ckpt:
            raise KeyError("boom")
    assert calls == ["abandon"]
    ckpt.close()
