"""RL post-training: `python -m sspo_jax.train [--config=configs/FILE.py[:preset]] [--workdir=DIR]`.

With no --config the CPU demo runs (sspo_jax/run_config.py: get_config). Rerunning the same
command on the same workdir resumes from its newest checkpoint. One RL step:

  prompts -> n samples each (sampler) -> rewards (grading pool) -> group advantages, segment ids
  and clip bounds on the whole batch -> ppo_mini_batches x ppo_epochs optimizer steps, each
  accumulated over micro-batches -> metrics -> maybe evaluate / checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from sspo_jax import parallel
from sspo_jax import rewards as rewards_lib
from sspo_jax import run_config, specs
from sspo_jax.generate import sampler
from sspo_jax.parallel import hosts, to_numpy
from sspo_jax.rl import packing, train_batch
from sspo_jax.rl.loss_metrics import combine_metrics, finalize_metrics
from sspo_jax.train import checkpoint as ckpt_lib
from sspo_jax.train import evaluation
from sspo_jax.train import metrics as metrics_lib
from sspo_jax.train import rollout, run_record, update
from sspo_jax.train.compile_cache import CompileCache
from sspo_jax.train.setup import (abstract_opt_state, build_policy, load_task,
                                  policy_skeleton, run_optimizer, write_run_info)

CONSOLE_KEYS = (("reward/mean", "reward", ".3f"), ("eval/accuracy", "eval acc", ".3f"),
                ("clip_frac_total/token", "clip", ".4f"), ("entropy_mean", "entropy", ".3f"),
                ("response/length_mean", "len", ".1f"), ("tokens_per_s", "tok/s", ".0f"))


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> list[dict]:
    """Runs (or resumes) the configured training; returns the metric rows of this invocation.

    A workdir with checkpoints is resumed only with the config it was started with, or with
    safe changes when `allow_config_change` (sspo_jax/train/run_record.py). With several JAX
    processes every process calls this with the same arguments (see sspo_jax/parallel/hosts.py);
    only process 0 writes logs, metrics and plots, and holds the workdir's lock.
    """
    run_config.check_workdir(workdir)
    mesh = parallel.mesh_from_config(config.mesh)
    spec = specs.parse(config, batch_shards=parallel.batch_shards(mesh))
    os.makedirs(workdir, exist_ok=True)
    lock = _lock_workdir(workdir)
    # `cleanup` closes what _train opened (the grading processes, the signal handlers, the
    # checkpoint manager, the metrics files) when it stops on an error, too.
    with lock, CompileCache(spec.compile_cache, workdir), contextlib.ExitStack() as cleanup:
        return _train(spec, config, workdir, mesh, allow_config_change, cleanup)


def _train(spec: specs.RunSpec, config, workdir: str, mesh, allow_config_change: bool,
           cleanup: contextlib.ExitStack) -> list[dict]:
    """The run of `spec`; `config` (the same, as given) only goes into the run record. Whatever
    it opens is also registered with `cleanup`, which closes it if the run stops on an error."""
    loss_cfg = spec.loss
    is_chief = parallel.is_chief()
    checkpoints = ckpt_lib.Checkpointer(run_config.checkpoint_dir(spec, workdir),
                                        save_every=spec.checkpoint.every,
                                        keep=spec.checkpoint.keep,
                                        async_save=spec.checkpoint.async_save)
    start = checkpoints.latest_step()
    resumed = start is not None
    if resumed:
        if spec.steps < start:
            raise ValueError(
                f"{workdir} holds a run at step {start}; steps={spec.steps} is below it, so there "
                f"is nothing to train. Raise steps to continue it, evaluate it with "
                f"`python -m sspo_jax.evaluate --config=<its config> --workdir={workdir}`, or use "
                f"another --workdir")
        _check_resume(workdir, config, allow_config_change)
    write_run_info(workdir, config, mesh)
    if is_chief:
        warm = spec.warm_start.steps if spec.data.source == "synthetic" and not resumed else 0
        print(f"run: {f'a warm start of {warm} steps, then ' if warm else ''}"
              f"{spec.steps - (start or 0)} {config.loss.name} steps of {spec.rollout.rows} rollouts "
              f"(to step {spec.steps}) in {workdir}"
              f"{f', resuming from step {start}' if resumed else ''}; rerunning resumes", flush=True)
    # A resumed run fills an empty skeleton from the checkpoint: no weights are loaded or
    # initialised just to be overwritten.
    tokenizer, model = (policy_skeleton(spec.model, mesh) if resumed
                        else build_policy(spec.model, spec.seed, mesh))
    run_record.check_tokenizer(workdir, tokenizer, record=True)
    train_rows, eval_rows, data_counts = load_task(spec.data, spec.eval, spec.seed)
    tables = train_batch.SegmentTables.from_tokenizer(tokenizer, loss_cfg, model.config.vocab_size)
    eos_ids = sampler.default_eos_ids(tokenizer)
    pad_id = sampler.default_pad_id(tokenizer, eos_ids)
    pipeline = _train_pipeline(spec, tokenizer, train_rows)
    data_iter = pipeline.iterator()
    # Every row read, skipped (by reason), held out or dropped as too long: said up front, and
    # logged with step 0.
    data_counts = {**data_counts, **{k: v for k, v in pipeline.stats.items() if k not in data_counts}}
    if is_chief and spec.data.source != "synthetic":
        print(f"data: {spec.data.path}: " + ", ".join(f"{k} {v}" for k, v in data_counts.items() if v),
              flush=True)
    r, t = spec.rollout, spec.train
    optimizer = run_optimizer(spec.optimizer, spec.optimizer_steps)
    settings = update.UpdateSettings(loss=loss_cfg, temperature=max(r.temperature, 1e-6),
                                            micro_batch_size=t.micro_batch_size,
                                            logprob_chunk=t.logprob_chunk)
    grader = cleanup.enter_context(rewards_lib.Grader())
    watcher = ckpt_lib.PreemptionWatcher()
    cleanup.callback(watcher.restore_handlers)
    # After the watcher: on an error the save in flight is let finish (no temporary directories)
    # while SIGTERM is still caught; the handlers are restored after that.
    cleanup.enter_context(checkpoints)
    counters = {"bad_steps_total": 0, "bad_steps_in_a_row": 0}
    if resumed:
        graphdef, params = nnx.split(model)
        # The newest checkpoint that restores (a corrupt newer one is skipped, with a warning).
        start, items, meta = checkpoints.restore_latest(
            {"params": params, "opt_state": abstract_opt_state(optimizer, params)})
        params, opt_state = items["params"], items["opt_state"]
        data_iter.set_state(meta["data"])
        counters = meta["counters"]
        if is_chief:
            print(f"resumed from the checkpoint of step {start} in {checkpoints.directory}", flush=True)
    else:
        start = 0
        # The warm start fits the synthetic task's worked solutions (the tiny model on one
        # device; an HF model on the mesh); a user's own data has none, so it is not used there.
        if spec.warm_start.steps and spec.data.source == "synthetic":
            _warm_start(spec, model, tokenizer, train_rows, is_chief)
        elif spec.warm_start.steps and is_chief:
            print(f"warm start skipped: it fits the synthetic task's worked solutions, and "
                  f"data.source={spec.data.source} has none", flush=True)
        parallel.shard_model(model, mesh)  # a no-op for a model loaded onto the mesh
        graphdef, params = nnx.split(model)
        opt_state = update.init_optimizer(optimizer, params)
    # The KL reference is the starting policy (step 0: after the warm start, always kept); a
    # resumed run reads only its parameters.
    ref_params = None
    if loss_cfg.kl_beta > 0:
        ref_params = (jax.tree.map(jax.numpy.copy, params) if not resumed else
                      checkpoints.restore({"params": params}, step=0)[0]["params"])
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start if resumed else None,
                                       enabled=is_chief)
    cleanup.callback(writer.close)
    rows_out = []

    def sampler_model():
        """The policy as the sampler sees it, in the compute dtype (cast once per rollout, not
        at every decode step): the training params' layout, or (mesh.sampler_reshard) a copy
        gathered over fsdp."""
        if not spec.mesh.sampler_reshard:
            if jax.numpy.dtype(model.param_dtype) == jax.numpy.dtype(model.dtype):
                return nnx.merge(graphdef, params)
            return nnx.merge(graphdef, parallel.compute_copy(params, nnx.state(model), model.dtype))
        return nnx.merge(graphdef, parallel.sampler_params(params, nnx.state(model), mesh,
                                                           model.dtype))

    def evaluate_now(step):
        summary, _ = evaluation.evaluate_rows(
            sampler_model(), tokenizer, eval_rows, template=spec.data.template,
            max_prompt_len=spec.data.max_prompt_len, max_new_tokens=spec.eval.max_new_tokens,
            batch_size=spec.eval.batch_size, grader=grader, timeout=r.grading_timeout,
            engine=r.engine, slots=r.slots)
        return {f"eval/{k}": v for k, v in summary.items()}

    if not resumed:
        row = {"step": 0, **{f"data/{k}": v for k, v in data_counts.items()},
               **(evaluate_now(0) if spec.eval.every else {})}
        writer.write(0, row)
        rows_out.append(row)
        # Step 0 holds the warm-started policy, so a crash during RL never redoes the warm start.
        checkpoints.save(0, {"params": params, "opt_state": opt_state},
                         {"data": data_iter.get_state(), "counters": counters}, force=True)
        _console(0, spec.steps, row, time.time(), 0, is_chief)

    base_key = jax.random.key(spec.seed)
    # The ETA counts the steps after this invocation's first: the first one compiles.
    eta_since = (time.time(), start + 1)
    for step in range(start + 1, spec.steps + 1):
        t0 = time.time()
        batch = next(data_iter)
        ro = rollout.sample_and_grade(sampler_model(), batch, jax.random.fold_in(base_key, step), r,
                                      eos_ids, pad_id, tokenizer, grader)
        sample, texts, graded = ro.sample, ro.texts, ro.graded
        correct = [g.score for g in graded]
        shaping = spec.reward.shaping
        scores = np.array(correct if not shaping else rewards_lib.shaped_rewards(
            correct, texts, to_numpy(sample.lengths), max_length=r.max_new_tokens,
            format_weight=spec.reward.format_weight,
            overlong_buffer=spec.reward.overlong_buffer), np.float32)
        if spec.debug.inject_nan_step == step:
            scores[0] = np.nan  # -> NaN advantages for that group -> non-finite loss
        prompt_ids, prompt_mask = _trim_prompts(batch["prompt_ids"], batch["prompt_mask"])
        pb, step_metrics = train_batch.assemble(
            prompt_ids, prompt_mask, sample, scores, num_samples=r.num_samples, loss_cfg=loss_cfg,
            tables=tables, filter_zero_variance=r.filter_zero_variance_groups, mesh=mesh)
        recompute = {**({"old_logp": params} if r.old_logprobs == "recompute" else {}),
                     **({"ref_logp": ref_params} if ref_params is not None else {})}
        if recompute:
            pb = pb.replace(**_logprobs(recompute, pb, graphdef, settings, spec, mesh))
        t_update0 = time.time()
        params, opt_state, loss_parts, bad, packed_stats = _update(
            params, opt_state, pb, graphdef, optimizer, settings, spec, step, mesh)
        t_update = time.time() - t_update0
        counters["bad_steps_total"] += int(bad > 0)
        counters["bad_steps_in_a_row"] = counters["bad_steps_in_a_row"] + 1 if bad else 0
        row = {
            "step": step, **step_metrics, **finalize_metrics(loss_parts),
            **{f"grading/{k}": v for k, v in rewards_lib.reason_counts(graded).items()},
            **{f"grading/{k}": v for k, v in rewards_lib.rule_counts(graded).items()},
            **({"reward/correct_mean": float(np.mean(correct))} if shaping else {}),
            "skipped_updates": bad, "bad_steps_total": counters["bad_steps_total"],
            "time/sampling_s": ro.sampling_s, "time/grading_s": ro.grading_s, "time/update_s": t_update,
            "time/step_s": time.time() - t0, **ro.metrics(),
            "train_tokens_per_s": t.ppo_epochs * int(to_numpy(pb.attention_mask).sum()) / max(t_update, 1e-9),
            **packed_stats,
        }
        if bad and is_chief:
            logging.warning("step %d: %d optimizer step(s) had a non-finite loss or gradient and were "
                            "skipped; metrics: %s", step, bad, json.dumps(row, default=str))
        if spec.eval.every and (step % spec.eval.every == 0 or step == spec.steps):
            row.update(evaluate_now(step))
        writer.write(step, row)
        rows_out.append(row)
        if step == start + 1:
            eta_since = (time.time(), step)
        _console(step, spec.steps, row, *eta_since, is_chief)
        meta = {"data": data_iter.get_state(), "counters": counters}
        checkpoints.save(step, {"params": params, "opt_state": opt_state}, meta,
                         force=step == spec.steps)
        if spec.debug.raise_at_step == step:  # a failure while that save is in flight
            raise RuntimeError(f"debug.raise_at_step={step}: the injected failure")
        if counters["bad_steps_in_a_row"] >= t.max_bad_steps:
            checkpoints.close()  # the last good state is complete before the run says so
            raise RuntimeError(
                f"stopping: {counters['bad_steps_in_a_row']} steps in a row had non-finite losses or "
                f"gradients (train.max_bad_steps={t.max_bad_steps}); the last good state is in the "
                f"checkpoints. Lower the learning rate or check the data; see {writer.path}")
        if watcher.requested():
            checkpoints.save(step, {"params": params, "opt_state": opt_state}, meta, force=True)
            if is_chief:
                logging.warning("SIGTERM: saved the checkpoint of step %d, exiting", step)
            break
    checkpoints.close()
    grader.close()
    writer.close()
    watcher.restore_handlers()
    if is_chief:
        from sspo_jax.train.report import write_report
        last = rows_out[-1]["step"] if rows_out else start
        status = (f"finished: step {last} of {spec.steps}" if last >= spec.steps else
                  f"stopped at step {last} of {spec.steps} (SIGTERM); rerun the same command to resume")
        write_report(workdir, status=status)
    return rows_out


def _lock_workdir(workdir):
    """Process 0 takes the workdir's lock; if it cannot, every process stops (not only it)."""
    lock = hosts.on_chief(lambda: run_record.WorkdirLock(workdir),
                          "process 0 could not lock the workdir: see its log", errors=(RuntimeError,))
    return lock if lock is not None else contextlib.nullcontext()


