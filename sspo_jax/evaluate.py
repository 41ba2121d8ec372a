"""Accuracy of a policy on a set of problems: greedy pass@1, or avg@k / pass@k when sampling.

The same prompt pipeline, sampler and grader as training, so an evaluation number and a
training reward mean the same thing.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from sspo_jax import rewards as rewards_lib
from sspo_jax import sampling
from sspo_jax.data.pipeline import PromptPipeline


def evaluate_rows(model, tokenizer, rows: Sequence[dict], *, template: str, max_prompt_len: int,
                  max_new_tokens: int, batch_size: int, grader: rewards_lib.Grader,
                  timeout: float = 5.0, temperature: float = 0.0, num_samples: int = 1,
                  top_p: float = 1.0, rng: jax.Array | None = None):
    """(summary, records) for `rows` ({"problem", "answer"} dicts).

    summary: `accuracy` (mean score over all samples: pass@1 when greedy, avg@k otherwise),
    `pass@k` (a problem counts when any of its k samples is right), the reason counts, the number
    of problems and of prompts dropped as too long. records: one dict per problem with every
    response, extracted answer, score and reason.
    """
    if temperature == 0 and num_samples != 1:
        raise ValueError("greedy evaluation (temperature 0) gives identical samples: use num_samples=1")
    pipe = PromptPipeline(list(rows), tokenizer, batch_size=batch_size, max_prompt_len=max_prompt_len,
                          template=template, shuffle=False, num_epochs=1, drop_remainder=False,
                          shard_index=0, shard_count=1)
    eos_ids = sampling.default_eos_ids(tokenizer)
    pad_id = sampling.default_pad_id(tokenizer, eos_ids)
    rng = jax.random.key(0) if rng is None else rng
    records, all_results = [], []
    for i, batch in enumerate(pipe.iterator()):
        out = sampling.generate(model, batch["prompt_ids"], batch["prompt_mask"],
                                jax.random.fold_in(rng, i), num_samples=num_samples,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, eos_ids=eos_ids, pad_id=pad_id)
        texts = decode_responses(tokenizer, out.tokens, out.mask)
        valid = np.asarray(batch["row_valid"])
        golds = [a for a, ok in zip(batch["answer"], valid) for _ in range(num_samples) if ok]
        kept = [t for j, t in enumerate(texts) if valid[j // num_samples]]
        results = grader.grade(kept, golds, timeout=timeout)
        all_results += results
        for r in range(int(valid.sum())):
            mine = results[r * num_samples:(r + 1) * num_samples]
            row = batch["row_index"][np.flatnonzero(valid)[r]]
            records.append({
                "problem": pipe.rows[row]["problem"], "answer": pipe.rows[row]["answer"],
                "responses": kept[r * num_samples:(r + 1) * num_samples],
                "extracted": [m.extracted for m in mine], "scores": [m.score for m in mine],
                "reasons": [m.reason for m in mine],
            })
    scores = np.array([rec["scores"] for rec in records], dtype=np.float64)   # [problems, k]
    summary = {
        "accuracy": float(scores.mean()) if scores.size else 0.0,
        f"pass@{num_samples}": float((scores.max(axis=1) > 0).mean()) if scores.size else 0.0,
        "problems": len(records),
        "dropped_too_long": int(pipe.stats.get("dropped_too_long", 0)),
        **{f"reason/{k}": v for k, v in rewards_lib.reason_counts(all_results).items()},
    }
    return summary, records


def decode_responses(tokenizer, tokens, mask) -> list[str]:
    """Response texts: each row's masked tokens, without the EOS and special tokens."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    return tokenizer.batch_decode([t[m].tolist() for t, m in zip(tokens, mask)],
                                  skip_special_tokens=True)
