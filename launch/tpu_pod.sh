#!/usr/bin/env bash
# Cloud TPU pod slices: create the TPU VM, copy this checkout to every worker, install, and run the
# same `python main.py --multihost ...` on all workers at once (launch/README.md, step by step).
#
#   export TPU=proxykd ZONE=us-east5-a PROJECT=my-project ACCELERATOR=v5p-32
#   launch/tpu_pod.sh create        # the slice (SPOT=1: a spot VM; DATA_DISK=...: a read-only disk)
#   launch/tpu_pod.sh setup         # copy the checkout + install on every worker (again after edits)
#   launch/tpu_pod.sh run --config=configs/proxy_sft.py:pod=v5p-32_llama2 --workdir=gs://B/run ...
#   launch/tpu_pod.sh logs [WORKER] # follow a worker's log (default 0); Ctrl-C stops following only
#   launch/tpu_pod.sh wait          # until the run ends on every worker; its exit status
#   launch/tpu_pod.sh stop          # end the run on every worker
#   launch/tpu_pod.sh one --config=configs/prior.py --workdir=gs://B/run   # worker 0, CPU only
#   launch/tpu_pod.sh delete
#
# Environment: TPU, ZONE, PROJECT (required); ACCELERATOR (create; e.g. v4-64, v5p-32); RUNTIME
# (create; default by generation: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e
# v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e); SPOT=1 (create); DATA_DISK (create: a persistent
# disk, e.g. projects/P/zones/Z/disks/llama-weights, attached read-only to every worker; setup
# mounts it at /mnt/weights); PYTHON_VERSION (setup, default 3.11); JAX_SPEC (setup, default
# "jax[tpu]>=0.10").
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
root=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=proxykd  # under each worker's home directory
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --project="$PROJECT")

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

on_workers() {  # on_workers WORKER COMMAND: COMMAND in a login shell of worker(s) WORKER
  "${gcloud_tpu[@]}" ssh "$TPU" --worker="$1" "${where[@]}" --command "$2"
}

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "tpu_pod.sh: no default RUNTIME for ACCELERATOR=$1; set RUNTIME" >&2; exit 2 ;;
  esac
}

checkout_tarball() {  # the working tree's files (tracked and untracked, not ignored) -> $1
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
    | tar -czf "$1" --null -T -)
}

refuse_teacher_stages() {  # collect and serve_teacher call or serve the teacher: one machine only
  local arg prev=""
  for arg in "$@"; do
    [[ $prev =~ ^--?config$ ]] && arg="--config=$arg"
    prev=$arg
    if [[ $arg =~ ^--?config=.*(collect|serve_teacher)\.py ]]; then
      echo "tpu_pod.sh: ${BASH_REMATCH[1]} talks to the teacher API; run it on one machine" \
           "(your workstation, or: launch/tpu_pod.sh one ...), not on every worker" >&2
      exit 2
    fi
  done
}

cmd=${1:-}
[[ -n $cmd ]] || usage
shift

case "$cmd" in
  create)
    : "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-32}"
    runtime=${RUNTIME:-$(default_runtime "$ACCELERATOR")}
    extra=()
    [[ ${SPOT:-0} == 1 ]] && extra+=(--spot)
    [[ -n ${DATA_DISK:-} ]] && extra+=(--data-disk "source=$DATA_DISK,mode=read-only")
    "${gcloud_tpu[@]}" create "$TPU" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$runtime" "${extra[@]}"
    ;;
  setup)
    tarball=$(mktemp "${TMPDIR:-/tmp}/proxykd.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    checkout_tarball "$tarball"
    "${gcloud_tpu[@]}" scp "$tarball" "$TPU":proxykd-code.tar.gz --worker=all "${where[@]}"
    mount=""
    if [[ -n ${DATA_DISK:-} ]]; then
      mount="sudo mkdir -p /mnt/weights && { mountpoint -q /mnt/weights || sudo mount -o ro,noload /dev/sdb /mnt/weights; }"
    fi
    on_workers all "set -euo pipefail
      ${mount}
      mkdir -p ~/$remote_dir && cd ~/$remote_dir
      find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name 'run.*' -exec rm -rf {} +
      tar -xzf ~/proxykd-code.tar.gz && rm ~/proxykd-code.tar.gz
      python3 -m pip install --user --quiet --upgrade uv
      [ -x .venv/bin/python ] || ~/.local/bin/uv venv --quiet --python ${PYTHON_VERSION:-3.11} .venv
      ~/.local/bin/uv pip install --quiet --python .venv/bin/python -r requirements.txt \
        -r requirements-gcs.txt '${JAX_SPEC:-jax[tpu]>=0.10}'
      .venv/bin/python -c 'import jax, proxykd; print(\"jax\", jax.__version__, \"ready\")'"
    ;;
  run)
    [[ $# -gt 0 ]] || usage
    refuse_teacher_stages "$@"
    # Detached (nohup, its own session): a dropped ssh connection does not end the run. Each worker
    # logs to ~/proxykd/run.log; run.pid is the run's process group, run.status its exit status.
    printf -v args '%q ' "$@"
    printf -v job '%q' ".venv/bin/python main.py --multihost $args > run.log 2>&1; echo \$? > run.status"
    on_workers all "set -euo pipefail; cd ~/$remote_dir
      if [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; then
        echo \"worker: a run is still going (pid \$(cat run.pid)); launch/tpu_pod.sh stop\" >&2; exit 1
      fi
      rm -f run.status
      nohup setsid bash -c $job < /dev/null > /dev/null 2>&1 &
      echo \$! > run.pid"
    echo "started on every worker of $TPU; follow with: launch/tpu_pod.sh logs"
    ;;
  one)
    [[ $# -gt 0 ]] || usage
    printf -v args '%q ' "$@"
    # One process on worker 0, CPU only (the TPU runtime expects every worker of the slice).
    on_workers 0 "cd ~/$remote_dir && JAX_PLATFORMS=cpu .venv/bin/python main.py $args"
    ;;
  logs)
    on_workers "${1:-0}" "tail -n 200 -F ~/$remote_dir/run.log"
    ;;
  wait)
    on_workers all "cd ~/$remote_dir; while [ ! -f run.status ]; do
        kill -0 \$(cat run.pid) 2>/dev/null || { echo 'worker: run ended without a status' >&2; exit 1; }
        sleep 30; done; exit \$(cat run.status)"
    ;;
  stop)
    on_workers all "cd ~/$remote_dir; [ -f run.pid ] && kill -- -\$(cat run.pid) 2>/dev/null; rm -f run.pid; true"
    ;;
  delete)
    "${gcloud_tpu[@]}" delete "$TPU" "${where[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
