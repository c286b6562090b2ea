"""Candidates per minute: executor=local vs executor=ray with 1 and 2 workers, side by side.

Each setting runs the same search (NSGA-II, population 8, the toy zoo, default fitness
tasks on their 100-doc subsets) in a fresh run directory. Two figures per setting:
``search`` -- candidates per minute of the search loop itself (workers already up), and
``total`` -- including model loading and Ray/worker start-up. The archives of all settings
must be identical (same seed); the script checks it.

    python experiments/bench_executor.py [--evals 32] [--zoo tiny|default] [--workers 1,2] [--subset 100] [--out DIR]

On a GPU machine use ``--gpu``: each Ray worker then gets one GPU (``gpus_per_worker=1``).

``--modes``: instead, ``executor.mode`` generational vs async on Ray (``--mode-workers``
workers, random search, the same budget and seed), candidates per minute and the workers'
idle share side by side; both must evaluate the same candidates (archive order differs).

``--simulate``: the same comparison without Ray or models: the real search loop (random
search, a 2-expert genome), ``--mode-workers`` threads as workers, and a *simulated*
candidate cost (a sleep fixed per recipe: constant, or log-normal with ``--cost-cv``), so
it isolates what the generation barrier costs and what the steady state wins back, driver
overhead (archive + checkpoint per candidate) included.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run_one(overrides: list[str], run_dir: Path) -> dict:
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search
    from evomerge.search.archive import Archive
    from evomerge.search.loop import SearchLoop

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    spent = {"search": 0.0}
    original = SearchLoop.run

    def timed(self, *args, **kwargs):  # time the search loop alone (workers already started)
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["search"] += time.perf_counter() - started

    SearchLoop.run = timed
    started = time.perf_counter()
    try:
        run_search(cfg, run_dir, overrides=[])
    finally:
        SearchLoop.run = original
    total = time.perf_counter() - started
    records = Archive(run_dir / "archive.jsonl").records
    search = [r for r in records if r.kind == "search"]
    n = len(search)
    workers = int(cfg.executor.get("workers", 1)) if "executor" in cfg else 1
    busy = sum(r.merge_s + r.eval_s for r in search)
    costs = np.array([r.merge_s + r.eval_s for r in search]) if search else np.zeros(1)
    return {
        "evals": n,
        "search_s": spent["search"],
        "total_s": total,
        "search_per_min": 60 * n / spent["search"],
        "total_per_min": 60 * n / total,
        # share of worker time spent evaluating during the search loop: what a steady-state
        # (asynchronous) mode could at most win back from generation barriers and dispatch
        "utilisation": busy / (workers * spent["search"]),
        "cost_mean_s": float(costs.mean()),
        "cost_cv": float(costs.std() / costs.mean()) if costs.mean() > 0 else 0.0,  # spread of candidate cost
        "archive": [(r.key, r.scores) for r in records],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=32)
    ap.add_argument("--zoo", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--subset", type=int, default=100, help="fitness.subset_size (items per task per candidate)")
    ap.add_argument("--gpu", action="store_true", help="one GPU per Ray worker (else CPU workers, device=cpu)")
    ap.add_argument("--out", default=None, help="folder for the run directories (default: a temp folder)")
    ap.add_argument("--modes", action="store_true", help="compare executor.mode generational vs async (random search on Ray)")
    ap.add_argument("--mode-workers", type=int, default=2)
    ap.add_argument("--simulate", action="store_true", help="--modes with threads and simulated candidate cost (no Ray, no models)")
    ap.add_argument("--cost-s", type=float, default=0.5, help="--simulate: mean candidate cost in seconds")
    ap.add_argument("--cost-cv", default="0,0.5,1", help="--simulate: coefficients of variation of the cost to compare (0 = constant)")
    args = ap.parse_args()
    if args.simulate:
        return simulate_modes(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_executor_"))
    common = [
        f"modelpool.size={args.zoo}", f"search.max_evals={args.evals}", "algorithm.pop_size=8", "search.progress=false",
        "fitness.test_rescore=false", f"fitness.subset_size={args.subset}", "report.plots=false", "report.html=false", "device=" + ("cuda" if args.gpu else "cpu"),
    ]
    if args.modes:
        return compare_modes(args, common, out)
    settings = [("local", ["executor=local"])]
    for w in [int(v) for v in args.workers.split(",")]:
        ray = ["executor=ray", f"executor.workers={w}"] + (["executor.gpus_per_worker=1"] if args.gpu else [])
        settings.append((f"ray x{w}", ray))
    results = {}
    for name, extra in settings:
        results[name] = run_one(common + extra, out / name.replace(" ", "_"))
        r = results[name]
        print(f"{name:>8}: {r['evals']} candidates, search {r['search_s']:.1f} s ({r['search_per_min']:.1f}/min), total {r['total_s']:.1f} s ({r['total_per_min']:.1f}/min), workers busy {100 * r['utilisation']:.0f}%", flush=True)
    base = results["local"]
    same = all(r["archive"] == base["archive"] for r in results.values())
    print("\n| executor | candidates/min (search) | vs local | candidates/min (incl. start-up) | vs local | workers busy |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['search_per_min']:.1f} | {r['search_per_min'] / base['search_per_min']:.2f}x | {r['total_per_min']:.1f} | {r['total_per_min'] / base['total_per_min']:.2f}x | {100 * r['utilisation']:.0f}% |")
    ray_names = [n for n in results if n.startswith("ray")]
    if len(ray_names) >= 2:
        a, b = results[ray_names[0]], results[ray_names[-1]]
        print(f"\n{ray_names[-1]} over {ray_names[0]}: {b['search_per_min'] / a['search_per_min']:.2f}x (search loop)")
    print(f"archives identical across settings: {same}")
    (out / "bench_executor.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "archive"} for k, v in results.items()}, indent=1))


def compare_modes(args: argparse.Namespace, common: list[str], out: Path) -> None:
    import ray as ray_lib

    for attempt in range(3):  # one Ray instance for both modes (the raylet may miss its 30 s on a loaded machine)
        try:
            ray_lib.init(address="local", num_cpus=args.mode_workers, include_dashboard=False, configure_logging=False)
            break
        except Exception:  # noqa: BLE001
            ray_lib.shutdown()
            if attempt == 2:
                raise
    ray = ["executor=ray", f"executor.workers={args.mode_workers}", "algorithm=random"] + (["executor.gpus_per_worker=1"] if args.gpu else [])
    results = {}
    for mode in ("generational", "async"):
        r = results[mode] = run_one([*common, *ray, f"executor.mode={mode}"], out / mode)
        print(f"{mode:>12}: {r['evals']} candidates, search {r['search_s']:.1f} s ({r['search_per_min']:.1f}/min), workers idle {100 * (1 - r['utilisation']):.0f}%", flush=True)
    load = os.getloadavg()
    gen, asy = results["generational"], results["async"]
    print(f"\n| mode (ray x{args.mode_workers}, random, pop 8) | candidates/min (search) | candidates/min (incl. worker start-up) | workers idle | candidate cost mean / CV |\n|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['search_per_min']:.1f} | {r['total_per_min']:.1f} | {100 * (1 - r['utilisation']):.0f}% | {r['cost_mean_s']:.2f} s / {r['cost_cv']:.2f} |")
    print(f"\nasync over generational: {asy['search_per_min'] / gen['search_per_min']:.2f}x (search loop); load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"same candidates and scores in both modes: {sorted(gen['archive']) == sorted(asy['archive'])}")
    (out / "bench_modes.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "archive"} | {"loadavg": load} for k, v in results.items()}, indent=1))


class SimulatedWorkers:
    """Threads standing in for Ray workers: a candidate 'costs' a sleep fixed by its recipe
    (the same in both modes). Implements map (generational) and submit/idle/next_completed."""

    def __init__(self, workers: int, mode: str, cost_s: float, cv: float):
        from concurrent.futures import ThreadPoolExecutor

        self.workers, self.mode, self.cost_s, self.cv = workers, mode, cost_s, cv
        self.pool = ThreadPoolExecutor(workers)
        self.futures: dict = {}

    def _evaluate(self, recipe):
        from evomerge.executors.base import Outcome

        groups = json.dumps(recipe.to_dict()["groups"], sort_keys=True)
        rng = np.random.default_rng(int.from_bytes(groups.encode()[-64:], "little") % (2**63))
        sigma = np.sqrt(np.log1p(self.cv**2))  # log-normal with mean cost_s and this CV
        cost = self.cost_s * (rng.lognormal(-sigma**2 / 2, sigma) if self.cv > 0 else 1.0)
        time.sleep(cost)
        w = recipe.groups[-1].params["weight"]
        return Outcome({"a": float(w[0]), "b": float(w[1])}, eval_s=cost)

    def submit(self, key, recipe):
        self.futures[self.pool.submit(self._evaluate, recipe)] = key

    def idle(self):
        return self.workers - len(self.futures)

    def next_completed(self):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        future = next(iter(done))
        return self.futures.pop(future), future.result()

    def map(self, jobs):
        for key, recipe in jobs:
            self.submit(key, recipe)
        while self.futures:
            yield self.next_completed()

    def close(self):
        self.pool.shutdown()


def simulate_modes(args: argparse.Namespace) -> None:
    from evomerge.search.algorithms import RandomStrategy
    from evomerge.search.archive import Archive
    from evomerge.search.genome import GenomeSpace
    from evomerge.search.loop import SearchLoop

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_modes_sim_"))
    space = GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic",), separate_embed_head=False)
    print(f"SIMULATED candidate cost (sleep, mean {args.cost_s} s), {args.mode_workers} thread workers, random search pop 8, {args.evals} candidates\n")
    print("| cost CV | mode | candidates/min | workers idle | vs generational |\n|---|---|---|---|---|")
    same = True
    for cv in [float(v) for v in args.cost_cv.split(",")]:
        results = {}
        for mode in ("generational", "async"):
            run_dir = out / f"cv{cv}_{mode}"
            run_dir.mkdir(parents=True)
            loop = SearchLoop(space, RandomStrategy(pop_size=8), ["a", "b"], run_dir, max_evals=args.evals, seed=0, progress=False)
            workers = SimulatedWorkers(args.mode_workers, mode, args.cost_s, cv)
            started = time.perf_counter()
            loop.run(workers)
            elapsed = time.perf_counter() - started
            workers.close()
            search = Archive(run_dir / "archive.jsonl").search_records()
            busy = sum(r.eval_s for r in search)
            results[mode] = (60 * len(search) / elapsed, 1 - busy / (args.mode_workers * elapsed), sorted((r.key, r.scores["a"]) for r in search))
        same &= results["generational"][2] == results["async"][2]
        for mode, (rate, idle, _) in results.items():
            print(f"| {cv:g} | {mode} | {rate:.1f} | {100 * idle:.0f}% | {rate / results['generational'][0]:.2f}x |")
    load = os.getloadavg()
    print(f"\nsame candidates and scores in both modes: {same}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
