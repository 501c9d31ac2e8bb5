#!/usr/bin/env bash
# Start launch/gpu_multihost.sh on every host of HOSTS over ssh (host i is process i, the first host
# runs the coordinator), prefix each output line with its host, wait for all, exit with the first
# failure's status.
#   HOSTS="gpu-0 gpu-1" launch/gpu_ssh.sh --config=configs/proxy_sft.py:pod=h100x16_llama2 \
#       --workdir=/shared/runs/exp1 --config.init_from=/shared/models/Llama-2-70b-hf
# Environment: HOSTS (required); PORT (coordinator port, default 12355); COORDINATOR (the first
# host's address as the others reach it, default its name in HOSTS); REMOTE_DIR (the checkout on
# every host, default ~/proxykd); VENV (relative to REMOTE_DIR, default .venv).
set -euo pipefail
: "${HOSTS:?set HOSTS to the hosts, space-separated, e.g. HOSTS=\"gpu-0 gpu-1\"}"
read -r -a hosts <<< "$HOSTS"
[[ $# -gt 0 ]] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
coordinator="${COORDINATOR:-${hosts[0]}}:${PORT:-12355}"
printf -v args '%q ' "$@"
pids=()
for i in "${!hosts[@]}"; do
  host=${hosts[$i]}
  (  # a subshell per host: its status is ssh's (pipefail), not sed's
    ssh -o BatchMode=yes "$host" "cd ${REMOTE_DIR:-~/proxykd} && . ${VENV:-.venv}/bin/activate && \
      JAX_COORDINATOR_ADDRESS=$coordinator JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=$i \
      launch/gpu_multihost.sh $args" 2>&1 | sed -u "s/^/[$host] /"
  ) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [[ $status -ne 0 ]] || status=$code; }
done
exit "$status"
