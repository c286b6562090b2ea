#!/usr/bin/env bash
# CI: build the wheel, check it holds every package and data file, install it with the lock
# into a clean virtual environment and run the installed evomerge from outside the checkout:
# `evomerge --help` and a tiny real run (the tiny toy zoo, 4 evaluations). A few minutes.
# (The test suite runs on an editable install, which cannot notice a package missing from the wheel.)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY="${PYTHON:-python3}"
work=$(mktemp -d "${TMPDIR:-/tmp}/evomerge-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
say() { echo "check_wheel: $*" >&2; }

say "building the wheel"
had_build=$([ -d "$repo/build" ] && echo yes || echo no)
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
wheel=$(ls "$work"/dist/evomerge-*.whl)
if [ "$had_build" = no ] && [ -d "$repo/build" ]; then say "pip wheel left build/ in the source tree"; exit 1; fi
say "wheel: $(du -k "$wheel" | cut -f1) KB"

say "checking its contents"
"$PY" - "$wheel" "$repo" <<'PYEOF'
import sys, zipfile
from pathlib import Path

wheel, repo = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
expected = [f"evomerge/{p.relative_to(repo / 'evomerge').as_posix()}" for p in (repo / "evomerge").rglob("*.py") if "__pycache__" not in p.parts]
for src, dst in (("configs", "evomerge/configs"), ("fitness", "evomerge/fitness_tasks")):
    expected += [f"{dst}/{p.relative_to(repo / src).as_posix()}" for p in (repo / src).rglob("*") if p.suffix in (".py", ".yaml", ".jsonl")]
# the shipped toy zoo: every weight, config and tokenizer file
expected += [f"evomerge/{p.relative_to(repo / 'evomerge').as_posix()}" for p in (repo / "evomerge" / "zoo" / "shipped").rglob("*") if p.is_file()]
missing = sorted(set(expected) - names)
if missing:
    sys.exit(f"check_wheel: the wheel lacks {len(missing)} files, e.g. {missing[:5]}")
print(f"check_wheel: {len(names)} files, none missing", file=sys.stderr)
PYEOF

say "installing it into a clean virtual environment (torch==2.13.0, then the wheel with constraints.txt)"
"$PY" -m venv "$work/venv"
V="$work/venv/bin"
"$V/python" -m pip install --quiet "torch==2.13.0"
"$V/python" -m pip install --quiet -c "$repo/constraints.txt" "$wheel"

mkdir "$work/outside" && cd "$work/outside"   # nothing of the checkout is importable from here
"$V/python" - <<'PYEOF'
import evomerge, evomerge.configs, evomerge.fitness_tasks, evomerge.dfs
assert "site-packages" in evomerge.__file__, evomerge.__file__
PYEOF
TIMEFORMAT=%R
seconds=$( { time "$V/evomerge" --help > help.txt; } 2>&1 )
say "evomerge --help answered in $seconds s"
grep -q "^usage:" help.txt && grep -q "evomerge export run=" help.txt

say "a tiny run with the installed evomerge"
EVOMERGE_CACHE="$work/cache" "$V/evomerge" modelpool.size=tiny search.max_evals=4 algorithm.pop_size=4 \
  fitness.test_rescore=false hydra.run.dir="$work/outside/run" > run.txt
grep -q "^done: 4 candidates" run.txt || { cat run.txt; exit 1; }
for f in summary.json environment.json report.html; do test -s "run/$f" || { say "run/$f missing"; exit 1; }; done
"$V/python" -c "import json; e = json.load(open('run/environment.json')); assert e['zoo']['digest'] and e['versions']['torch'], e"
# the shipped zoo, from site-packages, with no training: nothing was built in the cache
test ! -e "$work/cache" || { say "the installed evomerge trained a zoo into $work/cache instead of using the shipped one"; exit 1; }
grep -q "site-packages/evomerge/zoo/shipped/tiny" run/environment.json || { say "the run did not use the shipped zoo"; exit 1; }
say "ok: the wheel installs and runs (${SECONDS} s in all)"
