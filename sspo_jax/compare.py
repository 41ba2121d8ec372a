"""GRPO vs GSPO vs SSPO from one warm start: `python -m sspo_jax.compare [--workdir=DIR]`.

Runs the demo config (or `--config`) once per objective. The first run does the supervised
warm start and writes it as its step-0 checkpoint; every other run starts from a copy of that
checkpoint (and its step-0 evaluation), so all objectives begin from bit-identical weights, the
same data order and the same seed, and differ only in the loss. Writes DIR/compare.md (one
table) and DIR/compare.png (the curves side by side).
"""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)

import math
import os
import shutil

from absl import app, flags

from sspo_jax.train import metrics as metrics_lib
from sspo_jax.train import report

DEFAULT_OBJECTIVES = ("grpo", "gspo", "sspo")
CURVES = ["eval/accuracy", "reward/mean", "clip_frac_total/token", "clip_frac_total/subsentence",
          "clip_frac_total/response", "entropy_mean", "response/length_mean", "approx_kl"]


def seed_from_warm_start(source_dir: str, target_dir: str) -> None:
    """Make `target_dir` a run that resumes from `source_dir`'s step-0 checkpoint."""
    os.makedirs(os.path.join(target_dir, "checkpoints"), exist_ok=True)
    shutil.copytree(os.path.join(source_dir, "checkpoints", "0"),
                    os.path.join(target_dir, "checkpoints", "0"), dirs_exist_ok=True)
    rows = [r for r in metrics_lib.read_jsonl(os.path.join(source_dir, metrics_lib.JSONL_NAME))
            if r["step"] == 0]
    writer = metrics_lib.MetricsWriter(target_dir, tensorboard=False)
    for row in rows:
        writer.write(0, {k: v for k, v in row.items() if k != "step"})
    writer.close()


def stability(rows: list[dict]) -> dict:
    """Largest drop of held-out accuracy between two evaluations, entropy at start and end."""
    evals = [r["eval/accuracy"] for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    drops = [a - b for a, b in zip(evals, evals[1:])]
    ents = [r["entropy_mean"] for r in rows
            if isinstance(r.get("entropy_mean"), (int, float)) and math.isfinite(r["entropy_mean"])]
    return {"largest_eval_drop": max([0.0] + drops),
            "entropy_first": ents[0] if ents else float("nan"),
            "entropy_last": ents[-1] if ents else float("nan")}


def run_comparison(config, workdir: str, objectives=DEFAULT_OBJECTIVES,
                   allow_config_change: bool = False) -> dict:
    """Trains each objective from the shared warm start; returns {objective: summary}."""
    from sspo_jax.train import loop

    runs, summaries = {}, {}
    first_dir = None
    for name in objectives:
        run_dir = os.path.join(workdir, name)
        cfg = config.copy_and_resolve_references()
        cfg.loss.name = name
        if first_dir is not None and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
            seed_from_warm_start(first_dir, run_dir)
        print(f"=== {name} ===", flush=True)
        loop.train_and_evaluate(cfg, run_dir, allow_config_change)
        first_dir = first_dir or run_dir
        runs[name] = metrics_lib.read_jsonl(os.path.join(run_dir, metrics_lib.JSONL_NAME))
        summaries[name] = {**report.summarize(runs[name]), **stability(runs[name])}
    write_comparison(workdir, runs, summaries)
    return summaries


def write_comparison(workdir: str, runs: dict, summaries: dict) -> str:
    keys = ["eval_accuracy_start", "eval_accuracy_end", "eval_accuracy_best", "reward_mean",
            "clip_frac_token", "clip_frac_subsentence", "clip_frac_response", "entropy_first",
            "entropy_last", "largest_eval_drop", "skipped_steps", "train_time_s"]
    table = metrics_lib.markdown_table(["objective", *keys],
                                       [[name, *[s[k] for k in keys]] for name, s in summaries.items()])
    with open(os.path.join(workdir, "compare.md"), "w") as f:
        f.write("# GRPO vs GSPO vs SSPO from one warm start\n\n" + table + "\n")
    metrics_lib.plot_curves(runs, CURVES, os.path.join(workdir, "compare.png"),
                            title="same warm start, same seed")
    print(table, flush=True)
    return table


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_logs()
    run_comparison(_CONFIG.value, _WORKDIR.value, tuple(_OBJECTIVES.value), _ALLOW_CHANGE.value)


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag(
        "Config file; its loss.name is replaced by each objective in turn.", lock_config=False)
    _WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "One sub-directory per objective.")
    _OBJECTIVES = flags.DEFINE_list("objectives", list(DEFAULT_OBJECTIVES), "Loss presets to compare.")
    _ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume the runs with safe "
                                      "config changes (e.g. more steps), as sspo_jax.train does.")
    app.run(cli.one_line_errors(main))
