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
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from evomerge.search.algorithms import Strategy
from evomerge.errors import ConfigError
from evomerge.search.archive import Archive, ArchiveWriteError, Record, genome_key
from evomerge.search.genome import GenomeSpace
from evomerge.search.pareto import hypervolume, nondominated

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Merges a recipe into the live model and scores it: (scores, merge_s, eval_s)."""

    def __call__(self, recipe: Any) -> tuple[dict[str, float], float, float]: ...


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
    ):
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
        try:
            with tmp.open("wb") as f:
                dill.dump(self.state, f)
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
            with self.checkpoint_path.open("rb") as f:
                state: LoopState = dill.load(f)
            if not isinstance(state, LoopState):
                raise TypeError(f"holds a {type(state).__name__}")
        except Exception as exc:  # noqa: BLE001 -- any unpickling failure means a damaged file
            aside = self.checkpoint_path.with_name("checkpoint.pkl.damaged")
            os.replace(self.checkpoint_path, aside)
            _warn(f"{self.checkpoint_path} is damaged ({type(exc).__name__}); moved to {aside.name}; replaying the search from the archive (exact, only lost candidates are evaluated)")
            return None
        count, digest = getattr(state, "archive_count", None), getattr(state, "archive_digest", None)
        if count is not None and (len(self.archive.records) < count or self.archive.digest(count) != digest):
            _warn(
                f"the archive does not hold the {count} records the checkpoint was written after "
                f"(it has {len(self.archive.records)}{', some differ' if len(self.archive.records) >= count else ''}); "
                "replaying the search from the archive, evaluating what is missing"
            )
            return None
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
            term.n_max_evals = self.max_evals
            term.update(strategy.algorithm)
        else:
            raise ConfigError(f"algorithm {strategy.name} cannot extend its budget on resume (its points depend on search.max_evals); start a new run")
        self.state.max_evals = self.max_evals
        self.state.finished = False

    # ---- evaluation
    def evaluate_reference(self, label: str, recipe: Any, evaluate: Evaluator) -> Record:
        """Score a fixed recipe (base, experts) once; served from the archive on resume."""
        key = f"ref:{label}"
        cached = self.archive.by_key.get(key)
        if cached is not None and cached.error is None:  # a failed reference is tried again
            return cached
        return self._evaluate(key, None, recipe, evaluate, kind="reference", label=label)

    def _evaluate(
        self, key: str, x: np.ndarray | None, recipe: Any, evaluate: Evaluator, kind: str, label: str | None = None, generation: int | None = None
    ) -> Record:
        error = None
        scores: dict[str, float] = {}
        merge_s = eval_s = 0.0
        try:
            scores, merge_s, eval_s = evaluate(recipe)
            bad = [k for k, v in scores.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"objective {bad[0]} is not finite")
            losses = losses_from_scores(scores, self.objectives)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed candidate is recorded and scored worst; the search goes on
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log.debug("candidate failed: %s", traceback.format_exc())
            losses = [self.worst_loss] * len(self.objectives)
            scores = {k: v for k, v in scores.items() if math.isfinite(v)}  # keep the archive valid JSON
            _free_accelerator_memory()
        # estimators return Scores (a dict) carrying standard errors and fidelities
        stderr = {k: float(v) for k, v in (getattr(scores, "stderr", None) or {}).items() if k in scores and math.isfinite(v)}
        fidelity = {k: int(v) for k, v in (getattr(scores, "fidelity", None) or {}).items() if k in scores}
        record = Record(
            id=self.archive.next_id(),
            kind=kind,
            key=key,
            genome=None if x is None else [float(v) for v in x],
            recipe=recipe.to_dict(),
            scores=dict(scores),
            losses=losses,
            error=error,
            label=label,
            generation=(self.state.generation if generation is None else generation) if kind == "search" else None,
            merge_s=round(merge_s, 6),
            eval_s=round(eval_s, 6),
            stderr=stderr,
            fidelity=fidelity,
        )
        self.archive.append(record)
        self.evaluated += 1
        if error is not None and error not in self._errors_seen:  # print each distinct failure once
            self._errors_seen.add(error)
            print(f"{label or 'candidate'} #{record.id} failed: {error}", file=sys.stderr, flush=True)
        return record

    def retry_failed_records(self, evaluate: Evaluator) -> int:
        """Evaluate failed search candidates again (``search.retry_failed``); a success
        replaces the failure in the front; the search's own course is unchanged."""
        failed = [r for r in self.archive.search_records() if r.error is not None and r.genome is not None]
        for r in failed:
            self._evaluate(r.key, np.asarray(r.genome), self.space.decode(r.genome), evaluate, kind="search", generation=r.generation)
        return len(failed)

    def evaluate_genome(self, x: np.ndarray, evaluate: Evaluator) -> Record:
        key = genome_key(x)
        recipe = self.space.decode(x)
        # the same genome, or another genome (e.g. of an earlier search stage) that
        # decodes to the same recipe: served from the archive, never evaluated twice
        cached = self.archive.by_key.get(key) or self._same_recipe().get(_recipe_key(recipe.to_dict()))
        if cached is not None:
            self.reused += 1
            return cached
        record = self._evaluate(key, x, recipe, evaluate, kind="search")
        if record.error is None:
            self._same_recipe()[_recipe_key(record.recipe)] = record
        return record

    def _same_recipe(self) -> dict[str, Record]:
        if self._by_recipe is None:
            self._by_recipe = {_recipe_key(r.recipe): r for r in self.archive.search_records() if r.error is None}
        return self._by_recipe

    # ---- main loop
    def run(self, evaluate: Evaluator, on_generation: Callable[["SearchLoop"], None] | None = None) -> LoopState:
        started = time.time()
        evals_at_start = self.evaluated
        strategy = self.state.strategy
        if self.retry_failed and self.retry_failed_records(evaluate):
            self._save_checkpoint()
        while not self.state.finished and strategy.has_next():
            X = strategy.ask()
            left = self.max_evals - self.state.n_asked
            if len(X) > left:
                # the generation overshoots the budget: evaluate what fits and tell nothing, so
                # a resume with a larger budget asks this same generation again
                print(f"note: stopping at search.max_evals={self.max_evals}: the last generation is cut to {max(left, 0)} of {len(X)} candidates", file=sys.stderr)
                for x in X[: max(left, 0)]:
                    self.evaluate_genome(x, evaluate)
                self.state.generation += 1
                self.state.history.append(self._generation_summary())
                if self.progress:
                    self._print_progress(started, evals_at_start)
                return self.state
            records = [self.evaluate_genome(x, evaluate) for x in X]
            F = np.array([r.losses for r in records], dtype=float)
            strategy.tell(X, F)
            self.state.n_asked += len(X)
            self.state.generation += 1
            self.state.history.append(self._generation_summary())
            self._save_checkpoint()
            if on_generation is not None:
                on_generation(self)
            if self.progress:
                self._print_progress(started, evals_at_start)
        self.state.finished = True
        self._save_checkpoint()
        return self.state

    def front_records(self) -> list[Record]:
        recs = [r for r in self.archive.search_records() if r.error is None]
        if not recs:
            return []
        idx = nondominated(np.array([r.losses for r in recs]))
        return [recs[i] for i in idx]

    def _generation_summary(self) -> dict[str, Any]:
        recs = self.archive.search_records()
        ok = [r for r in recs if r.error is None]
        F = np.array([r.losses for r in ok]) if ok else np.zeros((0, len(self.objectives)))
        return {
            "generation": self.state.generation,
            "n_records": len(self.archive.records),
            "archive_digest": self.archive.digest(),
            "n_evals": len(recs),
            "n_failed": len(recs) - len(ok),
            "hypervolume": hypervolume(F, self.ref_point),
            "best": {o: (float(1 - F[:, i].min()) if len(F) else None) for i, o in enumerate(self.objectives)},
        }

    def _print_progress(self, started: float, evals_at_start: int) -> None:
        h = self.state.history[-1]
        done = h["n_evals"]
        new = self.evaluated - evals_at_start
        elapsed = time.time() - started
        rate = new / elapsed if elapsed > 0 and new else 0.0
        eta = (self.max_evals - done) / rate if rate > 0 else float("nan")
        best = " ".join(f"{k}={v:.3f}" for k, v in h["best"].items() if v is not None)
        eta_s = f"{eta:5.0f}s" if math.isfinite(eta) else "    ?"
        line = f"gen {h['generation']:3d} | evals {done:4d}/{self.max_evals} | best {best} | HV {h['hypervolume']:.4f} | ETA {eta_s}"
        if h["n_failed"]:
            line += f" | failed {h['n_failed']}"
        print(line, file=sys.stderr, flush=True)


def _recipe_key(recipe: dict[str, Any]) -> str:
    import json

    if recipe.get("kind") == "dfs":  # a layer path (evomerge/dfs): its slots and models
        return json.dumps({k: recipe.get(k) for k in ("path", "models", "merged")}, sort_keys=True)
    return json.dumps(recipe.get("groups"), sort_keys=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
