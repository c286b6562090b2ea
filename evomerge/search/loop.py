"""The ask-and-tell search loop with archive, checkpoint and resume.

The loop state (strategy, generation counter, history, RNG states) holds no model
objects and is pickled after every generation. The evaluator -- merger plus fitness --
is attached at run time. Resuming reloads the last checkpoint; the strategy then asks
for the same generation again (its RNG was saved with it) and every candidate already
in the archive is served from there, so nothing is evaluated twice and the run ends
exactly as an uninterrupted one would.

The checkpoint also records how many archive records existed and their digest. If the
archive no longer holds them (damaged or lost lines) or the checkpoint itself cannot be
read, the loop discards it and replays the search from the start, serving every intact
candidate from the archive: only what was lost is evaluated again.

With an executor in ``async`` mode (steady state, ``_run_async``) the loop asks one
candidate whenever a worker frees up and archives results in completion order; the
checkpoint (written before each dispatch) also lists every candidate asked and not yet
archived, which a resume dispatches again before asking anything new.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from evomerge.executors.base import Executor, Outcome
from evomerge.executors.local import as_executor
from evomerge.search.algorithms import Strategy, require_async
from evomerge.progress import say
from evomerge.errors import ConfigError
from evomerge.search.archive import Archive, ArchiveWriteError, Record, genome_key
from evomerge.search.genome import GenomeSpace
from evomerge.search.pareto import hypervolume, nondominated

log = logging.getLogger(__name__)
ASYNC_AHEAD = 1  # async mode: candidates dispatched beyond the free workers (queued in the executor)
# an algorithm that proposes only archived candidates this many generations in a row has
# exhausted what it can reach (e.g. a converged population): the search stops and says so
MAX_IDLE_GENERATIONS = 25


class Evaluator(Protocol):
    """Merges a recipe into the live model and scores it: (scores, merge_s, eval_s)."""

    def __call__(self, recipe: Any) -> tuple[dict[str, float], float, float]: ...


CHECKPOINT_MAGIC = b"EVOMERGE-CHECKPOINT-1\n"  # then the SHA-256 of the pickle, then the pickle


class ChecksumError(ValueError):
    """A checkpoint whose pickle does not match its checksum."""


@dataclass
class LoopState:
    strategy: Strategy
    generation: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    np_random_state: Any = None
    py_random_state: Any = None
    finished: bool = False
    # integrity: the archive as of this checkpoint, and the budget the strategy was set up with
    archive_count: int | None = None
    archive_digest: str | None = None
    n_asked: int = 0
    max_evals: int | None = None
    # async mode: (genome, generation) of every candidate asked but not yet archived when the
    # checkpoint was written; re-dispatched first on resume (nothing lost, nothing repeated)
    in_flight: list[tuple[list[float], int]] = field(default_factory=list)
    # the budget counts evaluations: ids of the search records this loop evaluated (a
    # candidate served from the archive -- a repeat, or a hand-made merge that is a
    # reference -- costs nothing); ``served`` counts those repeats for the report
    counted: list[int] = field(default_factory=list)
    served: int = 0
    # generations in a row that asked only archived candidates (see MAX_IDLE_GENERATIONS)
    idle_generations: int = 0


@dataclass
class _Pending:
    """A candidate to evaluate and how to archive it."""

    key: str
    x: np.ndarray | None
    recipe: Any
    kind: str = "search"
    label: str | None = None
    generation: int | None = None
    counts: bool = True  # spends budget (a retried failure does not: its first try did)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. propose_s: the strategy's time to propose the batch


def losses_from_scores(scores: dict[str, float], objectives: Sequence[str]) -> list[float]:
    return [1.0 - float(scores[o]) for o in objectives]


class SearchLoop:
    def __init__(
        self,
        space: GenomeSpace,
        strategy: Strategy,
        objectives: Sequence[str],
        run_dir: str | Path,
        max_evals: int,
        seed: int,
        ref_point: Sequence[float] | None = None,
        worst_loss: float = 1.0,
        progress: bool = True,
        initial: np.ndarray | None = None,
        checkpoint_name: str = "checkpoint.pkl",
        retry_failed: bool = False,
        aliases: dict[str, str] | None = None,
    ):
        """``aliases``: genome key -> archive key of a record that stands for it (the warm
        start's base and experts are the reference records, never evaluated twice)."""
        self.space = space
        self.objectives = list(objectives)
        self.run_dir = Path(run_dir)
        self.max_evals = int(max_evals)
        self.seed = int(seed)
        self.ref_point = np.asarray(ref_point if ref_point is not None else [1.0] * len(self.objectives), dtype=float)
        self.worst_loss = float(worst_loss)
        self.progress = progress
        self.retry_failed = retry_failed
        self.archive = Archive(self.run_dir / "archive.jsonl")
        self.aliases = dict(aliases or {})
        self.exhausted: str | None = None  # why the search stopped before its budget, if it did
        self.checkpoint_path = self.run_dir / checkpoint_name
        damage = self.archive.describe_damage()
        if damage:  # say what is damaged; the lost candidates are evaluated again below
            aside = self.archive.quarantine_damaged()
            _warn(f"{damage}; {'moved to ' + str(aside) + ', ' if aside else ''}lost candidates will be evaluated again")
        state = self._load_checkpoint() if self.checkpoint_path.exists() else None
        if state is not None:
            self.state = state
            self._extend_budget()
            log.info("resuming at generation %d (%d archived candidates)", self.state.generation, len(self.archive.records))
        else:
            strategy.setup(space.n_var, len(self.objectives), self.max_evals, self.seed, initial=initial)
            np.random.seed(self.seed)
            random.seed(self.seed)
            self.state = LoopState(strategy, max_evals=self.max_evals)
        self.reused = 0
        self.evaluated = 0
        self._by_recipe: dict[str, Record] | None = None
        self._errors_seen: set[str] = set()

    # ---- persistence
    def _save_checkpoint(self) -> None:
        import dill

        self.state.np_random_state = np.random.get_state()
        self.state.py_random_state = random.getstate()
        self.state.archive_count = len(self.archive.records)
        self.state.archive_digest = self.archive.digest()
        tmp = self.checkpoint_path.with_suffix(".tmp")
        payload = dill.dumps(self.state)
        try:
            with tmp.open("wb") as f:
                # a checksum of the pickle: a changed number that still unpickles (a bit flip)
                # is caught on resume instead of proposing other candidates than the run would
                f.write(CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
        except OSError as exc:  # e.g. a full disk: the previous checkpoint is still intact
            tmp.unlink(missing_ok=True)
            raise ArchiveWriteError(f"cannot write {self.checkpoint_path}: {exc.strerror or exc}; free space and resume with resume={self.run_dir}") from None

    def _load_checkpoint(self) -> LoopState | None:
        """The checkpoint, or None (after a warning) when it is damaged or does not match the
        archive: the caller then replays the search from the archive."""
        import dill

        try:
            data = self.checkpoint_path.read_bytes()
            if data.startswith(CHECKPOINT_MAGIC):  # checkpoints written before the checksum have no magic
                digest, payload = data[len(CHECKPOINT_MAGIC) : len(CHECKPOINT_MAGIC) + 32], data[len(CHECKPOINT_MAGIC) + 32 :]
                if hashlib.sha256(payload).digest() != digest:
                    raise ChecksumError("its contents changed since it was written: checksum mismatch")
                data = payload
            state: LoopState = dill.loads(data)
            if not isinstance(state, LoopState):
                raise TypeError(f"holds a {type(state).__name__}")
        except Exception as exc:  # noqa: BLE001 -- any unpickling failure means a damaged file
            aside = self.checkpoint_path.with_name(self.checkpoint_path.name + ".damaged")
            os.replace(self.checkpoint_path, aside)
            why = str(exc) if isinstance(exc, ChecksumError) else type(exc).__name__
            _warn(f"{self.checkpoint_path} is damaged ({why}); moved to {aside.name}; replaying the search from the archive (exact, only lost candidates are evaluated)")
            return None
        lost = getattr(state.strategy, "lost_state", lambda: None)()
        if lost:
            aside = self.checkpoint_path.with_name(self.checkpoint_path.name + ".stale")
            os.replace(self.checkpoint_path, aside)
            _warn(f"{self.checkpoint_path} cannot continue the search ({lost}); moved to {aside.name}; replaying the search from the archive (only what is missing is evaluated)")
            return None
        count, digest = getattr(state, "archive_count", None), getattr(state, "archive_digest", None)
        if count is not None and (len(self.archive.records) < count or self.archive.digest(count) != digest):
            _warn(
                f"the archive does not hold the {count} records the checkpoint was written after "
                f"(it has {len(self.archive.records)}{', some differ' if len(self.archive.records) >= count else ''}); "
                "replaying the search from the archive, evaluating what is missing"
            )
            return None
        if not hasattr(state, "in_flight"):  # checkpoint of a version without async mode
            state.in_flight = []
        if not hasattr(state, "counted"):  # checkpoint of a version whose budget counted asked candidates
            state.counted = [r.id for r in self.archive.search_records()][: state.n_asked or None]
            state.served, state.idle_generations = 0, 0
        if not hasattr(state, "n_asked"):  # checkpoint of an older version
            state.n_asked = int(getattr(getattr(getattr(state.strategy, "algorithm", None), "evaluator", None), "n_eval", 0) or 0)
        if state.np_random_state is not None:
            np.random.set_state(state.np_random_state)
        if state.py_random_state is not None:
            random.setstate(state.py_random_state)
        return state

    def _extend_budget(self) -> None:
        """A resume with a larger ``search.max_evals`` continues the same search further."""
        old = getattr(self.state, "max_evals", None)
        if old is None or old == self.max_evals:
            self.state.max_evals = self.max_evals
            return
        if self.max_evals < old:
            raise ConfigError(f"search.max_evals can only grow on resume (the run has {old}), got {self.max_evals}")
        strategy = self.state.strategy
        term = getattr(getattr(strategy, "algorithm", None), "termination", None)
        if hasattr(strategy, "extend_budget"):
            strategy.extend_budget(self.max_evals)
        elif hasattr(strategy, "left"):
            strategy.left += self.max_evals - old
        elif term is not None and hasattr(term, "n_max_evals"):
            # the loop counts the budget; a checkpoint of an older version may still hold a
            # pymoo termination at the old budget
            from evomerge.search.algorithms import UNLIMITED_EVALS

            term.n_max_evals = UNLIMITED_EVALS
            term.update(strategy.algorithm)
        else:
            raise ConfigError(f"algorithm {strategy.name} cannot extend its budget on resume (its points depend on search.max_evals); start a new run")
        self.state.max_evals = self.max_evals
        self.state.finished = False

    # ---- evaluation
    def evaluate_reference(self, label: str, recipe: Any, evaluate: Evaluator | Executor) -> Record:
        """Score a fixed recipe (base, experts) once; served from the archive on resume."""
        return self.evaluate_references({label: recipe}, evaluate)[label]

    def evaluate_references(self, recipes: dict[str, Any], evaluate: Evaluator | Executor) -> dict[str, Record]:
        """Score fixed recipes (base, experts), all dispatched at once; archived ones are served."""
        out: dict[str, Record] = {}
        jobs = []
        for label, recipe in recipes.items():
            cached = self.archive.by_key.get(f"ref:{label}")
            if cached is not None and cached.error is None:  # a failed reference is tried again
                out[label] = cached
            else:
                jobs.append(_Pending(f"ref:{label}", None, recipe, kind="reference", label=label))
        for job, record in zip(jobs, self._dispatch(jobs, evaluate)):
            out[job.label] = record
        return {label: out[label] for label in recipes}

    def _dispatch(self, jobs: Sequence["_Pending"], evaluate: Evaluator | Executor) -> list[Record]:
        """Evaluate ``jobs`` through the executor (all at once) and archive the outcomes in
        the order of ``jobs``, each as soon as all before it are in: the archive is the same
        for every executor and worker count, and a killed driver loses only the tail."""
        executor = as_executor(evaluate)
        records: list[Record] = []
        done: dict[int, Outcome] = {}
        for key, outcome in executor.map([(str(i), job.recipe) for i, job in enumerate(jobs)]):
            done[int(key)] = outcome
            while len(records) in done:
                i = len(records)
                records.append(self._archive_outcome(jobs[i], done.pop(i)))
        return records

    def _archive_outcome(self, job: "_Pending", outcome: Outcome) -> Record:
        error, scores = outcome.error, outcome.scores
        losses = [self.worst_loss] * len(self.objectives)
        if error is None:
            try:
                losses = losses_from_scores(scores, self.objectives)
            except Exception as exc:  # e.g. an objective the estimator did not return
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        record = Record(
            id=self.archive.next_id(),
            kind=job.kind,
            key=job.key,
            genome=None if job.x is None else [float(v) for v in job.x],
            recipe=job.recipe.to_dict(),
            scores=dict(scores),
            losses=losses,
            error=error,
            label=job.label,
            generation=(self.state.generation if job.generation is None else job.generation) if job.kind == "search" else None,
            merge_s=round(outcome.merge_s, 6),
            eval_s=round(outcome.eval_s, 6),
            stderr=dict(outcome.stderr),
            fidelity=dict(outcome.fidelity),
            extra=dict(job.extra),
        )
        self.archive.append(record)
        self.evaluated += 1
        if job.kind == "search" and job.counts:
            self.state.counted.append(record.id)
        if record.kind == "search" and record.error is None:
            self._same_recipe()[_recipe_key(record.recipe)] = record
        if error is not None and error not in self._errors_seen:  # print each distinct failure once
            self._errors_seen.add(error)
            say(f"{job.label or 'candidate'} #{record.id} failed: {error}")
        return record

    def retry_failed_records(self, evaluate: Evaluator | Executor) -> int:
        """Evaluate failed search candidates again (``search.retry_failed``); a success
        replaces the failure in the front; the search's own course is unchanged."""
        failed = [r for r in self.archive.search_records() if r.error is not None and r.genome is not None]
        self._dispatch([_Pending(r.key, np.asarray(r.genome), self.space.decode(r.genome), generation=r.generation, counts=False) for r in failed], evaluate)
        return len(failed)

    def evaluate_genome(self, x: np.ndarray, evaluate: Evaluator | Executor) -> Record:
        return self.evaluate_genomes([x], evaluate)[0]

    def _served(self, key: str, rkey: str) -> Record | None:
        """The archived record that stands for a genome: the same genome, another genome of
        the same recipe (e.g. of an earlier stage), or a reference it is an alias of."""
        cached = self.archive.by_key.get(key) or self._same_recipe().get(rkey)
        if cached is None and key in self.aliases:
            ref = self.archive.by_key.get(self.aliases[key])
            cached = ref if ref is not None and ref.error is None else None
        return cached

    def _count_served(self, key: str, record: Record) -> None:
        """A served candidate costs no budget -- unless it is this very genome's own record
        that this loop has not counted yet: evaluated after the last checkpoint (or in a
        replay from the archive) and now asked again, it was a real evaluation."""
        if record.kind == "search" and record.key == key and record.id not in self._counted_ids():
            self.state.counted.append(record.id)
        else:
            self.reused += 1
            self.state.served += 1

    def _counted_ids(self) -> set[int]:
        return set(self.state.counted)

    @property
    def n_counted(self) -> int:
        """Evaluations spent of this loop's budget."""
        return len(self.state.counted)

    def evaluate_genomes(
        self,
        X: Sequence[np.ndarray],
        evaluate: Evaluator | Executor,
        generation: int | None = None,
        limit: int | None = None,
        propose_s: float | None = None,
    ) -> list[Record]:
        """Records for a generation. The same genome, or another genome (e.g. of an earlier
        search stage) that decodes to the same recipe, is served from the archive and never
        dispatched; so is a repeat within the generation. The rest go out at once; with
        ``limit``, only the first ``limit`` of them (the candidates past it get no record)."""
        out: list[Record | None] = [None] * len(X)
        jobs: list[_Pending] = []
        slot_of_job: list[int] = []
        first_by_key: dict[str, int] = {}
        first_by_recipe: dict[str, int] = {}
        repeats: dict[int, tuple[int, bool]] = {}  # index -> (job it repeats, same genome?)
        counted_before = self.n_counted
        for i, x in enumerate(X):
            key = genome_key(x)
            recipe = self.space.decode(x)
            rkey = _recipe_key(recipe.to_dict())
            cached = self._served(key, rkey)
            if cached is not None:
                self._count_served(key, cached)
                out[i] = cached
            elif key in first_by_key or rkey in first_by_recipe:
                same = key in first_by_key
                repeats[i] = (first_by_key[key] if same else first_by_recipe[rkey], same)
            elif limit is None or len(jobs) + (self.n_counted - counted_before) < limit:  # served-and-counted (a replay) spend it too
                first_by_key[key] = first_by_recipe[rkey] = len(jobs)
                extra = {} if propose_s is None else {"propose_s": round(propose_s, 4)}
                jobs.append(_Pending(key, x, recipe, generation=generation, extra=extra))
                slot_of_job.append(i)
        for i, record in zip(slot_of_job, self._dispatch(jobs, evaluate)):
            out[i] = record
        again = []
        for i, (j, same) in repeats.items():
            first = out[slot_of_job[j]]
            assert first is not None
            if same or first.error is None:  # as if evaluated one by one: a failed recipe is tried again
                self.reused += 1
                self.state.served += 1
                out[i] = first
            else:
                again.append(i)
        if again:
            room = None if limit is None else max(limit - len(jobs) - (self.n_counted - counted_before), 0)
            for i, record in zip(again, self.evaluate_genomes([X[i] for i in again], evaluate, generation, room)):
                out[i] = record
        return [r for r in out if r is not None]

    def _same_recipe(self) -> dict[str, Record]:
        if self._by_recipe is None:
            self._by_recipe = {_recipe_key(r.recipe): r for r in self.archive.search_records() if r.error is None}
        return self._by_recipe

    # ---- main loop
    def run(self, evaluate: Evaluator | Executor, on_generation: Callable[["SearchLoop"], None] | None = None) -> LoopState:
        """``evaluate``: an executor, or a plain evaluate callable (run in process). Each
        generation is asked whole, dispatched at once and told back when complete; with an
        executor in ``async`` mode see ``_run_async``."""
        from evomerge.search import proposals

        try:
            return self._run(as_executor(evaluate), on_generation)
        finally:
            proposals.shutdown()  # a model round computed ahead for a batch that will not come

    def _run(self, executor: Any, on_generation: Callable[["SearchLoop"], None] | None) -> LoopState:
        started = time.time()
        evals_at_start = self.evaluated
        strategy = self.state.strategy
        if self.retry_failed and self.retry_failed_records(executor):
            self._save_checkpoint()
        if getattr(executor, "mode", "generational") == "async":
            require_async(strategy)
            return self._run_async(executor, on_generation, started, evals_at_start)
        if self.state.in_flight:  # an async run resumed generationally: finish its asked candidates first
            for gen in sorted({g for _, g in self.state.in_flight}):
                self.evaluate_genomes([np.asarray(x) for x, g in self.state.in_flight if g == gen], executor, gen)
            self.state.in_flight = []
            self._save_checkpoint()
        while not self.state.finished and strategy.has_next() and self.n_counted < self.max_evals:
            asked_at = time.perf_counter()
            X = strategy.ask()
            propose_s = time.perf_counter() - asked_at
            left = self.max_evals - self.n_counted
            before = self.n_counted
            records = self.evaluate_genomes(X, executor, limit=left, propose_s=propose_s)
            if len(records) < len(X):
                # the generation holds more new candidates than the budget has left: evaluate
                # what fits and tell nothing, so a resume with a larger budget asks this same
                # generation again (the evaluated ones are then served from the archive)
                say(f"note: stopping at search.max_evals={self.max_evals}: the last generation is cut to {self.n_counted - before} new of its {len(X)} candidates")
                self.state.generation += 1
                self.state.history.append(self._generation_summary(propose_s))
                if on_generation is not None:  # e.g. the live report: it shows the last evaluations too
                    on_generation(self)
                if self.progress:
                    self._print_progress(started, evals_at_start)
                self.state.finished = True  # in memory only: the checkpoint keeps the generation before
                return self.state
            F = np.array([r.losses for r in records], dtype=float)
            strategy.tell(X, F, self._stderr_matrix(records))
            self.state.n_asked += len(X)
            self.state.idle_generations = 0 if self.n_counted > before else self.state.idle_generations + 1
            if self.state.idle_generations >= MAX_IDLE_GENERATIONS:
                self.exhausted = f"{strategy.name} proposed only archived candidates for {MAX_IDLE_GENERATIONS} generations in a row"
                self._end_generation(on_generation, started, evals_at_start, propose_s)
                break
            self._end_generation(on_generation, started, evals_at_start, propose_s)
        return self._finish()

    def _finish(self) -> LoopState:
        """Mark the search finished; say so when it ended before spending its budget."""
        if self.n_counted < self.max_evals and self.exhausted is None:
            self.exhausted = f"{self.state.strategy.name} has no more candidates to propose"
        if self.exhausted:
            say(f"note: the search ended after {self.n_counted} of search.max_evals={self.max_evals} evaluations: {self.exhausted}")
        self.state.in_flight = []
        self.state.finished = True
        self._save_checkpoint()
        return self.state

    def _stderr_matrix(self, records: Sequence[Record]) -> np.ndarray:
        """Standard errors of each record's objectives (NaN where the fitness gave none)."""
        return np.array([[float(r.stderr.get(o, np.nan)) for o in self.objectives] for r in records], dtype=float).reshape(len(records), len(self.objectives))

    def _end_generation(self, on_generation: Callable[["SearchLoop"], None] | None, started: float, evals_at_start: int, propose_s: float | None = None) -> None:
        self.state.generation += 1
        self.state.history.append(self._generation_summary(propose_s))
        self._save_checkpoint()
        if on_generation is not None:
            on_generation(self)
        if self.progress:
            self._print_progress(started, evals_at_start)

    def _run_async(self, executor: Any, on_generation: Callable[["SearchLoop"], None] | None, started: float, evals_at_start: int) -> LoopState:
        """Steady state: one candidate is asked whenever a worker is free, each result archived
        (completion order) and told as it arrives. Served candidates (archived genome or recipe)
        are never dispatched; a repeat of a running recipe waits for it. Everything asked and
        not yet archived is in the checkpoint, written before anything is dispatched, so a
        resume re-dispatches exactly that. Every ``pop_size`` resolved candidates count as a
        generation (history, progress, report); records keep the generation they would have
        had in generational mode."""
        strategy = self.state.strategy
        block = max(1, int(getattr(strategy, "pop_size", 16)))
        running: dict[str, _Pending] = {}  # dispatched (or about to be), by genome key
        running_recipes: dict[str, str] = {}  # recipe key -> genome key of the running job
        parked: list[_Pending] = []  # repeats of a running recipe
        to_submit: list[_Pending] = []
        served_in_a_row = [0]  # asks in a row that were all served (a strategy that cannot find new candidates)

        def admit(job: _Pending) -> None:
            rkey = _recipe_key(job.recipe.to_dict())
            cached = self._served(job.key, rkey)
            if cached is not None:
                self._count_served(job.key, cached)
                served_in_a_row[0] += 1
                strategy.tell_one(job.x, np.asarray(cached.losses, dtype=float), self._stderr_matrix([cached])[0])
            elif job.key in running or rkey in running_recipes:
                parked.append(job)
            else:
                served_in_a_row[0] = 0
                running[job.key] = job
                running_recipes[rkey] = job.key
                to_submit.append(job)

        def pending(x: Any, generation: int) -> _Pending:
            x = np.asarray(x, dtype=float)
            return _Pending(genome_key(x), x, self.space.decode(x), generation=generation)

        def settle() -> None:
            """Checkpoint (with what is asked and not archived), then dispatch; count generations."""
            self.state.in_flight = [([float(v) for v in j.x], int(j.generation)) for j in [*running.values(), *parked]]  # type: ignore[union-attr, arg-type]
            self._save_checkpoint()
            for job in to_submit:
                executor.submit(job.key, job.recipe)
            to_submit.clear()
            done = self.state.n_asked - len(running) - len(parked)
            while done >= (self.state.generation + 1) * block or (done == self.state.n_asked and not self._can_ask() and done > self.state.generation * block):
                self._end_generation(on_generation, started, evals_at_start)

        for x, generation in list(self.state.in_flight):  # asked before the checkpoint: not asked again
            admit(pending(x, generation))
        while True:
            # one candidate queued beyond the busy workers: a worker that frees up starts it at
            # once instead of waiting while the driver archives, checkpoints and asks
            while executor.idle() - len(to_submit) > -ASYNC_AHEAD and self._can_ask(len(running)):
                if served_in_a_row[0] >= MAX_IDLE_GENERATIONS * block:
                    self.exhausted = f"{strategy.name} proposed only archived candidates {served_in_a_row[0]} times in a row"
                    break
                generation = self.state.n_asked // block
                self.state.n_asked += 1
                admit(pending(strategy.ask_one(), generation))
            settle()
            if not running:
                break
            key, outcome = executor.next_completed()
            job = running.pop(key)
            rkey = _recipe_key(job.recipe.to_dict())
            running_recipes.pop(rkey, None)
            record = self._archive_outcome(job, outcome)
            strategy.tell_one(job.x, np.asarray(record.losses, dtype=float), self._stderr_matrix([record])[0])
            twins = [p for p in parked if p.key == key or _recipe_key(p.recipe.to_dict()) == rkey]
            parked[:] = [p for p in parked if all(p is not t for t in twins)]
            for twin in twins:  # served now, or dispatched if its recipe failed under another genome
                admit(twin)
        return self._finish()

    def _can_ask(self, running: int = 0) -> bool:
        """Budget left for one more evaluation beyond the ``running`` ones (served asks are free)."""
        return not self.state.finished and self.exhausted is None and self.n_counted + running < self.max_evals and self.state.strategy.has_next()

    def front_records(self) -> list[Record]:
        recs = [r for r in self.archive.search_records() if r.error is None]
        if not recs:
            return []
        idx = nondominated(np.array([r.losses for r in recs]))
        return [recs[i] for i in idx]

    def _generation_summary(self, propose_s: float | None = None) -> dict[str, Any]:
        recs = self.archive.search_records()
        ok = [r for r in recs if r.error is None]
        F = np.array([r.losses for r in ok]) if ok else np.zeros((0, len(self.objectives)))
        return {
            "generation": self.state.generation,
            "budget_used": self.n_counted,
            "served": self.state.served,
            "propose_s": None if propose_s is None else round(propose_s, 4),
            "n_records": len(self.archive.records),
            "archive_digest": self.archive.digest(),
            "n_evals": len(recs),
            "n_failed": len(recs) - len(ok),
            "hypervolume": hypervolume(F, self.ref_point),
            "best": {o: (float(1 - F[:, i].min()) if len(F) else None) for i, o in enumerate(self.objectives)},
        }

    def _print_progress(self, started: float, evals_at_start: int) -> None:
        h = self.state.history[-1]
        done = self.n_counted
        new = self.evaluated - evals_at_start
        elapsed = time.time() - started
        rate = new / elapsed if elapsed > 0 and new else 0.0
        eta = (self.max_evals - done) / rate if rate > 0 else float("nan")
        best = " ".join(f"{k}={v:.3f}" for k, v in h["best"].items() if v is not None)
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        line = f"gen {h['generation']:3d} | evals {done:4d}/{self.max_evals} | best {best} | HV {h['hypervolume']:.4f} | ETA {eta_s}"
        if h["n_failed"]:
            line += f" | failed {h['n_failed']}"
        if self.state.served:
            line += f" | {self.state.served} repeats served from the archive"
        say(line)


def _recipe_key(recipe: dict[str, Any]) -> str:
    import json

    if recipe.get("kind") == "dfs":  # a layer path (evomerge/dfs): its slots and models
        return json.dumps({k: recipe.get(k) for k in ("path", "models", "merged")}, sort_keys=True)
    return json.dumps(recipe.get("groups"), sort_keys=True)


def _warn(message: str) -> None:
    say(f"warning: {message}")
