#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): every GPU-only measurement and parity check, one
# command, nothing to install.
#
#   scripts/gpu-check.sh [--dry-run] [--budget-s S] [--stages a,b,...] OUT_DIR
#
# On a GPU: JAX_PLATFORMS=cuda (the backend is asserted to be a GPU), 8-minute time guard.
# --dry-run: the same stages at toy sizes on the CPU (JAX_PLATFORMS=cpu, Pallas interpret mode).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
dry=0
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then dry=1; fi
done
if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=cuda
  # Room for 8B weights + KV pool + activations; stages run one at a time.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
fi
exec python3 "${repo}/scripts/gpu_check.py" "$@"
