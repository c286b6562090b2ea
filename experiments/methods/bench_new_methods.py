"""Merge time of the new methods per candidate, as a ratio to the copy bound (see
``experiments/bench_merge.py``, whose model builder and timer this reuses).

Each timed candidate changes the genes a search changes, so cached work is only reused
where a real search would reuse it:

- ``setup``: extra time of the first merge, which builds the new methods' per-unit caches
  (DELLA row ranks, the SVDs that do not depend on the genome); the magnitude tables that
  all methods share are built in a warm-up merge before;
- ``ms / candidate``: median over repeats with new weights (and lambda) each time;
- ``tsv_m (new rank)`` / ``iso_cts (new common)``: a new rank value each time, which
  misses the rank-keyed cache (the worst case of a search over that gene).

On a shared CPU run it with ``OMP_NUM_THREADS=1``: oversubscribed BLAS threads can be 40x slower.

    python experiments/methods/bench_new_methods.py                  # SmolLM2-135M shape, 2 experts
    python experiments/methods/bench_new_methods.py --layers 8 --vocab 8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_merge import add_shape_arguments, build_pool, timed  # noqa: E402

from evomerge.merge.merger import Merger, resolve_device  # noqa: E402
from evomerge.merge.recipe import Recipe  # noqa: E402

METHODS = [
    "task_arithmetic", "task_arithmetic_trim", "breadcrumbs_ties", "della_linear", "sce", "karcher", "multislerp", "nuslerp",
    "tsv_m", "tsv_m (new rank)", "iso_c", "iso_cts", "iso_cts (new common)",
]


def params_for(method: str, k: int, step: int) -> tuple[str, dict]:
    w = [0.5 + 0.01 * ((step + i) % 7) for i in range(k)]  # new weights every candidate
    lam = 0.9 + 0.01 * (step % 5)
    if method == "tsv_m (new rank)":
        return "tsv_m", {"weight": w, "rank": [0.3, 0.5, 0.7, 0.9][step % 4], "lambda": lam}
    if method == "iso_cts (new common)":
        return "iso_cts", {"common": [0.6, 0.7, 0.8, 0.9][step % 4], "lambda": lam}
    table = {
        "task_arithmetic": {"weight": w, "lambda": lam},
        "task_arithmetic_trim": {"weight": w, "density": [0.4] * k, "lambda": lam},
        "breadcrumbs_ties": {"weight": w, "density": [0.4] * k, "gamma": 0.01, "lambda": lam},
        "della_linear": {"weight": w, "density": [0.4] * k, "epsilon": 0.1, "lambda": lam},
        "sce": {"select_topk": 0.4 + 0.01 * (step % 5)},
        "karcher": {"weight": w},
        "multislerp": {"weight": w},
        "nuslerp": {"weight": w},
        "tsv_m": {"weight": w, "rank": 1.0, "lambda": lam},
        "iso_c": {"lambda": lam},
        "iso_cts": {"common": 0.8, "lambda": lam},
    }
    return method, table[method]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, repeats=3)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.set_grad_enabled(False)
    pool = build_pool(args)

    merger = Merger(pool, device=device, check_finite=False)
    k = merger.n_experts
    merger.apply(Recipe.uniform("task_arithmetic", {"weight": [1.0] * k}, merger.n_layers))  # warm-up; builds the magnitude tables all methods share
    rows = []
    copy_s = None
    for method in args.methods:
        for u in merger._units:  # drop the new methods' per-unit caches, so that their setup is measured
            u.group.__dict__.pop("_svd_cache", None)
        if copy_s is None:
            n = sum(u.group.base.numel() for u in merger._units)
            elsize = merger._units[0].out.element_size()
            src = torch.empty((k + 1) * n, dtype=merger._units[0].out.dtype, device=device)
            dst = torch.empty_like(src)
            copy_s = timed(lambda: dst.copy_(src), device, args.repeats)
            del src, dst
            print(f"device {device}, {n / 1e6:.1f}M parameters, {k} experts, {args.dtype}, threads {torch.get_num_threads()}")
            print(f"bound: copy of the {(k + 1) * n * elsize / 2**30:.2f} GiB of merge inputs: {copy_s * 1e3:.1f} ms")
            print(f"{'method':<22} {'setup s':>8} {'ms / candidate':>14} {'x bound':>8}")
        name, first = params_for(method, k, 0)
        t = time.perf_counter()
        merger.apply(Recipe.uniform(name, first, merger.n_layers))
        first_s = time.perf_counter() - t
        step = [0]

        def candidate():
            step[0] += 1
            name_, params = params_for(method, k, step[0])
            merger.apply(Recipe.uniform(name_, params, merger.n_layers))

        per = timed(candidate, device, args.repeats)
        setup = max(first_s - per, 0.0)
        rows.append({"method": method, "setup_s": round(setup, 3), "ms_per_candidate": round(per * 1e3, 1), "x_bound": round(per / copy_s, 2)})
        print(f"{method:<22} {setup:8.2f} {per * 1e3:14.1f} {per / copy_s:8.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "copy_ms": round(copy_s * 1e3, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
