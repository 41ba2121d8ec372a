#!/usr/bin/env bash
# Copies this checkout (its committed HEAD) to every worker and installs it with JAX for TPU.
#   launch/setup.sh --name=sspo --zone=us-east5-a [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_common_flags "$@"
[[ ${#EXTRA_ARGS[@]} -eq 0 ]] || die "setup.sh: unknown flag '${EXTRA_ARGS[0]}'"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/sspo_jax-$TPU_NAME.tar.gz"
mapfile -t SCOPE < <(gcloud_scope)

# git archive ships exactly what is committed: no virtualenv, no local runs, no secrets.
run git -C "$REPO" archive --format=tar.gz --prefix=sspo_jax/ -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:~/sspo_jax.tar.gz" "${SCOPE[@]}" --worker=all
on_all_workers "set -e; rm -rf ~/sspo_jax && tar xzf ~/sspo_jax.tar.gz -C ~ \
&& python3 -m venv ~/sspo_jax/.venv && ~/sspo_jax/.venv/bin/pip install -q -U pip \
&& cd ~/sspo_jax && .venv/bin/pip install -q -e '.[tpu]' \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
