#!/usr/bin/env bash
# Install evomerge into the current Python (editable), with the test extras if "dev" is given.
# A torch that is already importable is kept (bring your own CUDA build on GPU machines);
# otherwise the CPU build torch==2.13.0 is installed first, so pip never pulls a multi-GB
# CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extras="${1:-}"
"$PY" -m pip install --quiet -e ".${extras:+[$extras]}"
