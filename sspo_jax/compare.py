"""GRPO vs GSPO vs SSPO from one warm start: `python -m sspo_jax.compare [--workdir=DIR] [--seeds=K]`.

Runs the demo config (or `--config`) once per objective. The first run does the supervised
warm start and writes it as its step-0 checkpoint; every other run starts from a copy of that
checkpoint (and its step-0 evaluation), so all objectives begin from bit-identical weights, the
same data order and the same seed, and differ only in the loss. Writes DIR/compare.md (one
table) and DIR/compare.png (the curves side by side).

With `--seeds=K` (K >= 2) that is done K times, seeds config.seed .. config.seed + K - 1, each
with its own warm start shared by the objectives (DIR/seed<s>/<objective>), and DIR/summary.md
holds per objective the mean and standard error over the seeds (final, best and area under the
held-out accuracy curve, clip fractions, retained outliers, instability indicators), and the
paired differences of final accuracy (same seed, two objectives) with 95% confidence intervals;
DIR/compare.png the accuracy curves with +-1 standard error bands, DIR/clipping.png the clip
fractions.
"""
from __future__ import annotations

from sspo_jax import cli  # noqa: I001  (first: it quiets transformers before its import)

import math
import os
import shutil
import statistics

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


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def stability(rows: list[dict]) -> dict:
    """Largest drop of held-out accuracy between two evaluations, entropy at start and end and
    their ratio (entropy collapse), the largest gradient norm over the median one (spikes), and
    the area under the held-out accuracy curve (trapezoids over the evaluation steps, divided by
    their span: the run's mean accuracy)."""
    evals = _series(rows, "eval/accuracy")
    drops = [a[1] - b[1] for a, b in zip(evals, evals[1:])]
    ents = [v for _, v in _series(rows, "entropy_mean")]
    norms = [v for _, v in _series(rows, "grad_norm")]
    span = evals[-1][0] - evals[0][0] if len(evals) > 1 else 0
    auc = (sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(evals, evals[1:])) / span
           if span else (evals[0][1] if evals else float("nan")))
    return {"largest_eval_drop": max([0.0] + drops),
            "entropy_first": ents[0] if ents else float("nan"),
            "entropy_last": ents[-1] if ents else float("nan"),
            "entropy_ratio": ents[-1] / ents[0] if ents and ents[0] > 0 else float("nan"),
            "grad_norm_spike": max(norms) / statistics.median(norms) if norms and statistics.median(norms) > 0
            else float("nan"),
            "eval_auc": auc}


def run_comparison(config, workdir: str, objectives=DEFAULT_OBJECTIVES,
                   allow_config_change: bool = False, seeds: int = 1) -> dict:
    """Trains each objective from the shared warm start; returns {objective: summary}, or with
    seeds > 1 {objective: [summary per seed]} after writing DIR/summary.md."""
    if seeds < 1:
        raise ValueError(f"--seeds={seeds}: need at least 1")
    if seeds == 1:
        runs, summaries = _one_seed(config, workdir, objectives, allow_config_change)
        write_comparison(workdir, runs, summaries)
        return summaries
    per_seed, curves = {name: [] for name in objectives}, {name: [] for name in objectives}
    for k in range(seeds):
        cfg = config.copy_and_resolve_references()
        cfg.seed = int(config.seed) + k
        print(f"##### seed {cfg.seed} ({k + 1} of {seeds}) #####", flush=True)
        runs, summaries = _one_seed(cfg, os.path.join(workdir, f"seed{cfg.seed}"), objectives,
                                    allow_config_change)
        for name in objectives:
            per_seed[name].append(summaries[name])
            curves[name].append(_series(runs[name], "eval/accuracy"))
    write_seed_comparison(workdir, per_seed, curves, [int(config.seed) + k for k in range(seeds)])
    return per_seed


def _one_seed(config, workdir, objectives, allow_config_change):
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
    return runs, summaries


# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30; the normal beyond).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
SEED_KEYS = ("eval_accuracy_end", "eval_accuracy_best", "eval_auc", "clip_frac_token",
             "clip_frac_subsentence", "clip_frac_response", "outliers_retained",
             "outliers_retained_adv", "largest_eval_drop", "grad_norm_spike", "entropy_ratio")


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n)) of finite values."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    return mean, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan"))