def _check_resume(workdir, config, allow_changes):
    """Process 0 compares the config with the run record; every process stops if it refuses."""
    changes = hosts.on_chief(lambda: run_record.check_resume(workdir, config, allow_changes),
                             "process 0 refused to resume this workdir with this config: see its log")
    if changes:
        print("resuming with changed config: " + "; ".join(
            f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()), flush=True)


def _update(params, opt_state, pb, graphdef, optimizer, settings, spec, step, mesh):
    """ppo_epochs passes of ppo_mini_batches optimizer steps; returns the combined loss metrics,
    the count of skipped steps and (with train.packing) the packing's metrics."""
    t = spec.train
    parts, bad, packed_rows, slots, real = [], 0, 0, 0, 0
    rng = np.random.default_rng([spec.seed, step])
    for _ in range(t.ppo_epochs):
        for idx in train_batch.minibatch_indices(pb.num_rows, t.ppo_mini_batches, rng):
            mini, mini_settings = pb.rows(idx), settings
            if t.packing:
                mini, mini_settings, layout = _packed(mini, settings, spec, mesh)
                packed_rows, slots = packed_rows + layout.source.shape[0], slots + layout.source.size
                real += layout.real_tokens
            params, opt_state, m, grad_norm, finite = update.update_step(
                params, opt_state, mini, graphdef=graphdef, optimizer=optimizer,
                settings=mini_settings)
            bad += int(not bool(finite))
            parts.append({**m, "grad_norm/max": grad_norm, "grad_norm/sum": grad_norm})
    combined = combine_metrics(parts)
    combined["grad_norm_mean/sum"] = combined.pop("grad_norm/sum") / len(parts)
    stats = {}
    if t.packing:  # real tokens: those packed (rows with no loss token are left out)
        stats = {"packing/rows": packed_rows, "packing/real_tokens": real,
                 "packing/padding_frac": 1.0 - real / max(slots, 1)}
    return params, opt_state, combined, bad, stats


