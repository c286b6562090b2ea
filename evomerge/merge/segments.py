"""Per-segment facts a ``DeltaGroup`` does not carry itself: each segment's original shape
(set by the merger as the optional attribute ``group.shapes``) and a per-group cache for
genome-independent results. Kept apart from the methods so that both method modules
can import it without an import cycle."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

from evomerge.errors import MergeError
from evomerge.merge.groups import DeltaGroup


def attach_shapes(group: DeltaGroup, shapes: Sequence[Sequence[int]]) -> DeltaGroup:
    """Tell ``group`` the original shape of each segment (needed for per-matrix methods)."""
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    if len(shapes) != len(group.segments) or any(math.prod(s) != n for s, n in zip(shapes, group.segments)):
        raise MergeError(f"shapes {shapes} do not match the group's segment sizes {group.segments}")
    group.shapes = shapes  # type: ignore[attr-defined]  # optional attribute, default: none (all 1-D)
    return group


def segment_layout(group: DeltaGroup) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
    """``(start, size, (rows, cols) or None)`` for every segment; None = treat as 1-D."""
    shapes = getattr(group, "shapes", None)
    start = 0
    for i, n in enumerate(group.segments):
        shape = shapes[i] if shapes is not None else None
        matrix = (int(shape[0]), int(shape[1])) if shape is not None and len(shape) == 2 and min(shape) > 1 else None
        yield start, n, matrix
        start += n


def cache_of(group: DeltaGroup) -> dict:
    """Per-group store for genome-independent results (lives as long as the group)."""
    cache = group.__dict__.get("_svd_cache")
    if cache is None:
        cache = {}
        group.__dict__["_svd_cache"] = cache
    return cache