def paired_ci(a, b) -> tuple[float, float, float]:
    """Mean of the per-seed differences a - b and its 95% confidence interval (Student's t)."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, se = mean_se(diffs)
    t = _T95[len(diffs) - 2] if 2 <= len(diffs) <= 31 else 1.96
    return mean, mean - t * se, mean + t * se


def write_seed_comparison(workdir: str, per_seed: dict, curves: dict, seeds: list[int]) -> str:
    """summary.md (and compare.md): mean +- standard error per objective over the seeds, and the
    paired differences of final accuracy with 95% confidence intervals; the two figures."""
    rows = []
    for name, summaries in per_seed.items():
        cells = []
        for key in SEED_KEYS:
            mean, se = mean_se([s[key] for s in summaries])
            cells.append(f"{mean:.4g} +- {se:.2g}")
        rows.append([name, *cells])
    table = metrics_lib.markdown_table(["objective", *SEED_KEYS], rows)
    names = list(per_seed)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            mean, lo, hi = paired_ci([s["eval_accuracy_end"] for s in per_seed[a]],
                                     [s["eval_accuracy_end"] for s in per_seed[b]])
            verdict = ("significant" if lo > 0 or hi < 0 else "not significant") if math.isfinite(lo) else "n/a"
            pairs.append([f"{a} - {b}", f"{mean:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", verdict])
    pair_table = metrics_lib.markdown_table(
        ["final accuracy difference (same seed)", "mean", "95% CI", "at 95%"], pairs)
    text = (f"# GRPO vs GSPO vs SSPO over {len(seeds)} seeds ({seeds[0]}..{seeds[-1]})\n\n"
            "Each seed: one warm start shared by the objectives. Mean +- standard error over the "
            "seeds; eval_auc is the mean held-out accuracy over the run, grad_norm_spike the "
            "largest gradient norm over the median one, entropy_ratio the last step's entropy "
            "over the first's.\n\n" + table + "\n\n" + pair_table + "\n")
    for fname in ("summary.md", "compare.md"):
        with open(os.path.join(workdir, fname), "w") as f:
            f.write(text)
    _plot_bands(curves, os.path.join(workdir, "compare.png"))
    _plot_clipping(per_seed, os.path.join(workdir, "clipping.png"))
    print(text, flush=True)
    return text


def _plot_bands(curves: dict, path: str) -> None:
    """Held-out accuracy per objective: the mean over seeds at each evaluation step, +-1 SE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
        stats = [mean_se([dict(run)[step] for run in runs]) for step in steps]
        mean = [m for m, _ in stats]
        se = [0.0 if not math.isfinite(e) else e for _, e in stats]
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)], alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"mean +- 1 SE over {len(next(iter(curves.values())))} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_clipping(per_seed: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    units = ("clip_frac_token", "clip_frac_subsentence", "clip_frac_response")
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(per_seed)
    for j, (name, summaries) in enumerate(per_seed.items()):
        stats = [mean_se([s[u] for s in summaries]) for u in units]
        ax.bar([i + j * width for i in range(len(units))], [m for m, _ in stats], width,
               yerr=[0.0 if not math.isfinite(e) else e for _, e in stats], label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(units))], ["token", "subsentence", "response"])
    ax.set_ylabel("clipped fraction (mean over steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(workdir: str, runs: dict, summaries: dict) -> str:
    keys = ["eval_accuracy_start", "eval_accuracy_end", "eval_accuracy_best", "reward_mean",
            "clip_frac_token", "clip_frac_subsentence", "clip_frac_response", "entropy_first",
            "entropy_last", "outliers_retained", "outliers_retained_adv", "largest_eval_drop",
            "skipped_steps", "train_time_s"]
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
    run_comparison(_CONFIG.value, _WORKDIR.value, tuple(_OBJECTIVES.value), _ALLOW_CHANGE.value,
                   _SEEDS.value)


if __name__ == "__main__":
    _CONFIG = cli.define_config_flag(
        "Config file; its loss.name is replaced by each objective in turn (--objectives takes the "
        "presets: grpo, dapo, dr_grpo, gspo, sspo, sspo_fixed). Any field can be overridden: "
        "--config.BLOCK.FIELD=VALUE, e.g. --config.steps=100 (fields and defaults: "
        "sspo_jax/run_config.py).", lock_config=False)
    _WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "One sub-directory per objective.")
    _OBJECTIVES = flags.DEFINE_list("objectives", list(DEFAULT_OBJECTIVES), "Loss presets to compare.")
    _ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume the runs with safe "
                                      "config changes (e.g. more steps), as sspo_jax.train does.")
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Runs per objective, seeds config.seed onwards, each "
                                  "with its own warm start; >= 2 adds means, standard errors and "
                                  "paired confidence intervals (summary.md).")
    app.run(cli.one_line_errors(main))
