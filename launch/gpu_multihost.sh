#!/usr/bin/env bash
# One process per host (SLURM task or ssh); JAX finds its peers via SLURM or JAX_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec python main.py --multihost "$@"
