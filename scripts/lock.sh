#!/usr/bin/env bash
# Regenerate constraints.txt (the lock scripts/install.sh installs with) from the versions
# installed in the current Python. Refresh deliberately, in this order (docs/install.md):
#   EVOMERGE_UNLOCKED=1 bash scripts/install.sh dev   # newest versions the pyproject ranges allow
#   python3 -m pytest                                  # the new set must pass the whole suite
#   bash scripts/lock.sh && git diff constraints.txt   # pin exactly what was tested; commit it
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" scripts/lock.py > constraints.txt.partial
mv constraints.txt.partial constraints.txt
echo "lock: wrote constraints.txt ($(grep -c '==' constraints.txt) pins for $("$PY" -c 'import sys; print(f"python {sys.version_info[0]}.{sys.version_info[1]}")'))"
