"""The CPU demo made to show the objectives' mechanisms (issue 20): longer chains of thought, so
each response has several subsentences, and two passes over each rollout batch in four
mini-batches, so most updates run on data the policy has already moved away from (off-policy),
where the clip ranges and the retained outliers differ between GRPO, GSPO and SSPO.

    python -m sspo_jax.compare --config=configs/demo_mechanisms.py --seeds=3 --workdir=DIR

What was measured with it, and why these settings, is in docs/training.md ("A demo where the
mechanisms show"). `--config=configs/demo_mechanisms.py:grpo` picks the loss, as for the demo.
"""
from sspo_jax.run_config import get_config as demo_config


def get_config(arg: str | None = None):
    c = demo_config(arg)
    c.data.synthetic_levels = (3, 4)   # 3-4 operations: 4-5 solution lines
    c.data.max_prompt_len = 64       # level-4 prompts are at most 60 tokens
    c.rollout.max_new_tokens = 72
    c.eval.max_new_tokens = 72
    c.eval.num_prompts = 200
    c.train.ppo_epochs = 2             # every rollout batch is used twice: the second pass is off-policy
    return c
