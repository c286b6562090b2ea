"""Run one ``python -m evomerge`` search as a child process, for the experiment scripts.

A child process per run keeps every run's state (models, lm-eval tasks, Hydra) separate, and
a failed run stops the experiment with the tail of its log instead of a long traceback.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def run_evomerge(args: list[str], target: Path, tag: str, tail_lines: int = 6) -> Path:
    started = time.time()
    print(f"[{tag}] {target}: python -m evomerge {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:]
        raise SystemExit(f"[{tag}] run failed ({target}):\n" + "\n".join(tail))
    print(f"[{tag}]   done in {time.time() - started:.0f}s", flush=True)
    return target
