#!/usr/bin/env bash
# One call on a machine with a CUDA GPU (scripts/gpu_check.py does the work, < 8 minutes):
#   bash scripts/gpu_check.sh OUT_DIR                 # on the GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --device cpu --quick   # what CI runs, so it cannot rot
# Installs what the device machine lacks (pymoo, lm-eval, hydra, ...) from wheels carried in
# .whl/ (pip download -d .whl -c constraints.txt -e . on a machine with the registries), then
# writes OUT_DIR/gpu_check.json: merge ms / copy-bound ratio / peak memory per method for the
# SmolLM2 and a 1B Llama shape (bf16), a 24-evaluation default search with device=cuda, and
# CUDA-vs-CPU merges of the same recipes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick]}"
shift
PY="${PYTHON:-python3}"
if ! "$PY" -c "import evomerge, pymoo, lm_eval, hydra, botorch" >/dev/null 2>&1; then
  if [ -d .whl ]; then
    echo "gpu_check: installing from the carried wheels in .whl/" >&2
    "$PY" -m pip install --quiet --no-index --find-links .whl --no-deps -e . >/dev/null
    "$PY" -m pip install --quiet --no-index --find-links .whl -e . 2>&1 | tail -2 >&2
  else
    echo "gpu_check: evomerge's dependencies are missing and no .whl/ folder was carried; installing from the registry" >&2
    bash scripts/install.sh
  fi
fi
exec "$PY" scripts/gpu_check.py "$out" "$@"
