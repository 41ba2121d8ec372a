"""The grain prompt pipeline: fixed shapes, seeded shuffling, epochs, resume, host shards, counters."""
import json

import numpy as np
import pytest

from sspo_jax.data.pipeline import PromptPipeline
from sspo_jax.data.templates import render_prompt
from sspo_jax.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_rows(n):
    return [{"problem": f"Tom has {i} apples.", "answer": str(i)} for i in range(n)]


def make_pipeline(tokenizer, rows=None, **overrides):
    settings = dict(batch_size=4, max_prompt_len=48, template="qwen25-math-cot", seed=0,
                    shard_index=0, shard_count=1)
    settings.update(overrides)
    return PromptPipeline(make_rows(10) if rows is None else rows, tokenizer, **settings)


def row_order(pipeline):
    """Row indices in the order this host yields them (padding rows left out)."""
    return [int(i) for batch in pipeline for i in batch["row_index"] if i >= 0]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key]


def test_batches_are_fixed_shape_and_left_padded_prompts(tokenizer):
    pipeline = make_pipeline(tokenizer, num_epochs=1, drop_remainder=False)
    batches = list(pipeline)
    assert len(batches) == len(pipeline) == 3
    for batch in batches:
        assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (4, 48)
        assert batch["prompt_ids"].dtype == batch["prompt_mask"].dtype == np.int32
        for b, index in enumerate(batch["row_index"]):
            ids, mask = batch["prompt_ids"][b], batch["prompt_mask"][b]
            if index < 0:
                assert not batch["row_valid"][b] and mask.sum() == 0 and batch["answer"][b] == ""
                assert (ids == tokenizer.pad_token_id).all()
                continue
            row = pipeline.rows[index]
            text = render_prompt(row["problem"], "qwen25-math-cot")
            expected = tokenizer(text, add_special_tokens=False)["input_ids"]
            start = 48 - len(expected)
            assert mask.tolist() == [0] * start + [1] * len(expected)
            assert ids[start:].tolist() == expected
            assert (ids[:start] == tokenizer.pad_token_id).all()
            assert batch["answer"][b] == row["answer"] and batch["problem"][b] == row["problem"]
    assert sum(int(b["row_valid"].sum()) for b in batches) == 10  # the last batch holds 2 pads


def test_shuffle_is_seeded(tokenizer):
    order = lambda **kw: row_order(make_pipeline(tokenizer, num_epochs=1, drop_remainder=False, **kw))
    assert order(seed=3) == order(seed=3)
    assert order(seed=3) != order(seed=4)
    assert sorted(order(seed=3)) == list(range(10))
    assert order(shuffle=False) == list(range(10))


def test_epochs_are_reshuffled_permutations_and_then_stop(tokenizer):
    pipeline = make_pipeline(tokenizer, rows=make_rows(8), num_epochs=3)
    order = row_order(pipeline)
    assert len(pipeline) == 6 and len(order) == 24
    epochs = [order[i * 8:(i + 1) * 8] for i in range(3)]
    assert all(sorted(epoch) == list(range(8)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    forever = make_pipeline(tokenizer, rows=make_rows(8), num_epochs=None).iterator()
    assert [int(i) for _ in range(6) for i in next(forever)["row_index"]] == order


def test_resume_from_saved_state_gives_the_identical_next_batches(tokenizer):
    # 10 rows, batches of 4: batch 3 crosses the first epoch boundary.
    reference = make_pipeline(tokenizer, seed=7).iterator()
    for _ in range(2):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))  # what orbax writes and reads
    expected = [next(reference) for _ in range(3)]
    resumed = make_pipeline(tokenizer, seed=7).iterator()  # a rebuilt pipeline
    first = next(make_pipeline(tokenizer, seed=7).iterator())
    assert first["row_index"].tolist() != expected[0]["row_index"].tolist()  # resuming matters
    resumed.set_state(state)
    for batch in expected:
        assert_batches_equal(next(resumed), batch)


