"""Model rounds computed in the background while the batch before them is scored.

A model-based strategy fixes its next round when it hands out a batch (``NextRound``: how
many told points it sees, the batch as pending points, the round's number) and calls
``start``; the round runs in one worker process (spawned once, one torch thread: the small
GP gains nothing from more and the scoring keeps the other cores). ``collect`` returns the
result, or None when there is none to give (no worker: a resumed run, a process that may
not have children, a worker that failed) -- the strategy then computes the same round in
process. Nothing here is part of a strategy's pickled state.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class NextRound:
    """A model round fixed in advance: the first ``n_told`` points told, ``pending`` being
    scored, seeded by ``round_no``."""

    n_told: int
    pending: np.ndarray
    round_no: int


_pool: ProcessPoolExecutor | None = None
_running: tuple[NextRound, Future] | None = None
_warming: Future | None = None
_broken = False  # a worker that could not start or died: rounds are computed in process from then on


def scoring_threads(cpu_threads: int, scoring_on_cpu: bool, overlapping: bool) -> int | None:
    """Torch threads for scoring in the driver while the worker proposes, or None to keep
    them: on a CPU the worker takes one core (two busy pools on the same cores made the toy
    main job's scoring 40% slower than one thread alone)."""
    if not (scoring_on_cpu and overlapping) or cpu_threads <= 1:
        return None
    return cpu_threads - 1


def _compute(strategy: Any, spec: NextRound) -> tuple[np.ndarray, float]:
    return strategy.compute_round(spec)


def _worker_init(parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(1)
    # a driver killed outright (SIGKILL, OOM) cannot stop its worker: the worker stops itself
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    import os
    import time

    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)


def _get_pool() -> ProcessPoolExecutor | None:
    global _pool, _broken
    if _pool is None and not _broken:
        try:
            # spawn, not fork: the driver may hold torch threads (fork would copy their locks)
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(os.getpid(),))
        except Exception as exc:  # noqa: BLE001 -- e.g. a daemonic process may not have children
            log.info("proposals in process: no worker (%s)", exc)
            _broken = True
    return _pool


def _import_botorch() -> None:
    import botorch.acquisition.multi_objective.logei  # noqa: F401
    import botorch.optim  # noqa: F401


def warm_up() -> None:
    """Start the worker and its imports now (seconds), so the first round does not wait for them."""
    global _warming
    pool = _get_pool()
    if pool is not None and _warming is None:
        try:
            _warming = pool.submit(_import_botorch)
        except Exception as exc:  # noqa: BLE001
            _give_up(exc)


def start(strategy: Any, spec: NextRound) -> None:
    """Compute ``spec`` in the worker, in the background (replaces a round not collected)."""
    global _running
    pool = _get_pool()
    if pool is None:
        return
    try:
        _running = (spec, pool.submit(_compute, strategy, spec))
    except Exception as exc:  # noqa: BLE001 -- a broken pool: compute in process from now on
        _give_up(exc)


def collect(spec: NextRound) -> tuple[np.ndarray, float] | None:
    """The worker's result for ``spec`` (waits for it), or None when it has none."""
    global _running
    if _running is None or _running[0] is not spec:
        return None
    future = _running[1]
    _running = None
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 -- the round is computed again in process: same numbers
        _give_up(exc)
        return None


def _give_up(exc: BaseException) -> None:
    global _broken
    log.warning("proposal worker failed (%s: %s); proposing in process from now on", type(exc).__name__, exc)
    _broken = True
    shutdown()


def shutdown() -> None:
    """Stop the worker (a round still running is abandoned: the search has ended)."""
    global _pool, _running, _warming
    pool, _pool, _running, _warming = _pool, None, None, None
    if pool is not None:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()  # a round nobody will collect need not finish
        pool.shutdown(wait=False, cancel_futures=True)


atexit.register(shutdown)
