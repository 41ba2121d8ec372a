#!/usr/bin/env bash
# Shared flag parsing and command runner for the TPU VM scripts. Sourced, not run.
#
# Every script takes the same flags (or the environment variables in brackets):
#   --name=NAME          TPU VM / node name               [TPU_NAME]   (required)
#   --zone=ZONE          e.g. us-east5-a                  [ZONE]       (required)
#   --project=PROJECT    GCP project (default: gcloud's)  [PROJECT]
#   --accelerator=TYPE   e.g. v4-8, v5litepod-8, v5p-8, v5p-64  [ACCELERATOR] (default v5p-8)
#   --runtime=VERSION    TPU software version (default: chosen from the accelerator family)
#   --dry-run            print every gcloud command instead of running it
# Script-specific flags are collected in EXTRA_ARGS for the caller to parse.

set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
RUNTIME="${RUNTIME:-}"
DRY_RUN=0
EXTRA_ARGS=()

die() {
  echo "error: $*" >&2
  exit 2
}

parse_common_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --name=*) TPU_NAME="${arg#*=}" ;;
      --zone=*) ZONE="${arg#*=}" ;;
      --project=*) PROJECT="${arg#*=}" ;;
      --accelerator=*) ACCELERATOR="${arg#*=}" ;;
      --runtime=*) RUNTIME="${arg#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      *) EXTRA_ARGS+=("$arg") ;;
    esac
  done
  [[ -n "$TPU_NAME" ]] || die "no TPU name: pass --name=NAME or set TPU_NAME"
  [[ -n "$ZONE" ]] || die "no zone: pass --zone=ZONE or set ZONE"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "TPU name '$TPU_NAME' is not valid: lowercase letters, digits and '-', starting with a letter"
  if [[ -z "$RUNTIME" ]]; then
    RUNTIME="$(default_runtime "$ACCELERATOR")"
  fi
}

# The TPU software version matching an accelerator family (see the Cloud TPU docs' runtime table).
default_runtime() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown accelerator type '$1': use e.g. v4-8, v5litepod-8, v5p-8, v6e-8, or pass --runtime" ;;
  esac
}

# Flags every gcloud tpu command shares.
gcloud_scope() {
  local scope=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && scope+=(--project="$PROJECT")
  printf '%s\n' "${scope[@]}"
}

# Runs a command, or prints it (shell-quoted, one line) with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local quoted=()
    local word
    for word in "$@"; do quoted+=("$(printf '%q' "$word")"); done
    echo "${quoted[*]}"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# Runs a shell command line on every worker of the slice (all hosts at once).
on_all_workers() {
  local scope
  mapfile -t scope < <(gcloud_scope)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${scope[@]}" --worker=all --command="$1"
}