def test_resume_through_an_orbax_checkpoint_manager(tokenizer, tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    iterator = make_pipeline(tokenizer, seed=1).iterator()
    for _ in range(3):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = next(iterator)
    restored = make_pipeline(tokenizer, seed=1).iterator()
    first = next(make_pipeline(tokenizer, seed=1).iterator())
    assert first["row_index"].tolist() != expected["row_index"].tolist()  # resuming matters
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(next(restored), expected)


def test_a_state_from_another_pipeline_is_refused(tokenizer):
    state = make_pipeline(tokenizer, seed=0).iterator().get_state()
    with pytest.raises(ValueError, match="saved by a pipeline with other rows or settings"):
        make_pipeline(tokenizer, seed=1).iterator().set_state(state)
    with pytest.raises(ValueError, match="other rows or settings"):
        make_pipeline(tokenizer, rows=make_rows(11)).iterator().set_state(state)


@pytest.mark.parametrize("shuffle", [True, False])
def test_host_shards_are_disjoint_cover_the_data_and_have_equal_lengths(tokenizer, shuffle):
    shards = [
        make_pipeline(tokenizer, batch_size=2, num_epochs=2, drop_remainder=False, shuffle=shuffle,
                      shard_index=i, shard_count=3)
        for i in range(3)
    ]
    assert len({len(p) for p in shards}) == 1  # hosts stay in lockstep
    # ceil(10 / 3) = 4 rows per host per epoch, two padding rows in all.
    orders = [[int(i) for b in p for i in b["row_index"]] for p in shards]
    for epoch in range(2):
        seen = [i for order in orders for i in order[epoch * 4:(epoch + 1) * 4] if i >= 0]
        assert sorted(seen) == list(range(10))  # disjoint and covering


def test_dropping_shards_are_disjoint_and_equal(tokenizer):
    shards = [make_pipeline(tokenizer, batch_size=3, num_epochs=1, shard_index=i, shard_count=3) for i in range(3)]
    orders = [row_order(p) for p in shards]
    assert [len(order) for order in orders] == [3, 3, 3]
    assert len(set(sum(orders, []))) == 9  # one row of 10 cut so the shards are equal


def test_shard_defaults_come_from_jax(tokenizer):
    import jax

    assert (jax.process_index(), jax.process_count()) == (0, 1)
    pipeline = PromptPipeline(make_rows(4), tokenizer, batch_size=2, max_prompt_len=48, num_epochs=1)
    assert sorted(row_order(pipeline)) == [0, 1, 2, 3]  # one host: it sees every row


def test_long_prompts_are_dropped_or_truncated_and_counted(tokenizer, tmp_path):
    rows = make_rows(6) + [{"problem": "Tom has 1 apples." * 10, "answer": "1"}] * 2
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "oops\n" + json.dumps({"problem": "x"}) + "\n")
    long_ids = tokenizer(render_prompt(rows[-1]["problem"], "qwen25-math-cot"))["input_ids"]
    assert len(long_ids) > 48

    dropped = make_pipeline(tokenizer, rows=path, num_epochs=1)
    assert dropped.stats == {
        "rows_read": 10, "skipped_not_json": 1, "skipped_missing_field": 1, "skipped_empty": 0,
        "dropped_too_long": 2, "truncated": 0, "rows_used": 6,
    }
    truncated = make_pipeline(tokenizer, rows=path, num_epochs=1, overlong="truncate", shuffle=False)
    assert truncated.stats["truncated"] == 2 and truncated.stats["dropped_too_long"] == 0
    assert truncated.stats["rows_used"] == 8
    last = list(truncated)[-1]
    assert last["prompt_ids"][-1].tolist() == long_ids[-48:]  # the end, assistant header included
    assert last["prompt_mask"][-1].all()
    with pytest.raises(ValueError, match="row 9 skipped"):
        make_pipeline(tokenizer, rows=path, strict=True)


def test_bad_settings_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="all 10 prompts are longer than max_prompt_len=5"):
        make_pipeline(tokenizer, max_prompt_len=5)
    with pytest.raises(ValueError, match="overlong"):
        make_pipeline(tokenizer, overlong="cut")
    with pytest.raises(ValueError, match="cannot fill one batch"):
        make_pipeline(tokenizer, batch_size=16, num_epochs=1)
    with pytest.raises(ValueError, match="cannot feed 4 hosts"):
        make_pipeline(tokenizer, rows=make_rows(3), shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="shard_index=2"):
        make_pipeline(tokenizer, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="num_epochs"):
        make_pipeline(tokenizer, num_epochs=0)

    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="no pad token"):
        PromptPipeline(make_rows(2), NoPad(), batch_size=1, max_prompt_len=8, shard_index=0, shard_count=1)
