#!/usr/bin/env bash
# Install evomerge into the current Python (editable), with the test extras if "dev" is given.
# A torch that is already importable is kept (bring your own CUDA build on GPU machines);
# otherwise the CPU build torch==2.13.0 is installed first, so pip never pulls a multi-GB
# CUDA build by accident.
# Dependencies are pinned to the tested set in constraints.txt (the lock; scripts/lock.sh
# regenerates it). EVOMERGE_UNLOCKED=1 installs the newest versions pyproject.toml allows
# instead; a Python other than the lock's is installed unlocked, with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras="${1:-}"
constraints=()
if [ "${EVOMERGE_UNLOCKED:-0}" != 1 ] && [ -f constraints.txt ]; then
  want=$(sed -n 's/^# python \([0-9.]*\) .*/\1/p' constraints.txt)
  have=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$want" = "$have" ]; then
    # the torch already installed is kept, whatever its version (the lock pins the rest)
    lock=$(mktemp)
    trap 'rm -f "$lock"' EXIT
    grep -v '^torch==' constraints.txt > "$lock"
    constraints=(-c "$lock")
  else
    echo "install: constraints.txt was made with python $want, this is python $have: installing unlocked" >&2
  fi
fi
"$PY" -m pip install --quiet ${constraints[@]+"${constraints[@]}"} -e ".${extras:+[$extras]}"
