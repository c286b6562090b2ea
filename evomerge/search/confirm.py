"""The final front, chosen on validation items the search did not select on.

A search scores every candidate on the same seeded validation subset. The more candidates
it scores, the more of its front is made of candidates whose subset score was lucky (the
winner's curse): their validation scores rise with the budget while their test scores do
not. So the front a run reports, exports and re-scores on test is chosen in a second step:

(``pooled``: step 3 on each candidate's search and fresh items together.)

1. **Candidates**: every search candidate that no other candidate *clearly* dominates, i.e.
   beats by more than ``z`` combined standard errors on every objective (``noise_margin``),
   the least dominated first, at most ``max_points`` of them (the raw front always first).
2. **Confirmation**: each is scored on the validation items *outside* the search subset
   (fresh items: unbiased by the selection).
3. **Final front**: the non-dominated set of the candidates on their confirmation scores.

Pure functions here; ``evomerge.confirm_run`` runs the scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from evomerge.search.pareto import nondominated

SEARCH_SCORES = "search scores"
CONFIRMATION = "confirmation"
POOLED = "pooled"


@dataclass(frozen=True)
class ConfirmSettings:
    """``fitness.final_front`` and its knobs (docs/concepts.md, "The final front")."""

    mode: str = POOLED  # "pooled" | "confirmation" | "search scores"
    z: float = 1.0
    max_points: int = 16


@dataclass
class FinalFront:
    """Which archive ids form the final front, chosen by which estimate, on which scores."""

    ids: list[int]
    estimate: str  # SEARCH_SCORES or CONFIRMATION
    note: str = ""
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # id -> scores the front was chosen on
    stderr: dict[int, dict[str, float]] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)  # objective -> confirmation items
    candidates: list[int] = field(default_factory=list)  # ids that were confirmed


def noise_margin(scores: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    """Per candidate (rows; scores higher is better): the largest margin, in combined standard
    errors, by which another candidate beats it on *every* objective. <= 0: nothing clearly
    beats it (the raw front has margin <= 0)."""
    scores, stderr = np.asarray(scores, dtype=float), np.asarray(stderr, dtype=float)
    n = len(scores)
    out = np.full(n, -np.inf)
    for i in range(n):
        diff = scores - scores[i]  # others minus i
        combined = np.sqrt(stderr**2 + stderr[i] ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(combined > 0, diff / combined, np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0)))
        worst = z.min(axis=1)  # how clearly j beats i on its weakest objective
        worst[i] = -np.inf
        out[i] = worst.max() if n > 1 else -np.inf
    return out


def confirmation_candidates(records: Sequence[Any], objectives: Sequence[str], settings: ConfirmSettings) -> list[Any]:
    """The records worth confirming: the raw front first, then those within ``z`` standard
    errors of not being dominated, least dominated first, ``max_points`` at most."""
    ok = [r for r in records if r.error is None]
    if not ok:
        return []
    scores = np.array([[r.scores[o] for o in objectives] for r in ok])
    stderr = np.array([[float(r.stderr.get(o, 0.0) or 0.0) for o in objectives] for r in ok])
    raw = set(nondominated(1.0 - scores).tolist())
    margin = noise_margin(scores, stderr)
    order = sorted(range(len(ok)), key=lambda i: (i not in raw, margin[i], ok[i].id))
    chosen = [i for i in order if i in raw or margin[i] <= settings.z]
    return [ok[i] for i in chosen[: max(settings.max_points, 1)]]


def pooled_scores(record: Any, fresh: Mapping[str, float], objectives: Sequence[str], fresh_items: Mapping[str, int]) -> dict[str, float]:
    """A candidate's score over the search's items and the fresh ones together (weighted by
    their item counts): half the noise of either, part of the selection bias of the first."""
    out = {}
    for o in objectives:
        n_search = int((record.fidelity or {}).get(o, 0) or 0)
        n_fresh = int(fresh_items.get(o, 0))
        total = n_search + n_fresh
        out[o] = float(fresh[o]) if total == 0 or n_search == 0 else (n_search * float(record.scores[o]) + n_fresh * float(fresh[o])) / total
    return out


def final_front(candidates: Sequence[Any], confirmed: Mapping[int, Mapping[str, float]], objectives: Sequence[str]) -> list[int]:
    """Ids of the candidates that are non-dominated on their confirmation scores."""
    ids = [r.id for r in candidates if r.id in confirmed]
    if not ids:
        return []
    scores = np.array([[confirmed[i][o] for o in objectives] for i in ids])
    return [ids[k] for k in sorted(nondominated(1.0 - scores).tolist())]
