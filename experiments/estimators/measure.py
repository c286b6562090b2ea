"""How far each fitness estimator is from the full validation split, and what it costs.

For a setting (``toy``: the zoo the current code builds; ``smollm2``: the experiment in
``configs/experiment/smollm2.yaml``, needs ``$EVOMERGE_CACHE/smollm2`` from
``experiments/smollm2/prepare.py``), this draws held-out candidates (seeded random
genomes of the setting's genome space, none of them used for calibration), scores each on
the full validation split, then scores them again with each estimator at the same number
of items per task:

- ``random_subset``: a fixed seeded random subset (the default estimator);
- ``irt_anchors``: the IRT anchor estimator (calibrated first on the base, the experts
  and probe merges; calibration cost reported separately);
- ``multifidelity``: starts at the same number of items and promotes candidates that
  could enter the running front (the candidates come in order, as in a search whose
  archive starts with the base and the experts, exact); its ``items`` is the mean
  actually scored, ``front_recall`` the share of the exact front's candidates (among the
  held-out ones) it scored on the full split.

MAE is the mean over candidates and objectives of |estimate - full-split score|.

    python experiments/estimators/measure.py --setting toy [--candidates 30] [--items 20]

Writes/updates ``experiments/estimators/results.json``:
``{"<setting>": {"<estimator>": {"items": n, "mae": .., "seconds_per_candidate": ..}}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
OVERRIDES = {"toy": [], "smollm2": ["+experiment=smollm2"]}


def compose(setting: str, extra: list[str]):
    import evomerge.cli  # noqa: F401  (registers the config resolvers)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="evomerge.configs", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=OVERRIDES[setting] + extra)


def mae(est: list[dict[str, float]], exact: list[dict[str, float]], objectives: list[str]) -> float:
    return float(np.mean([abs(e[o] - x[o]) for e, x in zip(est, exact) for o in objectives]))


def table(data: dict) -> str:
    """results.json as a markdown table (the README's)."""
    lines = ["| setting | estimator | items per task | MAE vs full split | s per candidate | notes |", "|---|---|---|---|---|---|"]
    for setting, rows in data.items():
        for name, r in rows.items():
            notes = []
            if "calibration_models" in r:
                notes.append(f"calibration: {r['calibration_models']} models on the full split, {r['calibration_seconds']:.0f} s once; mean reported SE {r['mean_reported_stderr']:.3f}")
            if "front_recall" in r:
                notes.append(f"k={r['k']:g}; {r['full_split_share']:.0%} of candidates promoted to the full split; exact-front recall {r['front_recall']:.0%} ({r['exact_front_size']} points)")
            lines.append(f"| {setting} | {name} | {r['items']:.1f} | {r['mae']:.4f} | {r['seconds_per_candidate']:.2f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(OVERRIDES), default="toy")
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--items", type=int, default=20, help="items per task for every estimator")
    p.add_argument("--n-probes", type=int, default=None, help="IRT calibration probes (default: configs/fitness/estimator/irt.yaml)")
    p.add_argument("--k", type=float, default=2.0, help="multi-fidelity slack in standard errors")
    p.add_argument("--seed", type=int, default=12345, help="held-out candidates' seed")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--table", action="store_true", help="print results.json as a markdown table and exit")
    p.add_argument("--only", nargs="+", choices=["subset", "irt", "multifidelity"], default=None,
                   help="re-measure only these estimators (reuses the cached full-split scores, keeps the other rows)")
    p.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return

    from omegaconf import OmegaConf

    from evomerge.estimators.base import FitnessContext
    from evomerge.estimators.irt import IrtEstimator
    from evomerge.estimators.lm_eval_fitness import LmEvalFitness, quiet_libraries
    from evomerge.estimators.multifidelity import MultiFidelityEstimator
    from evomerge.merge.merger import Merger
    from evomerge.run import _get, _tasks, build_pool, build_space
    from evomerge.search.archive import Archive, Record
    from evomerge.search.pareto import nondominated

    quiet_libraries()
    cfg = compose(args.setting, list(args.override))
    if args.setting == "smollm2" and not Path(str(cfg.smollm2_dir)).is_dir():
        sys.exit(f"no {cfg.smollm2_dir}: run experiments/smollm2/prepare.py first")
    pool, experts, _ = build_pool(cfg)
    merger = Merger(pool, device=args.device or OmegaConf.select(cfg, "device") or "auto")
    space = build_space(cfg, merger, list(experts))
    tasks = _tasks(cfg.fitness.objectives, "fitness.objectives")
    objectives = [t.name for t in tasks]
    common = dict(
        split=str(cfg.fitness.split or "validation"),
        batch_size=_get(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
    full = LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=None, **common)
    n_docs = dict(full.scorer.n_docs)
    rng = np.random.default_rng(args.seed)
    recipes = [space.decode(rng.random(space.n_var)) for _ in range(args.candidates)]
    print(f"{args.setting}: {len(recipes)} held-out candidates, objectives {objectives}, docs per task {n_docs}", flush=True)

    def timed(fn) -> tuple[list, float]:
        out, started = [], time.perf_counter()
        for r in recipes:
            merger.apply(r)
            out.append(fn())
        return out, (time.perf_counter() - started) / len(recipes)

    merger.apply(recipes[0])
    full()  # warm-up: builds every request once, as a run would
    # the full-split scores are cached so that one estimator can be re-measured alone (--only)
    cache = HERE / f"exact_{args.setting}.json"
    cache_key = {"seed": args.seed, "candidates": args.candidates, "overrides": list(args.override)}
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if args.only and cached and cached["key"] == cache_key:
        exact, full_s = cached["exact"], cached["seconds_per_candidate"]
    else:
        exact, full_s = timed(full)
        exact = [dict(s) for s in exact]
        cache.write_text(json.dumps({"key": cache_key, "seconds_per_candidate": full_s, "exact": exact}) + "\n")
    only = set(args.only or ["subset", "irt", "multifidelity"])
    results: dict[str, dict] = {"full_split": {"items": sum(n_docs[t.task] for t in tasks) / len(tasks), "mae": 0.0, "seconds_per_candidate": full_s}}
    print(f"full split: {full_s:.2f} s per candidate", flush=True)

    n = args.items
    if "subset" in only:
        sub = LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=n, subset_seed=0, **common)
        est, s = timed(sub)
        results["random_subset"] = {"items": n, "mae": mae(est, exact, objectives), "seconds_per_candidate": s}
        # the same estimator at the default subset size, for scale
        default_n = OmegaConf.select(cfg, "fitness.subset_size")
        if default_n and int(default_n) != n:
            sub_d = LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=int(default_n), subset_seed=0, **common)
            est, s = timed(sub_d)
            results[f"random_subset_{int(default_n)}"] = {"items": int(default_n), "mae": mae(est, exact, objectives), "seconds_per_candidate": s}
        print({k: v for k, v in results.items()}, flush=True)

    if "irt" in only:
        irt_cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/fitness/estimator/irt.yaml").read_text())
        n_probes = args.n_probes if args.n_probes is not None else int(irt_cfg["n_probes"])
        with tempfile.TemporaryDirectory() as tmp:
            ctx = FitnessContext(merger.model, merger.tokenizer, tasks, objectives, subset_size=n, run_dir=Path(tmp), merger=merger, seed=0, **common)
            irt = IrtEstimator(ctx, n_anchors=n, n_probes=n_probes, fitness=full)
            est, s = timed(irt)
            results["irt_anchors"] = {
                "items": irt.items_per_candidate / len(tasks), "mae": mae(est, exact, objectives), "seconds_per_candidate": s,
                "calibration_models": 1 + len(experts) + n_probes, "calibration_seconds": irt.calibration_s,
                "mean_reported_stderr": float(np.mean([e.stderr[o] for e in est for o in objectives])),
            }
            print("irt", results["irt_anchors"], flush=True)

    if "multifidelity" in only:
        # a search seeded with the references starts with them, exact, in its archive
        from evomerge.estimators.irt import reference_recipes

        refs = []
        for recipe in reference_recipes(merger.n_experts, merger.pool.expert_names, merger.n_layers).values():
            merger.apply(recipe)
            refs.append(full())
        exact_front = {int(i) for i in nondominated(np.array([[1 - e[o] for o in objectives] for e in exact]))}
        top = {o: n_docs[t.task] for o, t in zip(objectives, tasks)}
        for k in sorted({args.k, 1.0}):
            with tempfile.TemporaryDirectory() as tmp:
                ctx = FitnessContext(merger.model, merger.tokenizer, tasks, objectives, subset_size=n, run_dir=Path(tmp), merger=merger, seed=0, **common)
                mf = MultiFidelityEstimator(ctx, k=k, growth=2.0, fitness=full)
                archive = Archive(Path(tmp) / "archive.jsonl")
                for i, sc in enumerate(refs):
                    archive.append(Record(-1 - i, "search", f"ref{i}", [0.0], {}, dict(sc), [1 - sc[o] for o in objectives], stderr=sc.stderr, fidelity=sc.fidelity))
                mf.attach(archive)
                est, started = [], time.perf_counter()
                for i, r in enumerate(recipes):
                    merger.apply(r)
                    sc = mf()
                    est.append(sc)
                    archive.append(Record(i, "search", str(i), [0.0], {}, dict(sc), [1 - sc[o] for o in objectives], stderr=sc.stderr, fidelity=sc.fidelity))
                s = (time.perf_counter() - started) / len(recipes)
                recall = np.mean([all(est[i].fidelity[o] >= top[o] for o in objectives) for i in exact_front])
                key = "multifidelity" if k == args.k else f"multifidelity_k{k:g}"
                results[key] = {
                    "items": float(np.mean([np.mean([e.fidelity[o] for o in objectives]) for e in est])), "mae": mae(est, exact, objectives),
                    "seconds_per_candidate": s, "k": k, "front_recall": float(recall), "exact_front_size": len(exact_front),
                    "full_split_share": float(np.mean([all(e.fidelity[o] >= top[o] for o in objectives) for e in est])),
                }
                print(key, results[key], flush=True)

    for v in results.values():
        for key in ("mae", "seconds_per_candidate", "items", "calibration_seconds", "mean_reported_stderr"):
            if key in v:
                v[key] = round(float(v[key]), 4)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.setting] = {**data.get(args.setting, {}), **results} if args.only else results
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
