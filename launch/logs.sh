#!/usr/bin/env bash
# Copies every worker's training log to ./logs/NAME/worker-I.log.
#   launch/logs.sh --name=sspo --zone=us-east5-a --run=RUN [--workers=N] [--dry-run]
# The worker count is read from the TPU's description unless --workers is given.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"

RUN_NAME=""
WORKERS=""
for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
  case "$arg" in
    --run=*) RUN_NAME="${arg#*=}" ;;
    --workers=*) WORKERS="${arg#*=}" ;;
    *) die "logs.sh: unknown flag '$arg'" ;;
  esac
done
[[ -n "$RUN_NAME" ]] || die "no run name: pass --run=RUN (the log name run.sh used)"
mapfile -t SCOPE < <(gcloud_scope)

if [[ -z "$WORKERS" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    die "--dry-run cannot ask gcloud for the worker count: pass --workers=N"
  fi
  WORKERS="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE[@]}" \
    --format='value(networkEndpoints.len())')"
fi
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "worker count '$WORKERS' is not a positive integer"

OUT="logs/$TPU_NAME"
run mkdir -p "$OUT"
for ((i = 0; i < WORKERS; i++)); do
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:~/sspo_logs/$RUN_NAME.log" "$OUT/worker-$i.log" \
    "${SCOPE[@]}" --worker="$i"
done
