#!/usr/bin/env bash
# Runs a training config on every worker at once: one JAX process per host, started with
# --multihost (jax.distributed.initialize() finds the coordinator from the TPU environment).
# Checkpoints go to --checkpoints, a gs:// URL every worker writes its shards to (it outlives a
# preempted VM); metrics and plots to --workdir on each worker (process 0's are the real ones;
# default ~/runs/RUN). Each worker's console goes to ~/sspo_logs/RUN.log (launch/logs.sh).
# Compiled programs are cached in gs://BUCKET/sspo_compile_cache (the bucket of --checkpoints),
# which every worker reads: JAX writes cache entries from process 0 only, so a per-worker local
# directory would leave the other workers recompiling after a preemption. Another place: pass
# --config.compile_cache.dir=... after -- (the last value wins).
#   launch/run.sh --name=sspo --zone=us-east5-a --config=configs/qwen2_5_math_1_5b.py:sspo \
#       --checkpoints=gs://BUCKET/runs/sspo-1p5b [--workdir=DIR] [--run=NAME] [--dry-run] \
#       [-- --config.optimizer.lr=1e-6 ...]
# Rerunning the same command resumes from the newest checkpoint in --checkpoints.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"

CONFIG=""
CHECKPOINTS=""
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
    --checkpoints=*) CHECKPOINTS="${arg#*=}" ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --run=*) RUN_NAME="${arg#*=}" ;;
    --) PASS_THROUGH=1 ;;
    *) die "run.sh: unknown flag '$arg' (trainer flags go after --)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "no config: pass --config=configs/FILE.py[:ARG]"
[[ -n "$CHECKPOINTS" ]] || die "no checkpoints: pass --checkpoints=gs://BUCKET/PATH (shared by all workers)"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG%%.py*}")}"
if [[ "$CHECKPOINTS" == *://* ]]; then  # gs://BUCKET/...: the bucket's top level
  bucket_path="${CHECKPOINTS#*://}"
  COMPILE_CACHE="${CHECKPOINTS%%://*}://${bucket_path%%/*}/sspo_compile_cache"
else  # a directory mounted on every worker: beside it
  COMPILE_CACHE="$(dirname "$CHECKPOINTS")/sspo_compile_cache"
fi

quoted_args=""
for arg in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do quoted_args+=" $(printf '%q' "$arg")"; done

# Default workdir: $HOME/runs/RUN on each worker ($HOME is expanded by the worker's shell).
if [[ -n "$WORKDIR" ]]; then
  workdir_arg="$(printf '%q' "$WORKDIR")"
else
  workdir_arg="\$HOME/runs/$(printf '%q' "$RUN_NAME")"
fi
on_all_workers "mkdir -p ~/sspo_logs && cd ~/sspo_jax && .venv/bin/python -m sspo_jax.train \
--config=$(printf '%q' "$CONFIG") --workdir=$workdir_arg \
--config.checkpoint.dir=$(printf '%q' "$CHECKPOINTS") \
--config.compile_cache.dir=$(printf '%q' "$COMPILE_CACHE") --multihost$quoted_args \
2>&1 | tee ~/sspo_logs/$RUN_NAME.log"
