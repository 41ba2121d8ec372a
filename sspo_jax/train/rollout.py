"""One RL step's rollout: sample `num_samples` responses per prompt, decode them, grade them.

With the continuous engine on one process, each row is decoded and handed to the grading pool
as soon as it finishes (a background thread waits on the pool), so grading overlaps the decoding
of the rows still running; otherwise the rows are graded once sampling is done, each process
grading its block (train/grading.py).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import jax

from sspo_jax.generate import sampler
from sspo_jax.parallel import to_numpy
from sspo_jax.train import evaluation, grading


@dataclasses.dataclass
class Rollout:
    sample: sampler.GenerateOutput
    texts: list[str]
    graded: list          # rewards.GradeResult per row
    sampling_s: float     # sampling (prefill + decode) wall time
    grading_s: float      # grading time not hidden behind sampling

    def metrics(self) -> dict[str, float]:
        """Decode steps, slot occupancy (real tokens / slot-steps), padding row-steps."""
        tokens = int(to_numpy(self.sample.lengths).sum())
        slot_steps = int(to_numpy(self.sample.slot_steps))
        return {"rollout/decode_steps": int(to_numpy(self.sample.decode_steps)),
                "rollout/slot_occupancy": tokens / max(slot_steps, 1),
                "rollout/padding_row_steps": slot_steps - tokens,
                "tokens_per_s": tokens / max(self.sampling_s, 1e-9)}


def sample_and_grade(model, batch, key, r, eos_ids, pad_id, tokenizer, grader) -> Rollout:
    """r: the RolloutSpec. Rows prompt-major; golds repeated per sample."""
    golds = [a for a in batch["answer"] for _ in range(r.num_samples)]
    t0 = time.time()
    if r.engine == "continuous" and jax.process_count() == 1:
        return _streamed(model, batch, key, r, eos_ids, pad_id, tokenizer, grader, golds, t0)
    sample = sample_passes(model, batch, key, r, eos_ids, pad_id)
    jax.block_until_ready(sample.tokens)
    t_sample = time.time() - t0
    texts = evaluation.decode_responses(tokenizer, sample.tokens, sample.mask)
    graded = grading.grade_across_hosts(grader, texts, golds, r.grading_timeout)
    return Rollout(sample, texts, graded, t_sample, time.time() - t0 - t_sample)


def _streamed(model, batch, key, r, eos_ids, pad_id, tokenizer, grader, golds, t0) -> Rollout:
    rows = len(golds)
    texts, graded, pending = [None] * rows, [None] * rows, []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grading") as pool:
        def on_finished(done_rows, tokens, mask):
            done_texts = evaluation.decode_responses(tokenizer, tokens, mask)
            for i, text in zip(done_rows, done_texts):
                texts[i] = text
            pending.append((done_rows, pool.submit(grader.grade, done_texts, [golds[i] for i in done_rows],
                                                   timeout=r.grading_timeout)))

        sample = sampler.generate(
            model, batch["prompt_ids"], batch["prompt_mask"], key, num_samples=r.num_samples,
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            eos_ids=eos_ids, pad_id=pad_id, engine="continuous", slots=r.slots,
            chunk_steps=r.chunk_steps, on_finished=on_finished)
        jax.block_until_ready(sample.tokens)
        t_sample = time.time() - t0
        for done_rows, future in pending:
            for i, result in zip(done_rows, future.result()):
                graded[i] = result
    missing = [i for i, g in enumerate(graded) if g is None]
    if missing:  # every row finishes inside the engine; a gap is a bug, not a zero reward
        raise RuntimeError(f"the continuous engine streamed no result for rows {missing[:10]}")
    return Rollout(sample, texts, graded, t_sample, time.time() - t0 - t_sample)


def sample_passes(model, batch, key, r, eos_ids, pad_id) -> sampler.GenerateOutput:
    """`r.num_samples` responses per prompt, in passes of `r.sample_batch_size` prompts (one call
    when 0; the continuous engine always takes one); pass i draws from fold_in(key, i), a single
    pass from `key` itself."""
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    per_pass = r.sample_batch_size or ids.shape[0]
    passes = ids.shape[0] // per_pass
    outs = []
    for i in range(passes):
        rows = slice(i * per_pass, (i + 1) * per_pass)
        outs.append(sampler.generate(
            model, ids[rows], mask[rows], key if passes == 1 else jax.random.fold_in(key, i),
            num_samples=r.num_samples, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
            top_p=r.top_p, top_k=r.top_k, eos_ids=eos_ids, pad_id=pad_id,
            engine=r.engine, slots=r.slots, chunk_steps=r.chunk_steps))
    if passes == 1:
        return outs[0]
    return concat_outputs(outs)


def concat_outputs(outs) -> sampler.GenerateOutput:
    """Passes joined: rows concatenated, decode and slot steps added."""
    per_row = {f: jax.numpy.concatenate([getattr(o, f) for o in outs])
               for f in ("tokens", "logprobs", "mask", "lengths", "truncated", "entropy")}
    return sampler.GenerateOutput(**per_row, decode_steps=sum(o.decode_steps for o in outs),
                                  slot_steps=sum(o.slot_steps for o in outs))
