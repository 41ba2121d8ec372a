#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource, with --queued). Billing stops only after this.
#   launch/delete.sh --name=sspo --zone=us-east5-a [--queued] [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"

QUEUED=0
for arg in "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    *) die "delete.sh: unknown flag '$arg'" ;;
  esac
done
mapfile -t SCOPE < <(gcloud_scope)

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" --quiet
fi
