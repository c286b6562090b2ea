"""The ask-and-tell search loop with archive, checkpoint and resume.

The loop state (strategy, generation counter, history, RNG states) holds no model
objects and is pickled after every generation. The evaluator -- merger plus fitness --
is attached at run time. Resuming reloads the last checkpoint; the strategy then asks
for the same generation again (its RNG was saved with it) and every candidate already
in the archive is served from there, so nothing is evaluated twice and the run ends
exactly as an uninterrupted one would.
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
from evomerge.search.archive import Archive, Record, genome_key
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
    ):
        self.space = space
        self.objectives = list(objectives)
        self.run_dir = Path(run_dir)
        self.max_evals = int(max_evals)
        self.seed = int(seed)
        self.ref_point = np.asarray(ref_point if ref_point is not None else [1.0] * len(self.objectives), dtype=float)
        self.worst_loss = float(worst_loss)
        self.progress = progress
        self.archive = Archive(self.run_dir / "archive.jsonl")
        self.checkpoint_path = self.run_dir / "checkpoint.pkl"
        if self.checkpoint_path.exists():
            self.state = self._load_checkpoint()
            log.info("resuming at generation %d (%d archived candidates)", self.state.generation, len(self.archive.records))
        else:
            strategy.setup(space.n_var, len(self.objectives), self.max_evals, self.seed, initial=initial)
            np.random.seed(self.seed)
            random.seed(self.seed)
            self.state = LoopState(strategy)
        self.reused = 0
        self.evaluated = 0

    # ---- persistence
    def _save_checkpoint(self) -> None:
        import dill

        self.state.np_random_state = np.random.get_state()
        self.state.py_random_state = random.getstate()
        tmp = self.checkpoint_path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            dill.dump(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    def _load_checkpoint(self) -> LoopState:
        import dill

        with self.checkpoint_path.open("rb") as f:
            state: LoopState = dill.load(f)
        if state.np_random_state is not None:
            np.random.set_state(state.np_random_state)
        if state.py_random_state is not None:
            random.setstate(state.py_random_state)
        return state

    # ---- evaluation
    def evaluate_reference(self, label: str, recipe: Any, evaluate: Evaluator) -> Record:
        """Score a fixed recipe (base, experts) once; served from the archive on resume."""
        key = f"ref:{label}"
        if key in self.archive.by_key:
            return self.archive.by_key[key]
        return self._evaluate(key, None, recipe, evaluate, kind="reference", label=label)

    def _evaluate(self, key: str, x: np.ndarray | None, recipe: Any, evaluate: Evaluator, kind: str, label: str | None = None) -> Record:
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
            generation=self.state.generation if kind == "search" else None,
            merge_s=round(merge_s, 6),
            eval_s=round(eval_s, 6),
            stderr=stderr,
            fidelity=fidelity,
        )
        self.archive.append(record)
        self.evaluated += 1
        return record

    def evaluate_genome(self, x: np.ndarray, evaluate: Evaluator) -> Record:
        key = genome_key(x)
        cached = self.archive.by_key.get(key)
        if cached is not None:
            self.reused += 1
            return cached
        return self._evaluate(key, x, self.space.decode(x), evaluate, kind="search")

    # ---- main loop
    def run(self, evaluate: Evaluator, on_generation: Callable[["SearchLoop"], None] | None = None) -> LoopState:
        started = time.time()
        evals_at_start = self.evaluated
        strategy = self.state.strategy
        while strategy.has_next():
            X = strategy.ask()
            records = [self.evaluate_genome(x, evaluate) for x in X]
            F = np.array([r.losses for r in records], dtype=float)
            strategy.tell(X, F)
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


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
