#!/usr/bin/env bash
# Installs everything on a fresh machine (.venv with the versions of launch/requirements.lock,
# CPU torch first), then runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/unit -k config`.
#   MOE_RL_LOCK=0 bash tests/run.sh   # the same against today's newest versions
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MOE_RL_VENV:-$root/.venv}"
if [ "${MOE_RL_SKIP_INSTALL:-0}" != "1" ]; then
  bash launch/install.sh dev
fi
export PYTHONUNBUFFERED=1
# Nothing may come from a model hub: tests build their models and tokenizers locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# pytest's own exit code is passed through: 5 ("no tests collected") fails the run.
exec "$venv/bin/python" -m pytest -q --durations=15 "$@"
