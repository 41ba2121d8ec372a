"""The config parsed once into typed, frozen specs: every block, field for field, and the
errors a user sees (each names the field)."""
import dataclasses

import pytest
from ml_collections import ConfigDict

from sspo_jax import run_config, specs
from sspo_jax.rl.losses import LossConfig


def test_every_config_block_becomes_its_frozen_spec_with_the_same_values():
    c = run_config.get_config("grpo")
    spec = specs.parse(c)
    assert isinstance(spec.loss, LossConfig) and spec.loss == run_config.loss_config(c.loss)
    for name, cls in specs._BLOCKS.items():
        block = getattr(spec, name)
        assert isinstance(block, cls), name
        for f in dataclasses.fields(cls):
            value = c[name][f.name]
            want = tuple(sorted(value.items())) if isinstance(value, (dict, ConfigDict)) else value
            assert getattr(block, f.name) == (tuple(want) if isinstance(want, list) else want), (name, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(block, dataclasses.fields(cls)[0].name, None)
    hash(spec)  # hashable all the way down: usable as a static jit argument
    assert (spec.seed, spec.steps) == (c.seed, c.steps)
    assert spec.optimizer_steps == c.steps * c.train.ppo_mini_batches * c.train.ppo_epochs
    assert spec.rollout.rows == c.rollout.prompts_per_step * c.rollout.num_samples


def test_unknown_fields_and_bad_values_are_named():
    c = run_config.get_config()
    c.unlock()
    c.rollout.sampels = 4
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rollout.sampels'\]"):
        specs.parse(c)
    cases = [("rollout", "num_samples", 1, "rollout.num_samples=1"),
             ("optimizer", "schedule", "linear", "optimizer.schedule='linear'"),
             ("reward", "overlong_buffer", 10_000, "reward.overlong_buffer=10000"),
             ("compile_cache", "min_compile_secs", -1.0, "compile_cache.min_compile_secs=-1.0"),
             ("model", "dtype", "float16", "model.dtype='float16'"),
             # the sampler's and grader's values, which used to fail only after the warm start
             ("rollout", "temperature", -1.0, "rollout.temperature=-1.0"),
             ("rollout", "top_p", 1.5, "rollout.top_p=1.5"),
             ("rollout", "top_k", -3, "rollout.top_k=-3"),
             ("rollout", "grading_timeout", 0.0, "rollout.grading_timeout=0.0"),
             ("model", "remat", "some", "model.remat='some'"),
             ("data", "template", "chatml", "data.template='chatml'"),
             ("eval", "benchmarks", ("math5000",), "unknown ['math5000']"),
             ("eval", "top_p", 0.0, "eval.top_p=0.0"),
             ("warm_start", "batch_size", 10_000, "batch_size=10000"),
             ("optimizer", "b2", 1.0, "b2=1.0")]
    for block, field, value, message in cases:
        c = run_config.get_config()
        c[block][field] = value
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
            specs.parse(c)
    with pytest.raises(ValueError, match="split 3 ways by the mesh"):
        specs.parse(run_config.get_config(), batch_shards=3)


def test_evaluation_and_export_parse_without_the_training_data(tmp_path):
    c = run_config.get_config()
    c.data.source, c.data.path = "jsonl", str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="data.path=.*does not exist"):
        specs.parse(c)
    assert specs.parse(c, training_data=False).data.path == c.data.path