def _packed(batch, settings, spec, mesh):
    """(PackedBatch, its UpdateSettings, PackPlan) of a padded batch: rows of P + R slots, a
    micro-batch of max_tokens_per_micro_batch slots per device (micro_batch_size rows' worth
    when 0), the rows bucketed to a multiple of it."""
    row_len = batch.tokens.shape[1]
    shards = parallel.batch_shards(mesh) if mesh is not None else 1
    budget = spec.train.max_tokens_per_micro_batch
    micro_rows = spec.train.micro_batch_size if budget == 0 else max(1, budget // row_len) * shards
    # Never more rows per micro-batch than the batch has (both are multiples of the shards).
    micro_rows = min(micro_rows, batch.num_rows)
    # The LM head's groups: one batch shard's rows of a micro-batch (the gather stays local).
    layout = packing.plan_batch(batch, rows_multiple=micro_rows, head_group_rows=max(1, micro_rows // shards))
    packed_settings = dataclasses.replace(settings, micro_batch_size=micro_rows,
                                          response_len=batch.response_mask.shape[1])
    return packing.pack(batch, layout, mesh), packed_settings, layout


def _logprobs(param_sets: dict, pb, graphdef, settings, spec, mesh) -> dict:
    """{field: [B, R] response log-probs of `pb`} under each of `param_sets` ({"old_logp": the
    policy to recompute, "ref_logp": the KL reference}); with train.packing on one packed
    layout of `pb`, planned once for all of them."""
    if not spec.train.packing:
        return {k: update.batch_logprobs(p, pb, graphdef=graphdef, settings=settings)
                for k, p in param_sets.items()}
    packed, packed_settings, layout = _packed(pb, settings, spec, mesh)
    prompt_len = pb.tokens.shape[1] - pb.response_mask.shape[1]
    out = {}
    for k, p in param_sets.items():
        per_slot = update.batch_logprobs(p, packed, graphdef=graphdef, settings=packed_settings)
        logp = packing.unpack(per_slot, layout, pb.tokens.shape, mesh)[:, prompt_len:]
        out[k] = jax.numpy.where(pb.response_mask > 0, logp, 0.0)
    return out


def _trim_prompts(ids, mask):
    """Drop all-padding columns on the left, keeping a bucketed width (few compiled shapes)."""
    longest = int(np.asarray(mask).sum(axis=1).max())
    width = min(ids.shape[1], sampler.bucket_length(longest))
    return ids[:, -width:], mask[:, -width:]


def _train_pipeline(spec, tokenizer, rows):
    from sspo_jax.data.pipeline import PromptPipeline

    # Every process reads the same global stream (shard 0 of 1): prompts are small, and the run
    # is then the same whatever the number of processes; each places only its devices' rows.
    return PromptPipeline(rows, tokenizer, batch_size=spec.rollout.prompts_per_step,
                          max_prompt_len=spec.data.max_prompt_len, template=spec.data.template,
                          seed=spec.seed, overlong=spec.data.long_prompts,
                          strict=spec.data.strict, shard_index=0, shard_count=1)


def _warm_start(spec, model, tokenizer, rows, is_chief):
    from sspo_jax.train.warm_start import encode_examples, warm_start
    w = spec.warm_start
    examples = encode_examples(rows[:w.examples], tokenizer, template=spec.data.template,
                               prompt_len=spec.data.max_prompt_len,
                               response_len=spec.rollout.max_new_tokens)
    t0 = time.time()

    def log(step, loss):
        if is_chief and (step % 50 == 0 or step == w.steps - 1):
            spent = time.time() - t0
            eta = spent / (step + 1) * (w.steps - step - 1)
            print(f"warm start {step + 1}/{w.steps} | loss {loss:.3f} | {spent:.0f}s | eta {eta:.0f}s",
                  flush=True)

    warm_start(model, examples, steps=w.steps, lr=w.lr, batch_size=w.batch_size,
               prompt_len=spec.data.max_prompt_len, seed=spec.seed,
               chunk=spec.train.logprob_chunk, log=log)


def _console(step, total, row, started, first_step, is_chief):
    if is_chief:
        print(metrics_lib.progress_line(step, total, row, started, first_step, CONSOLE_KEYS), flush=True)
