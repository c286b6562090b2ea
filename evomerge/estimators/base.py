"""What every fitness estimator returns and what it is built from.

An estimator is called once per candidate (the candidate's weights are already in the
live model) and returns ``Scores``: a plain ``name -> score`` dict, so every caller that
only wants the numbers keeps working, carrying each score's standard error and the
number of items it came from (its fidelity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence


class Scores(dict):
    """``name -> score`` with ``stderr`` (name -> standard error) and ``fidelity``
    (name -> items scored)."""

    def __init__(self, scores: dict[str, float], stderr: dict[str, float] | None = None, fidelity: dict[str, int] | None = None):
        super().__init__(scores)
        self.stderr: dict[str, float] = dict(stderr or {})
        self.fidelity: dict[str, int] = dict(fidelity or {})


class Estimator(Protocol):
    objective_names: list[str]

    def __call__(self) -> Scores: ...


@dataclass
class FitnessContext:
    """Everything an estimator may need, handed to its config's ``_target_`` factory.

    ``merger`` is there for estimators that score probe merges of their own (IRT
    calibration); ``run_dir`` for state that must survive a resume (subsets, anchors).
    """

    model: Any
    tokenizer: Any
    tasks: Sequence[Any]  # FitnessTask, objectives first then extras
    objectives: list[str]
    split: str = "validation"
    subset_size: int | None = None
    subset_seed: int = 0
    batch_size: int = 32
    max_length: int | None = None
    include_paths: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    merger: Any = None
    seed: int = 0

    def full_split_fitness(self) -> Any:
        """An ``LmEvalFitness`` over every doc of the split (estimators pick their items from it)."""
        from evomerge.estimators.lm_eval_fitness import LmEvalFitness

        return LmEvalFitness(
            self.model,
            self.tokenizer,
            self.tasks,
            split=self.split,
            subset_size=None,
            batch_size=self.batch_size,
            max_length=self.max_length,
            include_paths=self.include_paths,
        )
