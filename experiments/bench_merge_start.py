"""A run's first merge and the per-candidate finite check: today's path vs the one before 2026-12-08.

Two costs every run pays, measured side by side on the same pool in one process:

- **first merge** (task arithmetic, the default genome's method): until 2026-12-08 cutting a unit
  into chunks built its magnitude table first, a full sort of every task vector with the
  default exact thresholds (``merger.table_size: null``), although task arithmetic never reads
  it. Now the table is built on the first threshold a method asks for. "before" = a fresh merger
  whose tables are built the old way, then the same merge.
- **finite check** after every merge: ``isfinite(out).all()`` per unit (a bool copy of the
  weights and one device sync per unit) vs one float32 sum per unit, checked together.

    python experiments/bench_merge_start.py                   # SmolLM2-135M shape, 2 experts
    python experiments/bench_merge_start.py --layers 4 --vocab 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_merge import add_shape_arguments, build_pool
from evomerge.merge.merger import Merger, resolve_device
from evomerge.merge.recipe import Recipe


def first_merge_seconds(pool, device: torch.device, eager_tables: bool) -> tuple[float, int]:
    """Seconds of a fresh merger's first task-arithmetic merge, and the magnitude tables' bytes."""
    merger = Merger(pool, device=device, table_size=None)
    recipe = Recipe.uniform("task_arithmetic", {"weight": [0.6] * merger.n_experts}, merger.n_layers)
    started = time.perf_counter()
    if eager_tables:  # what chunking did before: every unit's table, whatever the method
        for unit in merger._units:
            unit.group.magnitudes
    merger.apply(recipe)
    seconds = time.perf_counter() - started
    held = sum(u.group._table.table.nbytes + u.group._table.index.nbytes for u in merger._units if u.group._table is not None)
    return seconds, held


def check_seconds(outs: list[torch.Tensor], summed: bool) -> float:
    started = time.perf_counter()
    if summed:
        bool(torch.isfinite(torch.stack([o.sum(dtype=torch.float32) for o in outs])).all())
    else:
        all(bool(torch.isfinite(o).all()) for o in outs)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, repeats=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    pool = build_pool(args)
    before, now, held = [], [], 0
    for _ in range(args.repeats):  # alternated, so a shared machine's load hits both sides alike
        s, held = first_merge_seconds(pool, device, eager_tables=True)
        before.append(s)
        now.append(first_merge_seconds(pool, device, eager_tables=False)[0])
    b, n = statistics.median(before), statistics.median(now)
    print(f"device {device}, {args.layers} layers, {args.experts} experts, {args.dtype}")
    print(f"first merge (task arithmetic): before {b:7.2f} s (tables {held / 2**30:.2f} GiB held), now {n:7.2f} s: {b / n:5.1f}x")
    outs = [u.out for u in Merger(pool, device=device)._units]
    old, new = [], []
    for _ in range(max(args.repeats, 5)):
        old.append(check_seconds(outs, summed=False))
        new.append(check_seconds(outs, summed=True))
    o, w = statistics.median(old), statistics.median(new)
    print(f"finite check per candidate: isfinite().all() per unit {o * 1e3:7.1f} ms, sums {w * 1e3:7.1f} ms: {o / w:5.1f}x")


if __name__ == "__main__":
    main()
