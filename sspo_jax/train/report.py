"""End-of-run report: a Markdown summary table and PNG plots from a workdir's metrics.jsonl."""
from __future__ import annotations

import math
import os

from sspo_jax.train import metrics as metrics_lib

PLOT_KEYS = ["reward/mean", "eval/accuracy", "clip_frac_total/token", "clip_frac_total/subsentence",
             "clip_frac_total/response", "entropy_mean", "response/length_mean", "approx_kl"]


def summarize(rows: list[dict]) -> dict:
    """Start and end accuracy, the best accuracy, mean reward / clip fractions / entropy over the
    RL steps, skipped steps, and wall-clock time of the steps (from the logged step times)."""
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    steps = [r for r in rows if r["step"] > 0]

    def mean(key):
        vals = [r[key] for r in steps if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "steps": len(steps),
        "eval_accuracy_start": evals[0]["eval/accuracy"] if evals else float("nan"),
        "eval_accuracy_end": evals[-1]["eval/accuracy"] if evals else float("nan"),
        "eval_accuracy_best": max((r["eval/accuracy"] for r in evals), default=float("nan")),
        "reward_mean": mean("reward/mean"),
        "clip_frac_token": mean("clip_frac_total/token"),
        "clip_frac_subsentence": mean("clip_frac_total/subsentence"),
        "clip_frac_response": mean("clip_frac_total/response"),
        "entropy_mean": mean("entropy_mean"),
        "outliers_retained": mean("outliers/retained_frac"),
        "outliers_retained_adv": mean("outliers/retained_adv_frac"),
        "skipped_steps": steps[-1].get("bad_steps_total", 0) if steps else 0,
        "train_time_s": sum(r.get("time/step_s", 0.0) for r in steps),
    }


def write_report(workdir: str, title: str = "", status: str = "") -> dict:
    """Writes summary.md (with `status`, e.g. where the run stopped, under the title) and
    curves.png into `workdir`; returns the summary dict."""
    rows = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.JSONL_NAME))
    summary = summarize(rows)
    table = metrics_lib.markdown_table(["metric", "value"], [[k, v] for k, v in summary.items()])
    heading = f"# {title or os.path.basename(os.path.abspath(workdir))}\n\n" + (f"{status}\n\n" if status else "")
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(f"{heading}{table}\n")
    if status:
        print(status, flush=True)
    print(table, flush=True)
    start, end = summary["eval_accuracy_start"], summary["eval_accuracy_end"]
    if math.isfinite(start) and math.isfinite(end):
        print(f"held-out accuracy {start:.3f} -> {end:.3f} ({100 * (end - start):+.1f} points)", flush=True)
    metrics_lib.plot_curves({title or "run": rows}, PLOT_KEYS, os.path.join(workdir, "curves.png"),
                            title=title)
    written = sorted(n + ("/" if os.path.isdir(os.path.join(workdir, n)) else "") for n in os.listdir(workdir)
                     if not n.startswith("."))
    print(f"wrote {os.path.abspath(workdir)}: {', '.join(written)}", flush=True)
    return summary
