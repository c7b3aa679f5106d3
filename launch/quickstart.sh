#!/usr/bin/env bash
# Installs everything on a fresh machine (.venv, CPU torch first), then runs a tiny MoE on
# 2 CPU processes (EP=2): parity against transformers, then a few training steps through
# Megatron-Core's real schedule, DDP and distributed optimizer.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=10`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
  launch/quickstart.py launch/configs/quickstart.yaml "$@"
