#!/usr/bin/env bash
# One host's process of a multi-host GPU run: `python main.py --multihost ARGS` from this checkout.
# Start it once on every host with the same ARGS (launch/README.md):
#   SLURM:  srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multihost.sh ARGS
#           (jax.distributed reads the coordinator, process count and id from SLURM)
#   else:   JAX_COORDINATOR_ADDRESS=HOST0:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=I \
#             launch/gpu_multihost.sh ARGS      (I = 0..N-1; launch/gpu_ssh.sh does this over ssh)
# Runs the `python` on PATH (activate the environment with jax[cuda12] first) or $PYTHON. Each
# process takes every GPU of its host; XLA may allocate XLA_PYTHON_CLIENT_MEM_FRACTION of each
# (default here 0.92, the budget of configs/pods' H100 layouts).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${JAX_COORDINATOR_ADDRESS:-} ]]; then
  : "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES with JAX_COORDINATOR_ADDRESS}"
  : "${JAX_PROCESS_ID:?set JAX_PROCESS_ID (0..JAX_NUM_PROCESSES-1) with JAX_COORDINATOR_ADDRESS}"
elif [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "gpu_multihost.sh: not under SLURM and JAX_COORDINATOR_ADDRESS is not set; see launch/README.md" >&2
  exit 2
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "${PYTHON:-python}" main.py --multihost "$@"
