"""The shapes of one RL step as the plan sees them: rows, prompt and response slots, passes,
decode rows and steps of either rollout engine."""
from __future__ import annotations

import dataclasses
import math

from sspo_jax.plan.tables import PACKED_RESPONSE_FRACTION


@dataclasses.dataclass(frozen=True)
class Shapes:
    prompts: int        # prompts per step
    samples: int        # samples per prompt
    prompt_len: int     # padded prompt length (the sampler's bucket of max_prompt_len)
    new_tokens: int     # max_new_tokens: every row's response slots
    micro_rows: int     # train.micro_batch_size (global)
    per_pass: int       # prompts per sampler call (rollout.sample_batch_size, 0 = all)
    engine: str = "static"  # rollout.engine
    slots: int = 0      # rollout.slots: continuous decode slots per batch shard (0 = one per row)

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def passes(self) -> int:
        """Sampler calls per RL step; each decodes new_tokens steps over per_pass x samples rows."""
        return self.prompts // self.per_pass

    @property
    def pass_rows(self) -> int:
        return self.per_pass * self.samples

    @property
    def seq(self) -> int:
        """Slots per row, in the KV cache and in training: prompt + response."""
        return self.prompt_len + self.new_tokens

    def decode_rows(self, batch_shards: int) -> int:
        """Rows one decode step runs (global): a pass's rows, or the continuous engine's slots."""
        if self.engine != "continuous" or self.slots <= 0:
            return self.pass_rows
        return min(self.rows, self.slots * batch_shards)

    def decode_steps(self, batch_shards: int) -> int:
        """Decode steps per RL step. Static: max_new_tokens per pass (a row at the budget keeps
        every row going). Continuous: while rows queue every slot is busy, each row taking the
        assumed mean response (PACKED_RESPONSE_FRACTION of max_new_tokens); then the last rows
        drain, up to max_new_tokens."""
        if self.engine != "continuous":
            return self.passes * self.new_tokens
        slots = self.decode_rows(batch_shards)
        queued = self.rows - slots
        return self.new_tokens + math.ceil(queued * PACKED_RESPONSE_FRACTION * self.new_tokens / slots)


def rollout_shapes(config) -> Shapes:
    from sspo_jax.generate.sampler import bucket_length  # the sampler pads prompts to this length
    r = config.rollout
    per_pass = r.sample_batch_size or r.prompts_per_step
    if per_pass < 0 or r.prompts_per_step % per_pass:
        raise ValueError(f"rollout.sample_batch_size={per_pass} must divide rollout.prompts_per_step="
                         f"{r.prompts_per_step} (0 = all prompts in one sampler call)")
    engine = r.get("engine", "static")
    if engine == "continuous" and r.sample_batch_size:
        raise ValueError("rollout.sample_batch_size is the static engine's; the continuous engine "
                         "bounds memory by rollout.slots")
    return Shapes(r.prompts_per_step, r.num_samples, bucket_length(config.data.max_prompt_len),
                  r.max_new_tokens, config.train.micro_batch_size, per_pass, engine,
                  r.get("slots", 0))
