#!/usr/bin/env bash
# Installs everything on a fresh machine (.venv with the versions of launch/requirements.lock,
# CPU torch first), then runs the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh tests/unit -k config` (one pytest run).
# Without arguments: two steps, all tests but tests/slurm, then the Slurm suite
# (MOE_RL_SKIP_SLURM=1 skips that one).
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
pytest=("$venv/bin/python" -m pytest -q --durations=15)
# pytest's own exit code is passed through: 5 ("no tests collected") fails the run.
if [ "$#" -gt 0 ]; then
  exec "${pytest[@]}" "$@"
fi
# Step 1: everything but the Slurm suite.
rc=0
"${pytest[@]}" --ignore=tests/slurm tests || rc=$?
# Step 2: the Slurm suite, on a real two-node Slurm cluster that tests/slurm/cluster.py brings
# up on this machine (root; it apt-get installs slurm-wlm and munge when missing). CI always
# runs it, and there a machine that cannot host the cluster is a failure, not a skip.
# Developers skip it with MOE_RL_SKIP_SLURM=1.
if [ "${MOE_RL_SKIP_SLURM:-0}" = "1" ]; then
  echo "[run.sh] MOE_RL_SKIP_SLURM=1: the Slurm suite (tests/slurm) is skipped"
else
  start=$SECONDS
  MOE_RL_SLURM_REQUIRED=1 "${pytest[@]}" tests/slurm || { s=$?; [ "$rc" != 0 ] || rc=$s; }
  echo "[run.sh] Slurm suite: $((SECONDS - start)) s"
fi
exit "$rc"
