#!/usr/bin/env bash
# The README's main command. Installs everything on a fresh machine (.venv, CPU torch first),
# then a tiny Qwen3-MoE policy learns "the largest of four digits" by GRPO through the RL loop:
# EP=2 on 2 CPU processes over gloo, rollouts from the embedded engine in each process, weight
# sync after every step. Prints the reward curve's start and end and where the metrics and
# tensorboard files are. Extra arguments are config overrides, e.g.
#   bash launch/quickstart.sh train.steps=20 optim.lr=1e-3 train.seed=2 output_dir=runs/lr1e-3
# Re-running with the same output_dir resumes from its newest checkpoint (and, once done, does
# nothing more); pass output_dir=runs/other for a fresh run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
  -m moe_rl.launch launch/configs/quickstart.yaml "$@"
