#!/usr/bin/env bash
# Runs a training config on every worker at once (one JAX process per host; on TPU VMs
# jax.distributed.initialize() finds the coordinator itself). Each worker writes its log to
# ~/sspo_logs/RUN.log; collect them with launch/logs.sh.
#   launch/run.sh --name=sspo --zone=us-east5-a --config=configs/qwen2_5_math_1_5b.py:sspo \
#       --workdir=gs://BUCKET/runs/sspo-1p5b [--run=NAME] [--dry-run] [-- --config.optimizer.lr=1e-6 ...]
# Rerunning the same command resumes from the newest checkpoint in --workdir.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"

CONFIG=""
WORKDIR=""
RUN_NAME=""
TRAIN_ARGS=()
PASS_THROUGH=0
for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
  if [[ "$PASS_THROUGH" == 1 ]]; then
    TRAIN_ARGS+=("$arg")
    continue
  fi
  case "$arg" in
    --config=*) CONFIG="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --run=*) RUN_NAME="${arg#*=}" ;;
    --) PASS_THROUGH=1 ;;
    *) die "run.sh: unknown flag '$arg' (trainer flags go after --)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "no config: pass --config=configs/FILE.py[:ARG]"
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir=gs://BUCKET/PATH (shared by all workers)"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG%%.py*}")}"

quoted_args=""
for arg in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do quoted_args+=" $(printf '%q' "$arg")"; done

on_all_workers "mkdir -p ~/sspo_logs && cd ~/sspo_jax && .venv/bin/python -m sspo_jax.train \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$quoted_args \
2>&1 | tee ~/sspo_logs/$RUN_NAME.log"
