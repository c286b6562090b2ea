"""Pareto fronts, hypervolume and knee points (all objectives minimised)."""

from __future__ import annotations

import numpy as np


def nondominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (duplicates kept once)."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return np.array([], dtype=int)
    keep = []
    for i in range(len(F)):
        dominated = np.any(np.all(F <= F[i], axis=1) & np.any(F < F[i], axis=1))
        duplicate = any(np.array_equal(F[i], F[j]) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return np.array(keep, dtype=int)


def hypervolume(F: np.ndarray, ref_point: np.ndarray) -> float:
    """Hypervolume dominated by F and bounded by ref_point (points beyond it count 0)."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return 0.0
    F = F[np.all(F < ref_point, axis=1)]
    if len(F) == 0:
        return 0.0
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=np.asarray(ref_point, dtype=float))(F))


def knee_point(F: np.ndarray) -> int:
    """Index of the front point closest to the ideal point after normalising each axis."""
    F = np.asarray(F, dtype=float)
    lo, hi = F.min(0), F.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return int(np.argmin(np.linalg.norm((F - lo) / span, axis=1)))
