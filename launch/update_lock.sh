#!/usr/bin/env bash
# Deliberate dependency upgrade: resolve today's newest versions (within pyproject's ranges) in
# a fresh venv, run the whole test suite there, and rewrite launch/requirements.lock only when
# it passes. Commit the new lock together with whatever the upgrade needed.
#   bash launch/update_lock.sh            # then: git diff launch/requirements.lock
# Extra arguments go to pytest (e.g. a subset while investigating; the lock is then NOT written).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$(mktemp -d /tmp/moe_rl-lock-venv.XXXXXX)"
trap 'rm -rf "$venv"' EXIT
rmdir "$venv"
MOE_RL_LOCK=0 MOE_RL_VENV="$venv" bash launch/install.sh dev
if ! MOE_RL_VENV="$venv" MOE_RL_SKIP_INSTALL=1 bash tests/run.sh "$@"; then
  echo "[update_lock] the suite fails with today's versions; lock unchanged" >&2
  exit 1
fi
if [ "$#" -gt 0 ]; then
  echo "[update_lock] ran a subset ($*): lock not written"
  exit 0
fi
tmp="$(mktemp "$root/launch/.requirements.lock.XXXXXX")"
{
  sed -n '1,/^# Resolve without it/p' launch/requirements.lock
  echo "pip==$("$venv/bin/python" -m pip --version | cut -d' ' -f2)"
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^#' \
    | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/'
} > "$tmp"
mv "$tmp" launch/requirements.lock
echo "[update_lock] launch/requirements.lock rewritten:"
git --no-pager diff --stat launch/requirements.lock || true
