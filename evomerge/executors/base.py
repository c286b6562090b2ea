"""What every executor shares: the job/outcome types and the guarded evaluation.

An executor takes jobs ``(key, recipe)`` and yields ``(key, Outcome)`` in completion
order. It never touches the run directory: the search loop (the driver) turns outcomes
into archive records, in the order the candidates were asked.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

log = logging.getLogger(__name__)

Job = tuple[str, Any]  # (key, Recipe)


@dataclass
class Outcome:
    """One candidate's evaluation: finite scores (with standard errors and fidelities),
    timings, and the first line of its error if it failed. Plain data: crosses processes."""

    scores: dict[str, float]
    merge_s: float = 0.0
    eval_s: float = 0.0
    error: str | None = None
    stderr: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, int] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str) -> "Outcome":
        return cls({}, error=error)


MODES = ("generational", "async")


class Executor(Protocol):
    """Evaluates recipes, possibly in parallel; ``map`` yields in completion order.

    ``mode``: ``generational`` (the loop dispatches a whole generation through ``map``) or
    ``async`` (steady state: the loop ``submit``s one job whenever ``idle()`` says a worker
    is free and takes results back one by one with ``next_completed``)."""

    workers: int
    mode: str

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[str, Outcome]]: ...

    def close(self) -> None: ...


class StreamingExecutor(Executor, Protocol):
    """An executor the async loop can drive job by job."""

    def submit(self, key: str, recipe: Any) -> None: ...

    def idle(self) -> int:
        """Free workers minus queued jobs (negative while jobs wait in the queue)."""
        ...

    def next_completed(self) -> tuple[str, Outcome]:
        """Block until a submitted job is done (a worker death re-queues it inside)."""
        ...


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        from evomerge.errors import ConfigError

        raise ConfigError(f"executor.mode must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


def evaluate_outcome(evaluate: Callable[[Any], tuple[dict[str, float], float, float]], recipe: Any) -> Outcome:
    """Run ``evaluate(recipe)``; a failure (exception, non-finite score) becomes an error
    outcome, so one bad candidate never stops the search."""
    error = None
    scores: dict[str, float] = {}
    merge_s = eval_s = 0.0
    try:
        scores, merge_s, eval_s = evaluate(recipe)
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"objective {bad[0]} is not finite")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failed candidate is recorded and scored worst; the search goes on
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.debug("candidate failed: %s", traceback.format_exc())
        free_accelerator_memory()
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}  # keep the archive valid JSON
    # estimators return Scores (a dict) carrying standard errors and fidelities
    stderr = {k: float(v) for k, v in (getattr(scores, "stderr", None) or {}).items() if k in finite and math.isfinite(v)}
    fidelity = {k: int(v) for k, v in (getattr(scores, "fidelity", None) or {}).items() if k in finite}
    return Outcome(finite, float(merge_s), float(eval_s), error, stderr, fidelity)


def free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
