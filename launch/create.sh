#!/usr/bin/env bash
# Creates a TPU VM or pod slice.
#   launch/create.sh --name=sspo --zone=us-east5-a --accelerator=v5p-8 [--spot] [--queued] [--dry-run]
# --queued asks through a queued resource (waits for capacity instead of failing); --spot uses
# preemptible capacity (the trainer saves a checkpoint on SIGTERM and resumes on rerun).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"

SPOT=0
QUEUED=0
for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
  case "$arg" in
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    *) die "create.sh: unknown flag '$arg'" ;;
  esac
done

mapfile -t SCOPE < <(gcloud_scope)
SPOT_FLAG=()
[[ "$SPOT" == 1 ]] && SPOT_FLAG=(--spot)

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${SCOPE[@]}" \
    --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
    "${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}"
  echo "queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE" >&2
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
    "${SPOT_FLAG[@]+"${SPOT_FLAG[@]}"}"
fi
