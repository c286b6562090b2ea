"""``executor=ray``: candidates evaluated in parallel by Ray actors, on one machine or a cluster.

Each actor builds its own merger and fitness estimator once, from the run's resolved
config, in a private scratch folder that holds copies of the run's state files (subset,
fingerprints, estimator state): actors never write the run directory, the driver stays
its only writer. ``map`` keeps every actor busy and yields outcomes as they complete;
``submit`` / ``idle`` / ``next_completed`` expose the same queue job by job, for the
steady-state (``mode=async``) search loop.

Faults: an actor that dies (killed process, OOM kill, lost node) is replaced and its
candidate re-queued; a candidate whose evaluation kills two workers is returned as failed.
``close`` kills the actors and shuts down a Ray instance this executor started; it runs on
every exit the driver controls: normal end, an error, Ctrl-C, SIGTERM (turned into Ctrl-C
while the executor is open) and interpreter exit (atexit). A SIGKILL of the driver runs no
code: Ray's own processes notice the lost driver and exit within a minute or two
(docs/reliability.md).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError, EvomergeError
from evomerge.executors.base import Job, Outcome, check_mode, evaluate_outcome

log = logging.getLogger(__name__)

# run-dir files a worker reads (never writes): written by the driver's session first
STATE_FILES = ("fingerprints.json", "subset.json", "fidelity.json", "irt.json")
MAX_ATTEMPTS = 2  # a candidate that kills this many workers is recorded as failed


class EvalWorker:
    """The actor: one session (merger + estimator) per process, built once."""

    def __init__(self, cfg_yaml: str, state: dict[str, bytes], cwd: str, threads: int):
        import torch

        if os.path.isdir(cwd):  # relative paths in the config mean what they mean to the driver
            os.chdir(cwd)
        if threads > 0:
            torch.set_num_threads(threads)
        from evomerge.estimators.lm_eval_fitness import quiet_libraries
        from evomerge.session import open_session

        quiet_libraries()
        self._scratch = tempfile.TemporaryDirectory(prefix="evomerge-worker-")
        scratch = Path(self._scratch.name)
        for name, data in state.items():
            (scratch / name).write_bytes(data)
        cfg = OmegaConf.create(cfg_yaml)
        self.session = open_session(cfg, scratch)  # checks the copied fingerprints; writes only to scratch

    def ready(self) -> int:
        return os.getpid()

    def evaluate(self, recipe: dict[str, Any]) -> Outcome:
        from evomerge.merge.recipe import Recipe

        return evaluate_outcome(self.session.evaluate, Recipe.from_dict(recipe))


def _death_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "ObjectLostError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


class RayExecutor:
    """``workers`` actors; ``address``: None starts a local Ray sized for them, ``auto`` or
    ``host:port`` / ``ray://...`` joins a running cluster."""

    # fault-injection hook for tests: on_submit(executor, slot, key) after each dispatch
    on_submit: Callable[["RayExecutor", int, str], None] | None = None

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        workers: int = 2,
        address: str | None = None,
        cpus_per_worker: int = 1,
        gpus_per_worker: float | str = "auto",
        mode: str = "generational",
    ):
        self.mode = check_mode(mode)
        try:
            import ray
        except ImportError:
            raise ConfigError("executor=ray needs Ray: pip install 'evomerge[ray]'") from None
        if int(workers) < 1 or int(cpus_per_worker) < 1:
            raise ConfigError(f"executor.workers and executor.cpus_per_worker must be at least 1, got {workers} and {cpus_per_worker}")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.workers = int(workers)
        self.cpus = int(cpus_per_worker)
        self._started_ray = False
        self._sigterm_before_ray = _current_sigterm()  # ray.init installs its own and shutdown leaves it
        if not ray.is_initialized():
            if address in (None, "", "null"):
                try:  # "local": always a new instance of our own, never a cluster found on this host
                    ray.init(address="local", num_cpus=self.workers * self.cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
                except Exception as exc:  # noqa: BLE001 -- e.g. the raylet did not come up in time on a loaded machine
                    ray.shutdown()  # what did come up (GCS, raylet) must not linger
                    raise EvomergeError(f"cannot start a local Ray instance: {_first_line(exc)}; try again, or use executor=local") from None
            else:
                try:
                    ray.init(address=str(address), log_to_driver=True, configure_logging=False)
                except ConnectionError as exc:
                    raise ConfigError(f"executor.address={address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})") from None
            self._started_ray = True
        self._previous_sigterm = _sigterm_as_interrupt()
        atexit.register(self.close)
        if gpus_per_worker == "auto":
            gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        options: dict[str, Any] = {"num_cpus": self.cpus, "max_restarts": 0, "max_task_retries": 0}
        if float(gpus_per_worker) > 0:
            options["num_gpus"] = float(gpus_per_worker)
        self._actor_cls = ray.remote(**options)(EvalWorker)
        cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        state = {name: (Path(run_dir) / name).read_bytes() for name in STATE_FILES if (Path(run_dir) / name).is_file()}
        self._args = (cfg_yaml, state, os.getcwd(), 0 if options.get("num_gpus") else self.cpus)
        self.actors: list[Any] = []
        self.pids: list[int | None] = []
        self.events: list[str] = []
        self._queue: deque[Job] = deque()
        self._idle: deque[int] = deque(range(self.workers))
        self._in_flight: dict[Any, tuple[int, str, Any]] = {}
        self._attempts: dict[str, int] = {}  # deaths per job key, while it is queued or running
        try:
            self.actors = [self._actor_cls.remote(*self._args) for _ in range(self.workers)]
            self.pids = list(ray.get([a.ready.remote() for a in self.actors]))
        except _death_errors() + (ray.exceptions.RayTaskError,) as exc:
            self.close()
            raise EvomergeError(f"a Ray worker could not start: {_first_line(exc)}") from None
        except BaseException:
            self.close()
            raise
        session = f"; Ray session {_session_dir()}" if self._started_ray and _session_dir() else ""
        print(f"executor: {self.workers} Ray workers ({'1 GPU' if options.get('num_gpus') else f'{self.cpus} CPU'} each){session}", file=sys.stderr, flush=True)

    def _replace(self, slot: int) -> None:
        import ray

        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone
            pass
        self.actors[slot] = self._actor_cls.remote(*self._args)
        self.pids[slot] = None

    def _note(self, message: str) -> None:
        self.events.append(message)
        log.warning(message)
        print(f"executor: {message}", file=sys.stderr, flush=True)

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[str, Outcome]]:
        for key, recipe in jobs:
            self.submit(key, recipe)
        while self._queue or self._in_flight:
            yield self.next_completed()

    # ---- streaming (``map`` and the async loop): a queue in front of the idle workers
    def submit(self, key: str, recipe: Any) -> None:
        self._queue.append((key, recipe))
        self._fill()

    def idle(self) -> int:
        return len(self._idle) - len(self._queue)

    def _fill(self) -> None:
        while self._queue and self._idle:
            slot = self._idle.popleft()
            key, recipe = self._queue.popleft()
            self._in_flight[self.actors[slot].evaluate.remote(recipe.to_dict())] = (slot, key, recipe)
            if self.on_submit is not None:
                self.on_submit(self, slot, key)

    def next_completed(self) -> tuple[str, Outcome]:
        import ray

        deaths = _death_errors()
        while True:
            if not self._in_flight:
                raise RuntimeError("next_completed() with nothing submitted")
            ready, _ = ray.wait(list(self._in_flight), num_returns=1)
            slot, key, recipe = self._in_flight.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except deaths as exc:
                self._attempts[key] = self._attempts.get(key, 0) + 1
                self._replace(slot)
                self._idle.append(slot)
                if self._attempts[key] < MAX_ATTEMPTS:
                    self._note(f"worker {slot} died ({type(exc).__name__}) evaluating a candidate; replaced, candidate re-queued")
                    self._queue.appendleft((key, recipe))
                    self._fill()
                    continue
                self._note(f"worker {slot} died ({type(exc).__name__}); the candidate killed {MAX_ATTEMPTS} workers and is recorded as failed")
                outcome = Outcome.failed(f"WorkerDied: the candidate's evaluation killed {MAX_ATTEMPTS} Ray workers ({type(exc).__name__})")
            except ray.exceptions.RayError as exc:  # anything else Ray reports: a failed candidate
                if isinstance(exc, KeyboardInterrupt) or isinstance(getattr(exc, "cause", None), KeyboardInterrupt):
                    raise KeyboardInterrupt from None  # Ctrl-C reached the worker first: not the candidate's fault
                self._idle.append(slot)
                outcome = Outcome.failed(f"{type(exc).__name__}: {_first_line(exc)}"[:500])
            else:
                self._idle.append(slot)
            self._attempts.pop(key, None)
            self._fill()
            return key, outcome

    def close(self) -> None:
        """Kill the actors and shut down a Ray this executor started; safe to call twice."""
        atexit.unregister(self.close)
        _restore_sigterm(getattr(self, "_previous_sigterm", None))
        self._previous_sigterm = None
        try:
            import ray
        except ImportError:
            return
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
            _restore_sigterm(getattr(self, "_sigterm_before_ray", None), replacing=None)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the finally blocks close the executor


