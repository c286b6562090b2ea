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
  actually scored, ``front_recall`` the share of the held-out candidates on the exact front
  (of the references and the held-out candidates, as the promoter's archive holds them) that
  it scored on the full split.

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
from typing import Any

import numpy as np
import yaml

from evomerge.search.pareto import nondominated

HERE = Path(__file__).resolve().parent
# candidates drawn from the layer-wise mixed genome, as measured (the default genome until 2026-12-05)
OVERRIDES = {"toy": ["genome=layerwise_mixed"], "smollm2": ["+experiment=smollm2", "genome=layerwise_mixed", "genome.layer_groups=3"]}


def compose(setting: str, extra: list[str]):
    import evomerge.cli  # noqa: F401  (registers the config resolvers)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="evomerge.configs", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=OVERRIDES[setting] + extra)


def mae(est: list[dict[str, float]], exact: list[dict[str, float]], objectives: list[str]) -> float:
    return float(np.mean([abs(e[o] - x[o]) for e, x in zip(est, exact) for o in objectives]))


def table(data: dict) -> str:
    """results.json as a markdown table (as in docs/estimators.md)."""
    lines = ["| setting | estimator | items per task | MAE vs full split | s per candidate | cost vs full split | notes |", "|---|---|---|---|---|---|---|"]
    for setting, rows in data.items():
        if setting == "search_stream":  # search_stream.py's results, another shape
            continue
        for name, r in rows.items():
            notes = []
            if "calibration_models" in r:
                notes.append(f"calibration: {r['calibration_models']} models on the full split, {r['calibration_seconds']:.0f} s once; mean reported SE {r['mean_reported_stderr']:.3f}")
            if "front_recall" in r:
                notes.append(f"k={r['k']:g}; {r['full_split_share']:.0%} of candidates promoted to the full split; exact-front recall {'n/a' if r['front_recall'] is None else format(r['front_recall'], '.0%')} ({r['exact_front_size']} held-out points on the front with the references)")
            if r.get("cost", "").startswith("derived"):
                notes.append("replayed from full-split items; s/candidate derived")
            lines.append(f"| {setting} | {name} | {r['items']:.1f} | {r['mae']:.4f} | {r['seconds_per_candidate']:.2f} | {r.get('relative_cost', float('nan')):.2f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setting", choices=sorted(OVERRIDES), default="toy")
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--items", type=int, default=20, help="items per task for every estimator")
    p.add_argument("--n-probes", type=int, default=None, help="IRT calibration probes (default: configs/fitness/estimator/irt.yaml)")
    p.add_argument("--k", type=float, default=2.0, help="multi-fidelity slack in standard errors")
    p.add_argument("--extra-k", type=float, nargs="*", default=[1.0], help="further multi-fidelity slacks to measure")
    p.add_argument("--no-default-subset", dest="default_subset", action="store_false",
                   help="skip the random subset at the setting's default fitness.subset_size")
    p.add_argument("--seed", type=int, default=12345, help="held-out candidates' seed")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--table", action="store_true", help="print results.json as a markdown table and exit")
    p.add_argument("--only", nargs="+", choices=["subset", "irt", "multifidelity"], default=None,
                   help="re-measure only these estimators (reuses the cached full-split scores, keeps the other rows)")
    p.add_argument("--replay", action="store_true",
                   help="score each merge once on the full split and let every estimator read its items from that "
                        "(same answers, cost derived from measured seconds per item; see replay.py)")
    p.add_argument("--items-cache", default=None,
                   help="with --replay: JSON-lines cache of full-split items (default runs/estimators/items_<setting>.jsonl)")
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
    from evomerge.session import build_pool, build_space, config_value, fitness_tasks
    from evomerge.search.archive import Archive, Record

    quiet_libraries()
    cfg = compose(args.setting, list(args.override))
    if args.setting == "smollm2" and not Path(str(cfg.smollm2_dir)).is_dir():
        sys.exit(f"no {cfg.smollm2_dir}: run experiments/smollm2/prepare.py first")
    pool, experts, _ = build_pool(cfg)
    merger = Merger(pool, device=args.device or OmegaConf.select(cfg, "device") or "auto")
    space = build_space(cfg, merger, list(experts))
    tasks = fitness_tasks(cfg.fitness.objectives, "fitness.objectives")
    objectives = [t.name for t in tasks]
    common = dict(
        split=str(cfg.fitness.split or "validation"),
        batch_size=config_value(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
    full = LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=None, **common)
    n_docs = dict(full.scorer.n_docs)
    item_table = None
    if args.replay:
        from replay import ItemTable, ReplayFitness, ReplayMerger

        cache_file = Path(args.items_cache or f"runs/estimators/items_{args.setting}.jsonl")
        item_table = ItemTable(full, cache_file)
        merger = ReplayMerger(merger, item_table)  # every apply makes that merge's full-split items current
        full = ReplayFitness(item_table)

        def subset_fitness(size: int):  # the same seeded subsets LmEvalFitness(subset_size=size, subset_seed=0) picks
            from evomerge.estimators.lm_eval_fitness import choose_subset

            return ReplayFitness(item_table, {t: choose_subset(n, size, i) for i, (t, n) in enumerate(sorted(n_docs.items()))})
    else:
        def subset_fitness(size: int):
            return LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=size, subset_seed=0, **common)
    rng = np.random.default_rng(args.seed)
    recipes = [space.decode(rng.random(space.n_var)) for _ in range(args.candidates)]
    print(f"{args.setting}: {len(recipes)} held-out candidates, objectives {objectives}, docs per task {n_docs}", flush=True)

    if item_table:  # warm-up on the live objects, so no cached entry carries the request building
        merger._merger.apply(recipes[0])
        item_table.live.score_items(item_table.full_ids)
    else:
        merger.apply(recipes[0])
        full()  # warm-up: builds every request once, as a run would
    n = args.items
    only = set(args.only or ["subset", "irt", "multifidelity"])
    # the full-split scores are cached so that one estimator can be re-measured alone (--only)
    cache = Path(args.out).parent / f"exact_{args.setting}.json"
    cache_key = {"seed": args.seed, "candidates": args.candidates, "overrides": list(args.override)}
    cached = json.loads(cache.read_text()) if cache.exists() else None
    use_cache = bool(args.only and cached and cached["key"] == cache_key)

    # every estimator is built (IRT calibrated, multi-fidelity archives seeded) before the
    # candidates; then each candidate is merged once and every estimator scores the live
    # weights: seconds per candidate = its merge + that estimator's scoring
    ests: dict[str, Any] = {}
    extra: dict[str, dict] = {}
    tmp = tempfile.TemporaryDirectory()
    if "subset" in only:
        ests["random_subset"] = subset_fitness(n)
        default_n = OmegaConf.select(cfg, "fitness.subset_size")
        if args.default_subset and default_n and int(default_n) != n:  # the default subset size, for scale
            ests[f"random_subset_{int(default_n)}"] = subset_fitness(int(default_n))
    if "irt" in only:
        irt_cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/fitness/estimator/irt.yaml").read_text())
        n_probes = args.n_probes if args.n_probes is not None else int(irt_cfg["n_probes"])
        ctx = FitnessContext(merger.model, merger.tokenizer, tasks, objectives, subset_size=n, run_dir=Path(tmp.name) / "irt",
                             merger=merger, seed=0, **common)
        ctx.run_dir.mkdir()
        live_before = item_table.live_seconds if item_table else 0.0
        scored_before = item_table.scored_seconds if item_table else 0.0
        irt = IrtEstimator(ctx, n_anchors=n, n_probes=n_probes, fitness=full)
        if item_table:  # its model passes cost their full-split scorings, whether cached or scored just now
            irt.calibration_s += (item_table.live_seconds - live_before) - (item_table.scored_seconds - scored_before)
        ests["irt_anchors"] = irt
        extra["irt_anchors"] = {"calibration_models": 1 + len(experts) + n_probes, "calibration_seconds": irt.calibration_s}
        print(f"irt calibrated in {irt.calibration_s:.0f} s", flush=True)
    archives: dict[str, Any] = {}
    refs: list[Any] = []
    if "multifidelity" in only:
        # a search seeded with the references starts with them, exact, in its archive
        from evomerge.estimators.irt import reference_recipes

        for recipe in reference_recipes(merger.n_experts, merger.pool.expert_names, merger.n_layers).values():
            merger.apply(recipe)
            refs.append(full())
        for k in sorted({args.k, *args.extra_k}):
            key = "multifidelity" if k == args.k else f"multifidelity_k{k:g}"
            d = Path(tmp.name) / key
            d.mkdir()
            ctx = FitnessContext(merger.model, merger.tokenizer, tasks, objectives, subset_size=n, run_dir=d, merger=merger, seed=0, **common)
            mf = MultiFidelityEstimator(ctx, k=k, growth=2.0, fitness=full)
            archives[key] = Archive(d / "archive.jsonl")
            for i, sc in enumerate(refs):
                archives[key].append(Record(-1 - i, "search", f"ref{i}", [0.0], {}, dict(sc), [1 - sc[o] for o in objectives], stderr=sc.stderr, fidelity=sc.fidelity))
            mf.attach(archives[key])
            ests[key] = mf
            extra[key] = {"k": k}

    if item_table:
        for name in ests:
            extra.setdefault(name, {})["cost"] = "derived: merge + items x measured full-split s/item"
    exact: list[dict[str, float]] = cached["exact"] if use_cache else []
    out: dict[str, list] = {name: [] for name in ests}
    secs: dict[str, float] = {name: 0.0 for name in ["full_split", *ests]}
    for i, r in enumerate(recipes):
        live_before = item_table.live_seconds if item_table else 0.0
        merge_s = merger.apply(r).seconds
        if not use_cache:
            started = time.perf_counter()
            exact.append({o: float(v) for o, v in full().items()})
            secs["full_split"] += merge_s + time.perf_counter() - started + (item_table.live_seconds - live_before if item_table else 0.0)
        for name, est in ests.items():
            served_before = item_table.items_served if item_table else 0
            started = time.perf_counter()
            sc = est()
            secs[name] += merge_s + time.perf_counter() - started
            if item_table:  # replayed: add what scoring the items it asked for costs live
                secs[name] += (item_table.items_served - served_before) * item_table.seconds_per_item
            out[name].append(sc)
            if name in archives:
                archives[name].append(Record(i, "search", str(i), [0.0], {}, dict(sc), [1 - sc[o] for o in objectives], stderr=sc.stderr, fidelity=sc.fidelity))
        print(f"candidate {i + 1}/{len(recipes)}: exact {exact[i]}", flush=True)
        # written after every candidate, so an interrupted run leaves its rows so far
        write_results(args, summarise(exact[: i + 1], [dict(r) for r in refs], out, secs, i + 1, cached["seconds_per_candidate"] if use_cache else None,
                                      n_docs, tasks, objectives, extra, archives))
    if not use_cache:
        cache.write_text(json.dumps({"key": cache_key, "seconds_per_candidate": secs["full_split"] / len(recipes), "exact": exact}) + "\n")
    tmp.cleanup()


def summarise(exact, ref_exact, out, secs, n_done, cached_full_s, n_docs, tasks, objectives, extra, archives) -> dict[str, dict]:
    full_s = cached_full_s if cached_full_s is not None else secs["full_split"] / n_done
    results: dict[str, dict] = {"full_split": {"items": sum(n_docs[t.task] for t in tasks) / len(tasks), "mae": 0.0,
                                               "seconds_per_candidate": full_s, "candidates": n_done}}
    # the exact front of what the promoter's archive holds: the references (scored exactly first) and
    # the held-out candidates; recall = the share of its held-out candidates scored on the full split
    pool = [*exact, *ref_exact]
    exact_front = {int(i) for i in nondominated(np.array([[1 - e[o] for o in objectives] for e in pool])) if int(i) < len(exact)}
    top = {o: n_docs[t.task] for o, t in zip(objectives, tasks)}
    for name, est in out.items():
        row = {"items": float(np.mean([np.mean([e.fidelity[o] for o in objectives]) for e in est])), "mae": mae(est, exact, objectives),
               "seconds_per_candidate": secs[name] / n_done, **extra.get(name, {})}
        if name == "irt_anchors":
            row["mean_reported_stderr"] = float(np.mean([e.stderr[o] for e in est for o in objectives]))
        if name in archives:
            row["front_recall"] = float(np.mean([all(est[i].fidelity[o] >= top[o] for o in objectives) for i in exact_front])) if exact_front else None
            row["exact_front_size"] = len(exact_front)
            row["full_split_share"] = float(np.mean([all(e.fidelity[o] >= top[o] for o in objectives) for e in est]))
        results[name] = row
    for v in results.values():  # cost relative to the full split: ratios survive a loaded machine, seconds do not
        v["relative_cost"] = v["seconds_per_candidate"] / full_s if full_s else None
        for key in ("mae", "seconds_per_candidate", "items", "calibration_seconds", "mean_reported_stderr", "relative_cost"):
            if key in v:
                v[key] = round(float(v[key]), 4)
    return results


def write_results(args, results: dict[str, dict]) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.setting] = {**data.get(args.setting, {}), **results} if args.only else results
    out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
