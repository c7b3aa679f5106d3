#!/usr/bin/env bash
# Shared set-up for launch/quickstart.sh and tests/run.sh: a .venv at the repository root
# with the CPU build of torch installed FIRST (an unpinned torch would pull GBs of CUDA
# wheels), then this project with the extras named in $1 (e.g. "dev").
# Re-running is cheap: the install is skipped while pyproject.toml and this file are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.moe_rl-install-stamp"
want="$(cat "$root/pyproject.toml" "$root/launch/install.sh" "$root/tests/requirements-test.txt" 2>/dev/null | sha256sum | cut -d' ' -f1)-$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)
"${pip[@]}" --upgrade pip >/dev/null
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch==${MOE_RL_TORCH_VERSION:-2.13.0} (CPU build where the machine provides it)"
  "${pip[@]}" "torch==${MOE_RL_TORCH_VERSION:-2.13.0}"
fi
echo "[install] moe_rl${extras:+[$extras]}"
"${pip[@]}" -e "$root${extras:+[$extras]}"
if [ "$extras" = "dev" ] && [ -f "$root/tests/requirements-test.txt" ]; then
  "${pip[@]}" -r "$root/tests/requirements-test.txt"
  # SGLang's own request schema, to validate every body our client sends. Only the wheel's
  # pure-Python files are used; its dependencies (CUDA kernels) are not installed.
  "${pip[@]}" --no-deps "sglang==0.5.23"
fi
echo "$want" > "$stamp"
