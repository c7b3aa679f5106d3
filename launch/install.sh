#!/usr/bin/env bash
# Shared set-up for launch/quickstart.sh and tests/run.sh: a .venv at the repository root with
# exactly the versions of launch/requirements.lock (pip constraints), the CPU build of torch
# installed FIRST (an unpinned torch would pull GBs of CUDA wheels), then this project with
# the extras named in $1 (e.g. "dev").
#   MOE_RL_LOCK=0   resolve against today's index instead of the lock (what update_lock.sh does)
#   PYTHON=...      interpreter for a new .venv (default python3)
#   MOE_RL_VENV=... where the venv lives (default .venv at the repository root)
# Re-running is cheap: the install is skipped while pyproject.toml, the lock and this file are
# unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${MOE_RL_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
lock="$root/launch/requirements.lock"
use_lock="${MOE_RL_LOCK:-1}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.moe_rl-install-stamp"
want="$(cat "$root/pyproject.toml" "$root/launch/install.sh" "$lock" "$root/tests/requirements-test.txt" 2>/dev/null \
  | sha256sum | cut -d' ' -f1)-$extras-lock$use_lock"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)
constraints=()
if [ "$use_lock" != "0" ]; then
  [ -f "$lock" ] || { echo "[install] $lock is missing (MOE_RL_LOCK=0 resolves without it)" >&2; exit 2; }
  constraints=(-c "$lock")
  "${pip[@]}" "$(grep '^pip==' "$lock")" >/dev/null
  echo "[install] versions from launch/requirements.lock"
else
  "${pip[@]}" --upgrade pip >/dev/null
  echo "[install] MOE_RL_LOCK=0: resolving against today's index"
fi
torch_spec="torch==${MOE_RL_TORCH_VERSION:-2.13.0}"
[ "$use_lock" != "0" ] && torch_spec="torch"
echo "[install] $torch_spec first (CPU build where the machine provides it)"
"${pip[@]}" "${constraints[@]}" "$torch_spec"
echo "[install] moe_rl${extras:+[$extras]}"
"${pip[@]}" "${constraints[@]}" -e "$root${extras:+[$extras]}"
if [ "$extras" = "dev" ] && [ -f "$root/tests/requirements-test.txt" ]; then
  "${pip[@]}" "${constraints[@]}" -r "$root/tests/requirements-test.txt"
  # SGLang's own request schema, to validate every body our client sends; verl's and TRL's own
  # loss and advantage functions, to check our algorithms against. Only the wheels' pure-Python
  # source is read by the tests; their dependencies (CUDA kernels, ray) are not installed.
  "${pip[@]}" "${constraints[@]}" --no-deps "sglang==0.5.23" "verl==0.9.1" "trl==1.16.0"
fi
if [ "$use_lock" != "0" ]; then
  # Anything installed at another version than the lock (an older .venv) is a failed install.
  "$venv/bin/python" - "$lock" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" not in line:
        continue
    name, want = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        continue  # not needed by these extras
    if have.split("+")[0] != want:
        bad.append(f"{name} {have} (lock: {want})")
if bad:
    sys.exit("[install] installed versions differ from launch/requirements.lock: " + ", ".join(bad))
PY
fi
echo "$want" > "$stamp"
