"""Accuracy of a policy on benchmarks: greedy pass@1, and avg@k / pass@k when sampling.

`evaluate_rows` grades one policy on rows with the same prompt pipeline, sampler and grader as
training, so an evaluation number and a training reward mean the same thing (the trainer's
periodic evaluation calls it); `run_evaluation` is the command's library side (sspo_jax/evaluate.py).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from sspo_jax import parallel
from sspo_jax import rewards as rewards_lib
from sspo_jax.data.pipeline import PromptPipeline
from sspo_jax.generate import sampler
from sspo_jax.train import grading


def evaluate_rows(model, tokenizer, rows: Sequence[dict], *, template: str, max_prompt_len: int,
                  max_new_tokens: int, batch_size: int, grader: rewards_lib.Grader,
                  timeout: float = 5.0, temperature: float = 0.0, num_samples: int = 1,
                  top_p: float = 1.0, rng: jax.Array | None = None, engine: str = "static",
                  slots: int = 0):
    """(summary, records) for `rows` ({"problem", "answer"} dicts). engine, slots: the sampler's
    (the run's rollout.engine and rollout.slots).

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
    eos_ids = sampler.default_eos_ids(tokenizer)
    pad_id = sampler.default_pad_id(tokenizer, eos_ids)
    rng = jax.random.key(0) if rng is None else rng
    records, all_results = [], []
    for i, batch in enumerate(pipe.iterator()):
        valid = np.asarray(batch["row_valid"])
        ids, mask = _fill_padding_rows(batch["prompt_ids"], batch["prompt_mask"], valid)
        out = sampler.generate(model, ids, mask,
                                jax.random.fold_in(rng, i), num_samples=num_samples,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, engine=engine,
                                slots=slots)
        texts = decode_responses(tokenizer, out.tokens, out.mask)
        golds = [a for a, ok in zip(batch["answer"], valid) for _ in range(num_samples) if ok]
        kept = [t for j, t in enumerate(texts) if valid[j // num_samples]]
        results = grading.grade_across_hosts(grader, kept, golds, timeout)
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
        **rewards_lib.rule_counts(all_results),
    }
    return summary, records


def _fill_padding_rows(ids, mask, valid):
    """The last batch of a pass is padded with empty rows; the sampler needs a real prompt in
    every row, so padding rows repeat the first real one (their outputs are discarded)."""
    if valid.all():
        return ids, mask
    first = int(np.flatnonzero(valid)[0])
    ids, mask = np.array(ids), np.array(mask)
    ids[~valid], mask[~valid] = ids[first], mask[first]
    return ids, mask


def decode_responses(tokenizer, tokens, mask) -> list[str]:
    """Response texts: each row's masked tokens, without the EOS and special tokens."""
    tokens, mask = parallel.to_numpy(tokens), parallel.to_numpy(mask).astype(bool)
    return tokenizer.batch_decode([t[m].tolist() for t, m in zip(tokens, mask)],
                                  skip_special_tokens=True)


def run_evaluation(config, workdir: str, step: int | None = None) -> dict:
    """Evaluates the policy of `workdir` (or `model.hf_dir`); writes and returns the summary.

    On the config's mesh; with several processes all take part and process 0 writes the files."""
    from sspo_jax import specs
    from sspo_jax.train.compile_cache import CompileCache
    from sspo_jax.train import run_record
    spec = specs.parse(config, training_data=False)
    run_record.check_reader(workdir, config, "evaluate")
    with CompileCache(spec.compile_cache, workdir):
        return _evaluate(spec, workdir, step)


def _evaluate(spec, workdir: str, step: int | None) -> dict:
    from sspo_jax import parallel
    from sspo_jax.data.benchmarks import FIVE_BENCHMARKS
    from sspo_jax.run_config import check_workdir, checkpoint_dir
    from sspo_jax.train import metrics as metrics_lib
    from sspo_jax.train import run_record
    from sspo_jax.train.checkpoint import Checkpointer
    from sspo_jax.train.setup import (build_policy, eval_rows, load_task, policy_skeleton,
                                      restore_params)

    e = spec.eval
    check_workdir(workdir)
    mesh = parallel.mesh_from_config(spec.mesh)
    ckpt_dir = checkpoint_dir(spec, workdir)
    if Checkpointer(ckpt_dir, save_every=1, create=False).latest_step() is not None:
        # Parameters only, read into an empty skeleton: no HF weights loaded first, no optimizer state.
        tokenizer, model = policy_skeleton(spec.model, mesh)
        run_record.check_tokenizer(workdir, tokenizer, record=False)
        source = f"checkpoint step {restore_params(model, ckpt_dir, step)} in {ckpt_dir}"
    elif step is not None:
        raise FileNotFoundError(f"--step={step} given but {ckpt_dir} holds no checkpoint")
    else:
        tokenizer, model = build_policy(spec.model, spec.seed, mesh)
        parallel.shard_model(model, mesh)  # a no-op for an HF model, loaded onto the mesh
        source = spec.model.hf_dir or "a random model"
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    with rewards_lib.Grader() as grader:
        # No benchmarks: the synthetic task's held-out split, or the one training held out of a
        # user's own data (the same rows: load_task draws them with the seed).
        own = spec.data.source != "synthetic" and not e.benchmarks
        for name in (e.benchmarks or ("held_out" if own else "synthetic",)):
            rows = (load_task(spec.data, spec.eval, spec.seed)[1] if name == "held_out"
                    else eval_rows(spec.eval, spec.data, spec.seed, name))
            common = dict(template=spec.data.template, max_prompt_len=spec.data.max_prompt_len,
                          max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, grader=grader,
                          timeout=spec.rollout.grading_timeout, engine=spec.rollout.engine,
                          slots=spec.rollout.slots)
            greedy, records = evaluate_rows(model, tokenizer, rows, **common)
            result = {"benchmark": name, "policy": source, "greedy": greedy, "records": records}
            if e.num_samples > 1:
                sampled, sampled_records = evaluate_rows(
                    model, tokenizer, rows, **common, temperature=e.temperature,
                    num_samples=e.num_samples, top_p=e.top_p, rng=jax.random.key(spec.seed))
                result.update(sampled=sampled, sampled_records=sampled_records)
            if parallel.is_chief():
                with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                    json.dump(result, f, indent=1)
            summaries[name] = {"pass@1": greedy["accuracy"], "problems": greedy["problems"],
                               "no_answer": greedy.get("reason/no_answer", 0),
                               "dropped_too_long": greedy["dropped_too_long"]}
            if e.num_samples > 1:
                summaries[name][f"avg@{e.num_samples}"] = result["sampled"]["accuracy"]
                summaries[name][f"pass@{e.num_samples}"] = result["sampled"][f"pass@{e.num_samples}"]
    five = [summaries[b]["pass@1"] for b in FIVE_BENCHMARKS if b in summaries]
    summary = {"policy": source, "benchmarks": summaries,
               "five_benchmark_average": sum(five) / len(five) if len(five) == 5 else None}
    keys = sorted({k for s in summaries.values() for k in s})
    table_rows = [[name, *[s.get(k, "") for k in keys]] for name, s in summaries.items()]
    if summary["five_benchmark_average"] is not None:
        table_rows.append(["average (5 benchmarks)", *[summary["five_benchmark_average"]
                                                       if k == "pass@1" else "" for k in keys]])
    table = metrics_lib.markdown_table(["benchmark", *keys], table_rows)
    if parallel.is_chief():
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(f"# Evaluation of {source}\n\n{table}\n")
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(table, flush=True)
    return summary
