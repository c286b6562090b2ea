"""In-process evaluation, one candidate at a time (the default executor)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from evomerge.executors.base import Job, Outcome, check_mode, evaluate_outcome


class LocalExecutor:
    """Evaluates each job with ``evaluate(recipe) -> (scores, merge_s, eval_s)`` in order."""

    workers = 1
    mode = "generational"

    def __init__(self, evaluate: Callable[[Any], tuple[dict[str, float], float, float]]):
        self.evaluate = evaluate

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[str, Outcome]]:
        for key, recipe in jobs:
            yield key, evaluate_outcome(self.evaluate, recipe)

    def close(self) -> None:
        pass


def local_executor(session: Any, cfg: Any = None, run_dir: Path | None = None, mode: str = "generational") -> LocalExecutor:
    """``executor=local``: the driver's own session evaluates. ``mode=async`` is ignored with
    a warning: one in-process worker never waits at a generation barrier, so there is
    nothing for a steady state to win back."""
    if check_mode(mode) == "async":
        print("warning: executor.mode=async has no effect with executor=local (one in-process worker never idles); running generational", file=sys.stderr, flush=True)
    return LocalExecutor(session.evaluate)


def as_executor(evaluate: Any) -> Any:
    """An executor as is; a plain evaluate callable wrapped in a LocalExecutor."""
    return evaluate if hasattr(evaluate, "map") else LocalExecutor(evaluate)
