"""Every shipped config file loads, for every objective, and passes validation."""
import importlib.util
import os

import pytest

from sspo_jax import run_config, specs
from sspo_jax.rl import losses

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["demo.py", "demo_mechanisms.py", "qwen2_5_math_1_5b.py",
                                  "qwen2_5_math_7b.py"])
@pytest.mark.parametrize("preset", sorted(losses.PRESETS))
def test_config_is_valid_for_every_preset(tmp_path, name, preset):
    c = _load(name).get_config(preset)
    assert c.loss.name == preset
    if c.data.source == "jsonl":
        c.data.path = str(tmp_path / "math.jsonl")
        open(c.data.path, "w").close()
    specs.parse(c)
    cfg = run_config.loss_config(c.loss)
    # No silent per-config changes to the objective: only the demo's documented clip ranges.
    eps = run_config.DEMO_CLIP.get(preset) if name.startswith("demo") else None
    expected = losses.preset(preset) if eps is None else losses.preset(preset, eps_low=eps[0], eps_high=eps[1])
    assert cfg == expected


def test_swapping_the_objective_swaps_its_clip_range():
    # sspo_jax.compare replaces loss.name on one config: every objective must get its own
    # range (the demo's for SSPO and GSPO, the preset's 0.2 for GRPO), not the first preset's.
    c = run_config.get_config("sspo")
    for preset in ("grpo", "gspo", "sspo", "dapo"):
        c.loss.name = preset
        eps = run_config.DEMO_CLIP.get(preset)
        expected = losses.preset(preset) if eps is None else losses.preset(preset, eps_low=eps[0], eps_high=eps[1])
        assert run_config.loss_config(c.loss) == expected, preset
    assert run_config.loss_config(c.loss).eps_low == losses.preset("dapo").eps_low
    # A bound set on the config (the command line) wins for every objective; the other bound
    # still comes from the objective's own range.
    c.loss.eps_high = 0.3
    c.loss.name = "gspo"
    cfg = run_config.loss_config(c.loss)
    assert (cfg.eps_low, cfg.eps_high) == (run_config.DEMO_CLIP["gspo"][0], 0.3)
    c.loss.name = "grpo"
    assert run_config.loss_config(c.loss).eps_low == losses.preset("grpo").eps_low
    c.loss.eps_high = None
    c.loss.name = "gspo"
    c.loss.clip_by_preset.gspo = (0.1,)
    with pytest.raises(ValueError, match="clip_by_preset.gspo"):
        run_config.loss_config(c.loss)


def test_paper_configs_follow_the_spec():
    c = _load("qwen2_5_math_1_5b.py").get_config("sspo")
    assert (c.rollout.prompts_per_step, c.rollout.num_samples) == (128, 8)
    assert c.optimizer.lr == 1e-6 and c.optimizer.schedule == "constant"
    assert c.loss.kl_beta is None and losses.preset("sspo").kl_beta == 0
    assert c.rollout.max_new_tokens == 3000 and c.data.max_prompt_len + 3000 <= 4096
    assert c.train.ppo_mini_batches == 4 and c.data.template == "qwen25-math-cot"
    assert tuple(c.eval.benchmarks) == ("aime24", "amc23", "math500", "minerva_math", "olympiadbench")
    assert _load("qwen2_5_math_7b.py").get_config("grpo").model.hf_dir == "Qwen/Qwen2.5-Math-7B"


def test_cloud_urls_go_to_checkpoint_dir_not_workdir():
    c = run_config.get_config()
    assert run_config.checkpoint_dir(c, "runs/x") == os.path.join("runs/x", "checkpoints")
    c.checkpoint.dir = "gs://bucket/run"
    assert run_config.checkpoint_dir(c, "runs/x") == "gs://bucket/run"
    with pytest.raises(ValueError, match="--config.checkpoint.dir=gs://bucket/run"):
        run_config.check_workdir("gs://bucket/run")
    run_config.check_workdir("/mnt/shared/run")