def _sigterm_as_interrupt() -> Any:
    """While the executor is open, SIGTERM (``kill``, a batch scheduler's stop) unwinds like
    Ctrl-C, so ``close`` runs; returns the previous handler to restore (``None``: left alone,
    not the main thread). Installed after ``ray.init``: Ray's driver installs a C-level
    SIGTERM handler that aborts the process without running any Python cleanup."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return signal.SIG_DFL if previous in (None, _on_sigterm) else previous


def _current_sigterm() -> Any:
    """The SIGTERM handler now (``None`` off the main thread, where it cannot be changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(previous: Any, replacing: Any = "ours") -> None:
    """Put ``previous`` back; by default only if our handler is the one installed
    (``replacing=None``: whatever is installed, e.g. Ray's after ``ray.shutdown``)."""
    if previous is None or threading.current_thread() is not threading.main_thread():
        return
    if replacing is None or signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, previous)


def _session_dir() -> str | None:
    """The local Ray session folder (its processes name it on their command lines), if known."""
    try:
        import ray

        return str(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001 -- no public API for it
    except Exception:  # noqa: BLE001
        return None


def ray_executor(
    session: Any,
    cfg: DictConfig,
    run_dir: Path,
    workers: int = 2,
    address: str | None = None,
    cpus_per_worker: int = 1,
    gpus_per_worker: Any = "auto",
    mode: str = "generational",
) -> RayExecutor:
    """``executor=ray``. The driver's session is not used for candidates (the actors have their own)."""
    if hasattr(session.fitness, "attach"):
        raise ConfigError("executor=ray does not support this fitness estimator yet (its promotions read the live archive); use executor=local")
    check_mode(mode)  # before Ray starts
    return RayExecutor(cfg, run_dir, workers=workers, address=address, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, mode=mode)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
