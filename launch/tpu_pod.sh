#!/usr/bin/env bash
# Run `python main.py --multihost "$@"` on every worker of a Cloud TPU pod slice.
# Needs: gcloud, and TPU, ZONE, PROJECT in the environment.
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
here=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp --suffix=.tar.gz)
git -C "$here" archive --format=tar.gz -o "$tarball" HEAD
gcloud compute tpus tpu-vm scp "$tarball" "$TPU":proxykd.tar.gz --worker=all --zone="$ZONE" --project="$PROJECT"
printf -v args '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone="$ZONE" --project="$PROJECT" --command "
  set -e; mkdir -p proxykd && tar -xzf proxykd.tar.gz -C proxykd && cd proxykd
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -r requirements.txt 'jax[tpu]'
  python main.py --multihost $args"
