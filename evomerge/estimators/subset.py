"""The default estimator: one fixed seeded subset per task, saved with the run."""

from __future__ import annotations

import json

from evomerge.estimators.base import FitnessContext
from evomerge.estimators.lm_eval_fitness import LmEvalFitness

SUBSET_FILE = "subset.json"


def subset_estimator(ctx: FitnessContext, gc_every: int = 0) -> LmEvalFitness:
    """Score every candidate on ``ctx.subset_size`` seeded docs per task; the ids are
    written to ``<run_dir>/subset.json`` and read back on resume."""
    from evomerge import rundir

    subset_file = ctx.run_dir / SUBSET_FILE if ctx.run_dir is not None else None
    saved = rundir.load_subset(ctx.run_dir) if ctx.run_dir is not None else None  # one-line error when damaged
    fitness = LmEvalFitness(
        ctx.model,
        ctx.tokenizer,
        ctx.tasks,
        split=ctx.split,
        subset_size=ctx.subset_size,
        subset_seed=ctx.subset_seed,
        subset=saved,
        batch_size=ctx.batch_size,
        max_length=ctx.max_length,
        include_paths=ctx.include_paths,
        gc_every=gc_every,
    )
    if subset_file is not None and saved is None:
        rundir.write_atomic(subset_file, json.dumps(fitness.subset))
    return fitness
