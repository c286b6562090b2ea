"""Budget-matched benchmark: does the default search beat the merges a user makes by hand?

The protocol (fixed before looking at results; see PROTOCOL.md next to this file):

- settings: ``toy`` (the embedded toy zoo) and ``smollm2`` (SmolLM2-135M-Instruct with
  LoRA experts, ``experiments/smollm2/prepare.py``); objectives = the experts' skills,
  scored on a fixed validation subset whose seed is the run's seed;
- searches at each budget: ``default`` (the default config: algorithm, genome, warm start),
  ``grid_ta`` (the largest full grid of model-wise task-arithmetic weights within the
  budget), ``ties_default`` (one TIES merge with the usual settings), ``random`` (uniform
  random genomes of the default genome, no warm start);
- every run evaluates the base and the experts (they are free: every user has them), so
  every front includes them;
- ``val_hv``: hypervolume of the validation front (reference point: score 0);
  ``test_hv``: hypervolume of the *same points* re-scored on the full held-out test split.

    python experiments/benchmark/run_benchmark.py                       # everything
    python experiments/benchmark/run_benchmark.py --settings toy --seeds 0
    python experiments/benchmark/run_benchmark.py --report-only         # tables + plot

Runs go to ``runs/benchmark/<setting>/<search>/<budget>/seed-<s>``; a killed benchmark
continues where it stopped (finished runs are skipped, unfinished ones resumed). Results:
``results.json`` (shape ``{setting: {search: {budget: [{seed, val_hv, test_hv, evals}]}}}``),
``results.md`` and ``results.png`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import run_evomerge  # noqa: E402

HERE = Path(__file__).resolve().parent
SEARCHES: dict[str, list[str]] = {
    "default": [],
    # layer_groups=1 explicitly: a preset (e.g. smollm2) may set its own layer_groups
    "grid_ta": ["algorithm=grid", "genome=modelwise_ta", "genome.layer_groups=1", "search.seed_with_references=false"],
    "ties_default": ["algorithm=hand_made", "genome=modelwise_ties", "genome.layer_groups=1", "search.seed_with_references=false"],
    "random": ["algorithm=random", "search.seed_with_references=false"],
    # model-based searches (issue 26, declared in PROTOCOL.md before any of their runs): a
    # batch of 4 per round, so the budget holds several rounds of the model after the design
    "bo": ["algorithm=bo", "genome=modelwise_ta", "genome.layer_groups=1", "algorithm.pop_size=4", "algorithm.n_init=4"],
    "bo_blocks": ["algorithm=bo", "genome=blocks_ta", "algorithm.pop_size=4", "algorithm.n_init=8"],
    "map": ["algorithm=map", "genome=modelwise_ta", "genome.layer_groups=1", "algorithm.pop_size=4"],
    # the default before 2026-12-05 (NSGA-II over the mixed-method layer-wise genome); a
    # setting may add its own keys (SETTINGS[...]["search_overrides"]: what its preset used to set)
    "nsga2": ["algorithm=nsga2", "genome=layerwise_mixed"],
    # issue 34 (declared in PROTOCOL.md before any run): the anchors' own searches, and a
    # model-wise task-arithmetic baseline that spends the whole budget
    # Sakana / mergekit-evolve: CMA-ES (sigma 1/6, x0 = 0.5, default population) over layer-wise
    # DARE-TIES weights and densities, one objective (the mean), no warm start
    "sakana_cmaes": ["algorithm=cmaes", "genome=layerwise_dare_ties", "genome.layer_groups=4", "genome.split_attn_mlp=false",
                     "genome.separate_embed_head=false", "search.seed_with_references=false"],
    # Mergenetic: NSGA-II over model-wise TIES weights and densities, no warm start
    "mergenetic_nsga2": ["algorithm=nsga2", "genome=modelwise_ties", "genome.layer_groups=1", "search.seed_with_references=false"],
    # Sobol points over the grid's own weights: every evaluation of the budget spent
    "sobol_ta": ["algorithm=sobol", "genome=modelwise_ta", "genome.layer_groups=1", "search.seed_with_references=false"],
    # the k3 presets' search until 2026-12-07 (NSGA-III over the layer-wise mixed genome); since
    # then the k3 presets run bo_blocks's configuration (PROTOCOL.md, rule for the k3 presets)
    "nsga3_k3": ["algorithm=nsga3_k3", "genome=layerwise_mixed_k3"],
}
# Levers: run only when named with --searches; reported next to the protocol's searches.
LEVERS: dict[str, list[str]] = {
    # the default search with multi-fidelity fitness: candidates that could enter the front are
    # re-scored on up to the full validation split, so the front is chosen on less noisy scores
    "default_mf": ["fitness/estimator=multifidelity"],
    # NSGA-II (the default until 2026-12-05) and warm start in the grid's own space (2 task-arithmetic weights):
    # does an adaptive search beat a grid where the grid is strongest?
    "modelwise_nsga": ["algorithm=nsga2", "genome=modelwise_ta", "genome.layer_groups=1"],
    # issue 36 (PROTOCOL.md, 2026-12-07): the next BO round proposed in a worker while a batch is
    # scored, with L-BFGS stopped at 1e-6; and the tolerance alone. Both lost at toy 48: options
    "bo_overlap": ["algorithm.overlap=true", "algorithm.ftol=1e-6"],
    "ftol_only": ["algorithm.overlap=false", "algorithm.ftol=1e-6"],
    # issues 34/36 (PROTOCOL.md, 2026-12-07): the noisy-front integral keeps at most 64 told points,
    # so a round's cost stops growing with the budget's front-relevant points
    "bo_capped": ["algorithm.max_baseline=64"],
    # issues 34/36 (PROTOCOL.md, 2026-12-07 evening): analytic EHVI on a lean GP posterior, batches by
    # the kriging believer, hyperparameters refitted when the data grew by a quarter
    "bo_ehvi": ["algorithm.acquisition=ehvi"],
    # the same, the gain measured on the posterior mean's update (noise-aware): PROTOCOL.md, declared after bo_ehvi's check
    "bo_ehvi_update": ["algorithm.acquisition=ehvi_update"],
}
SETTINGS: dict[str, dict[str, Any]] = {
    # the stretch objective only on the test re-score (PROTOCOL.md 2026-12-07: a cost cut, no measure changes)
    "toy": {"overrides": ["fitness.extra_in_search=false"], "budgets": [48, 144, 480]},
    # the stretch objective (target) is scored on the test re-score only: a third less time per candidate
    # fitness.extra=[] since 2026-12-08 (PROTOCOL.md): the stretch objective is in no measure, and
    # its test re-score was a third of a run's time
    "smollm2": {"overrides": ["+experiment=smollm2", "fitness.extra=[]"], "budgets": [24, 48],
                # what the smollm2 preset set for NSGA-II before 2026-12-05
                "search_overrides": {"nsga2": ["genome.layer_groups=3", "algorithm.pop_size=12"], "modelwise_nsga": ["algorithm.pop_size=12"]}},
    # three experts, three objectives (issue 23): where a hand-made grid thins out
    "toy_k3": {"overrides": ["+experiment=toy_k3", "fitness.extra_in_search=false"], "budgets": [48, 96, 192]},
    # no stretch objective: its test re-scores are a quarter of the setting's time (PROTOCOL.md, 2026-12-05)
    # test_rescore_searched=false: the PROTOCOL amendment of 2026-12-05 (a cost cut, no measure changes)
    "smollm2_k3": {"overrides": ["+experiment=smollm2_k3", "fitness.extra=[]", "fitness.test_rescore_searched=false"], "budgets": [48, 96],
                   "search_overrides": {"nsga3_k3": ["genome.layer_groups=3"]}},
}
SEEDS = [0, 1, 2, 3, 4]
# Anytime searches: nothing in them depends on the budget, so the run at a larger budget
# continues a copy of the finished smaller-budget run (``resume=`` with a larger
# ``search.max_evals``) instead of repeating its evaluations. Checked on the toy zoo: the
# fresh budget-48 archives of both are exact prefixes of the fresh budget-144 ones.
EXTENDABLE = {"default", "bo_overlap", "ftol_only", "bo_capped", "bo_ehvi", "bo_ehvi_update", "nsga3_k3", "random", "default_mf", "modelwise_nsga", "bo", "bo_blocks", "map", "nsga2", "sakana_cmaes", "mergenetic_nsga2", "sobol_ta"}
# the searches each setting runs by default (the 2026-12 protocol: random and ties_default
# are left out on smollm2 to buy the five seeds; see PROTOCOL.md). Since 2026-12-05 the
# default search of toy and smollm2 is bo_blocks's configuration, and nsga2 the former default;
# on toy, bo_blocks is left out (the same runs as default)
# issue 34's table (PROTOCOL.md, 2026-12-07): the default, the grid, the anchors' searches and
# sobol_ta in every setting; bo_blocks next to the k3 presets (the candidate k3 default)
ANCHORS = ["sakana_cmaes", "mergenetic_nsga2", "map", "sobol_ta"]
DEFAULT_SEARCHES = {
    "toy": ["default", "grid_ta", *ANCHORS],
    "smollm2": ["default", "grid_ta", *ANCHORS],
    "toy_k3": ["default", "grid_ta", "nsga3_k3", *ANCHORS],
    "smollm2_k3": ["default", "grid_ta", "nsga3_k3", *ANCHORS],
}


def run_dir(root: Path, setting: str, search: str, budget: int, seed: int) -> Path:
    return root / setting / search / str(budget) / f"seed-{seed}"


def extension_base(root: Path, setting: str, search: str, budget: int, seed: int, budgets: set[int]) -> Path | None:
    """The run an anytime search at ``budget`` continues: the finished run of the largest smaller
    budget (runs of this invocation's smaller budgets are made first; ``--budgets 480`` alone
    still extends a finished 144 run); None when there is none (the run starts from scratch)."""
    for smaller in sorted((b for b in budgets if b < budget), reverse=True):
        if (run_dir(root, setting, search, smaller, seed) / "summary.json").is_file():
            return run_dir(root, setting, search, smaller, seed)
    return None


def run_one(root: Path, setting: str, search: str, budget: int, seed: int, extra: list[str], smaller: Path | None = None) -> Path:
    """Run (or resume, or skip when finished) one search; returns its run directory.
    ``smaller``: a finished run of the same anytime search at a smaller budget to extend."""
    target = run_dir(root, setting, search, budget, seed)
    if (target / "summary.json").is_file():
        return target
    on_resume = [o for o in extra if o.lstrip("+").startswith("executor")]  # chosen per invocation: kept on resume
    # the setting's re-score choice reaches runs started before it was made (a key safe on resume)
    on_resume += [o for o in SETTINGS[setting]["overrides"] if o.startswith("fitness.test_rescore_searched=")]
    if smaller is not None and (smaller / "summary.json").is_file() and not target.exists():
        shutil.copytree(smaller, target, ignore=shutil.ignore_patterns("run.lock", "summary.json", "report.html"))
        args = [f"resume={target}", f"search.max_evals={budget}", *on_resume]
    elif (target / "config.yaml").is_file():
        # the budget again: an interrupted extension's config may still hold the smaller one
        args = [f"resume={target}", f"search.max_evals={budget}", *on_resume]
    else:
        args = [
            *SETTINGS[setting]["overrides"],
            *SEARCHES[search],
            *SETTINGS[setting].get("search_overrides", {}).get(search, []),
            f"seed={seed}",
            f"fitness.subset_seed={seed}",
            f"search.max_evals={budget}",
            "fitness.test_rescore=front",
            "search.progress=false",
            "report.html=false",  # presentation only: the benchmark reads summary.json
            f"hydra.run.dir={target}",
            *extra,
        ]
    return run_evomerge(args, target, "benchmark")


def hv(points: np.ndarray) -> float:
    from evomerge.search.pareto import hypervolume

    return hypervolume(1.0 - points, np.ones(points.shape[1])) if len(points) else 0.0


def front_hvs(summary: dict[str, Any], ids: list[int], scores_of: dict[int, dict[str, float]], target: Path) -> tuple[float, float]:
    """(validation HV, test HV) of the points ``ids`` plus the base and experts; validation
    scores from ``scores_of`` (id -> scores), test scores from the run's re-score."""
    objectives, test = summary["objectives"], summary.get("test", {})
    val_points, test_points = [], []
    for name in [f"front:{i}" for i in ids] + sorted(summary["references"]):
        if name not in test:
            raise SystemExit(f"[benchmark] {target}: {name} was not re-scored on the test split")
        val = summary["references"][name] if name in summary["references"] else scores_of[int(name.split(":")[1])]
        val_points.append([val[o] for o in objectives])
        test_points.append([test[name]["scores"][o] for o in objectives])
    return round(hv(np.array(val_points)), 6), round(hv(np.array(test_points)), 6)


def search_label(target: Path) -> str:
    """The run's search by its full configuration (what `default` meant at that version)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(target / "config.yaml")
    algo = str(OmegaConf.select(cfg, "algorithm._target_") or "?").rsplit(".", 1)[-1]
    genome = OmegaConf.select(cfg, "genome") or {}
    methods = "+".join(genome.get("methods") or [])
    blocks = OmegaConf.select(cfg, "resolved_blocks.n_blocks")
    layout = f"{blocks} adaptive blocks" if blocks else f"{genome.get('layer_groups', 1)} layer groups"
    pop = OmegaConf.select(cfg, "algorithm.pop_size")
    warm = "warm start" if OmegaConf.select(cfg, "search.seed_with_references") else "no warm start"
    final = OmegaConf.select(cfg, "fitness.final_front") or "search_scores"
    population = f"pop {pop}" if pop is not None else "its default population"
    # bo's round timing (issue 36): rounds proposed while the previous batch is scored, L-BFGS tolerance
    rounds = ", overlapped rounds" if OmegaConf.select(cfg, "algorithm.overlap") is True else ""
    ftol = OmegaConf.select(cfg, "algorithm.ftol")
    rounds += f", ftol {ftol:g}" if isinstance(ftol, (int, float)) and ftol > 0 else ""
    cap = OmegaConf.select(cfg, "algorithm.max_baseline")
    rounds += f", baseline <= {cap}" if isinstance(cap, int) else ""
    acquisition = OmegaConf.select(cfg, "algorithm.acquisition")
    rounds += f", {acquisition}" if acquisition not in (None, "qlognehvi") and str(algo) == "bo" else ""
    return f"{algo} ({population}{rounds}) over {methods}, {layout}, {warm}, final front: {final}"


def measure(target: Path) -> dict[str, Any]:
    """val/test hypervolume of the run's final front plus the base and experts; the same for
    the front of the search's own scores (before the final front's confirmation)."""
    summary = json.loads((target / "summary.json").read_text())
    objectives = summary["objectives"]
    test = summary.get("test", {})
    final_ids = [p["id"] for p in summary["front"]]
    val_hv, test_hv = front_hvs(summary, final_ids, {p["id"]: p["scores"] for p in summary["front"]}, target)
    search_front = (summary.get("final_front") or {}).get("search_front", final_ids)
    search_scores = {p["id"]: p.get("search_scores", p["scores"]) for p in summary["front"]}
    if any(i not in search_scores for i in search_front):
        from evomerge.search.archive import Archive

        search_scores.update({r.id: r.scores for r in Archive(target / "archive.jsonl").records if r.id in search_front})
    search_val_hv, search_test_hv = front_hvs(summary, search_front, search_scores, target)
    extras = sorted({k for t in test.values() for k in t["scores"]} - set(objectives))
    env = json.loads((target / "environment.json").read_text()) if (target / "environment.json").is_file() else {}
    return {
        "val_hv": val_hv,
        "test_hv": test_hv,
        # the front of the search's own (noisy) scores: before the final-front step
        "search_val_hv": search_val_hv,
        "search_test_hv": search_test_hv,
        "chosen_by": (summary.get("final_front") or {}).get("estimate", "search scores"),
        "pool_digest": ((env.get("models") or {}).get("pool_digest") or "")[:12] or None,
        "config": search_label(target),
        "evals": int(summary["n_evaluated"]),
        "front_size": len(summary["front"]),
        # the stretch objective(s): best test score of any front point, e.g. the target task
        **{f"best_test_{e}": max(t["scores"].get(e, 0.0) for n, t in test.items() if n.startswith("front:") or n in summary["references"]) for e in extras},
        "seconds": round(float(summary.get("mean_merge_s", 0) + summary.get("mean_eval_s", 0)) * int(summary["n_evaluated"]), 1),
        "items_per_candidate": items_per_candidate(target, objectives),
        # the search's own cost (issue 36): seconds the loop waited for proposals, next to the
        # candidates' merge and evaluation seconds, and the round size they were proposed in
        "time_s": summary.get("time_s"),
        "pop_size": _pop_size(target),
    }


def _pop_size(target: Path) -> int | None:
    from omegaconf import OmegaConf

    pop = OmegaConf.select(OmegaConf.load(target / "config.yaml"), "algorithm.pop_size")
    return int(pop) if isinstance(pop, int) else None


def items_per_candidate(target: Path, objectives: list[str]) -> float | None:
    """Mean validation items a search candidate was scored on, per objective (the cost of
    multi-fidelity promotions; a fixed subset gives its size)."""
    from evomerge.search.archive import Archive

    records = [r for r in Archive(target / "archive.jsonl").search_records() if r.error is None and r.fidelity]
    if not records:
        return None
    return round(float(np.mean([np.mean([r.fidelity.get(o, 0) for o in objectives]) for r in records])), 2)


def collect(root: Path, settings: list[str], searches: list[str], budgets: dict[str, list[int]], seeds: list[int], results: dict) -> dict:
    for setting in settings:
        for search in searches:
            for budget in budgets[setting]:
                rows = []
                for seed in seeds:
                    target = run_dir(root, setting, search, budget, seed)
                    if (target / "summary.json").is_file():
                        rows.append({"seed": seed, **measure(target)})
                if rows:
                    results.setdefault(setting, {}).setdefault(search, {})[str(budget)] = rows
                elif (root / setting / search / str(budget)).is_dir():
                    # runs of this search are here but none finished (e.g. a search renamed and rerun):
                    # an earlier report's rows for it are stale, not kept
                    results.get(setting, {}).get(search, {}).pop(str(budget), None)
    return results


def paired_differences(rows: list[dict], grid: list[dict], key: str = "test_hv", n_boot: int = 10_000) -> dict[str, Any] | None:
    """Mean of (search - grid) over the seeds both have (same seed = same validation subset)
    and its percentile bootstrap 95% interval over seeds."""
    by_seed = {r["seed"]: r[key] for r in grid}
    diffs = np.array([r[key] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed])
    if not len(diffs):
        return None
    rng = np.random.default_rng(0)
    boot = rng.choice(diffs, size=(n_boot, len(diffs)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(diffs.mean()), "ci95": [float(lo), float(hi)], "n": int(len(diffs)), "wins": int((diffs > 0).sum())}


def _cell(rows: list[dict], key: str) -> str:
    vals = np.array([r[key] for r in rows if r.get(key) is not None])
    return f"{vals.mean():.4f} ± {vals.std():.4f} (n={len(vals)})" if len(vals) else "–"


def _diff_cell(d: dict | None) -> str:
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] ({d['wins']}/{d['n']})" if d else "–"


def paired_within(rows: list[dict], key_a: str, key_b: str) -> dict[str, Any] | None:
    """Paired difference of two measures of the same runs (e.g. final front vs search front)."""
    both = [r for r in rows if r.get(key_a) is not None and r.get(key_b) is not None]
    return paired_differences([{"seed": r["seed"], "x": r[key_a]} for r in both], [{"seed": r["seed"], "x": r[key_b]} for r in both], key="x")


def decision(by_search: dict, budgets: list[int], baselines: list[str]) -> list[str]:
    """The issue-34 rule: the default's mean test HV >= the grid's and every anchor's in every
    budget, and non-decreasing in budget."""
    default = by_search.get("default", {})
    lines, failing = [], []
    means = {}
    for b in budgets:
        rows = default.get(str(b), [])
        if not rows:
            continue
        means[b] = float(np.mean([r["test_hv"] for r in rows]))
        for other in baselines:
            orow = by_search.get(other, {}).get(str(b), [])
            if orow and float(np.mean([r["test_hv"] for r in orow])) > means[b]:
                failing.append(f"budget {b}: behind {other}")
    ordered = [means[b] for b in budgets if b in means]
    if any(later < earlier for earlier, later in zip(ordered, ordered[1:])):
        failing.append("mean test HV falls as the budget grows (" + " -> ".join(f"{m:.4f}" for m in ordered) + ")")
    if means:
        run = [b for b in baselines if by_search.get(b)]
        missing = [b for b in baselines if not by_search.get(b)]
        scope = f" (against {', '.join(run) or 'no baseline'}" + (f"; not run here: {', '.join(missing)}" if missing else "") + ")"
        lines.append("Decision rule (PROTOCOL.md, issue 34)" + scope + ": " + ("met in every budget run so far." if not failing else "NOT met: " + "; ".join(failing) + "."))
    return lines


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Benchmark results (generated by run_benchmark.py; do not edit)",
        "",
        "Hypervolume (reference: score 0 per objective) of each search's final front plus the base and experts:",
        "`val` on the validation items the front was chosen on, `test` the same points re-scored on the full held-out test split.",
        "Mean ± std over seeds (n = number of seeds). Each setting names the pool digest its runs were measured on.",
        "",
    ]
    for setting, by_search in results.items():
        budgets = sorted({int(b) for s in by_search.values() for b in s})
        digests = sorted({r.get("pool_digest") or "not recorded" for s in by_search.values() for rows in s.values() for r in rows})
        lines += [f"## {setting}", "", f"Pool digest(s): {', '.join(f'`{d}`' for d in digests)}.", ""]
        labels = {search: sorted({r.get("config") for rows in by.values() for r in rows if r.get("config")}) for search, by in by_search.items()}
        if any(labels.values()):
            lines += ["| search | configuration (from its runs' config.yaml) |", "|---|---|"]
            lines += [f"| {search} | {'; '.join(label) or 'not recorded'} |" for search, label in labels.items()]
            lines.append("")
        lines += ["| search | " + " | ".join(f"budget {b}: val HV | budget {b}: test HV" for b in budgets) + " |"]
        lines.append("|---|" + "---|---|" * len(budgets))
        for search, by_budget in by_search.items():
            cells = []
            for b in budgets:
                rows = by_budget.get(str(b), [])
                cells += [_cell(rows, "val_hv"), _cell(rows, "test_hv")]
            lines.append(f"| {search} | " + " | ".join(cells) + " |")
        lines.append("")
        grid = by_search.get("grid_ta")
        if grid:
            lines += [
                "Paired difference to `grid_ta` in test HV (same seed = same validation subset): mean [bootstrap 95% interval], seeds ahead of the grid / seeds.",
                "",
                "| search | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for search, by_budget in by_search.items():
                if search == "grid_ta":
                    continue
                lines.append(f"| {search} | " + " | ".join(_diff_cell(paired_differences(by_budget.get(str(b), []), grid.get(str(b), []))) for b in budgets) + " |")
            lines.append("")
        default = by_search.get("default")
        others = [s for s in by_search if s not in ("default", "grid_ta")]
        if default and others:
            lines += [
                "Paired difference `default` minus each other search in test HV: mean [bootstrap 95% interval], seeds the default is ahead / seeds.",
                "",
                "| default minus | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets),
            ]
            for search in others:
                lines.append(f"| {search} | " + " | ".join(_diff_cell(paired_differences(default.get(str(b), []), by_search[search].get(str(b), []))) for b in budgets) + " |")
            lines.append("")
        if any(r.get("search_test_hv") is not None for s in by_search.values() for rows in s.values() for r in rows):
            lines += table_head(
                ["Winner's curse: the val-test gap (val HV minus test HV, mean over seeds) of the final front and of the front of the search's own",
                 "scores, and the final front's paired gain in test HV over the search-score front (the same runs)."],
                [c for b in budgets for c in (f"budget {b}: gap final / search front", f"budget {b}: test HV final minus search front")],
            )

            def curse(rows: list[dict]) -> list[str]:
                gap = np.mean([r["val_hv"] - r["test_hv"] for r in rows])
                raw_gap = np.mean([r["search_val_hv"] - r["search_test_hv"] for r in rows])
                return [f"{gap:+.4f} / {raw_gap:+.4f}", _diff_cell(paired_within(rows, "test_hv", "search_test_hv"))]

            lines += search_rows(by_search, budgets, lambda r: r.get("search_test_hv") is not None, curse, width=2) + [""]
        lines += search_cost_table(by_search, budgets)
        if default:
            lines += decision(by_search, budgets, ["grid_ta", *ANCHORS]) + [""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "results.png")


def table_head(caption: list[str], columns: list[str]) -> list[str]:
    """A caption, a blank line and the header of a per-search table with ``columns``."""
    return [*caption, "", "| search | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]


def search_cost_table(by_search: dict, budgets: list[int]) -> list[str]:
    """The search's own cost per search and budget (rows with ``time_s``): seconds the loop
    waited for proposals per round, a candidate's seconds (merge + evaluation), and the wait's
    share of the search time (mean over seeds; the runs' own threads, see PROTOCOL.md)."""
    if not any(r.get("time_s") for s in by_search.values() for rows in s.values() for r in rows):
        return []
    lines = table_head(
        ["The search's own cost: proposal wait per round (seconds the loop waited for the next round's candidates) / seconds per candidate",
         "(merge + evaluation) / the wait's share of the search time; mean over seeds."],
        [f"budget {b}" for b in budgets],
    )

    def cost(rows: list[dict]) -> list[str]:
        per_round = np.mean([r["time_s"]["proposal_wait_s"] / max(1.0, r["evals"] / (r.get("pop_size") or 1)) for r in rows])
        per_candidate = np.mean([(r["time_s"]["merge_s"] + r["time_s"]["eval_s"]) / r["evals"] for r in rows])
        share = np.mean([r["time_s"]["proposal_wait_share"] for r in rows])
        return [f"{per_round:.2f} s / {per_candidate:.2f} s / {share:.0%}"]

    return lines + search_rows(by_search, budgets, lambda r: bool(r.get("time_s") and r.get("evals")), cost, width=1) + [""]


def search_rows(by_search: dict, budgets: list[int], keep: Callable[[dict], bool], cells: Callable[[list[dict]], list[str]], width: int) -> list[str]:
    """One table line per search: ``cells`` of each budget's rows that ``keep`` accepts
    (``width`` dashes where a budget has none)."""
    lines = []
    for search, by_budget in by_search.items():
        row: list[str] = []
        for b in budgets:
            rows = [r for r in by_budget.get(str(b), []) if keep(r)]
            row += cells(rows) if rows else ["–"] * width
        lines.append(f"| {search} | " + " | ".join(row) + " |")
    return lines


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(8.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        by_search = results[setting]
        budgets = sorted({int(b) for s in by_search.values() for b in s})
        offsets = np.linspace(-0.25, 0.25, max(len(by_search), 1))
        for i, (search, by_budget) in enumerate(by_search.items()):
            for key, marker, fill in (("test_hv", "o", None), ("val_hv", "o", "none")):
                rows = [[r[key] for r in by_budget.get(str(b), [])] for b in budgets]
                xs = [j + offsets[i] + (0.04 if key == "val_hv" else 0) for j, r in enumerate(rows) if r]
                means = [np.mean(r) for r in rows if r]
                stds = [np.std(r) for r in rows if r]
                ax.errorbar(xs, means, yerr=stds, fmt=marker, mfc=fill, color=f"C{i}", capsize=3,
                            label=f"{search} ({'test' if key == 'test_hv' else 'validation'})")
        ax.set_xticks(range(len(budgets)), [f"budget {b}" for b in budgets])
        ax.set_xlim(-0.5, len(budgets) - 0.5)
        ax.set_ylabel("hypervolume, mean ± std over seeds")
        ax.set_title(f"{setting}: filled = held-out test, hollow = validation")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--searches", nargs="+", default=None, help="default: per setting, " + "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_SEARCHES.items()))
    ap.add_argument(
        "--define", action="append", default=[], metavar="NAME=OVERRIDES",
        help="an extra search for lever studies, overrides separated by ';' (e.g. 'nolist=search.seed_with_references=false')",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    ap.add_argument("--budgets", nargs="+", type=int, default=None, help="override every setting's budgets")
    ap.add_argument("--root", type=Path, default=Path("runs/benchmark"))
    ap.add_argument("--out", type=Path, default=HERE, help="where results.json/.md/.png go")
    ap.add_argument("--report-only", action="store_true", help="only collect finished runs into the results")
    ap.add_argument("--no-extend", action="store_true", help="run every budget of the anytime searches from scratch")
    ap.add_argument("--override", action="append", default=[], help="extra evomerge override for every new run (tests)")
    args = ap.parse_args(argv)
    budgets = {s: args.budgets or SETTINGS[s]["budgets"] for s in args.settings}
    for definition in args.define:
        name, _, overrides = definition.partition("=")
        SEARCHES[name] = [o for o in overrides.split(";") if o]
    explicit = bool(args.searches)
    args.searches = args.searches or list(dict.fromkeys(s for setting in args.settings for s in DEFAULT_SEARCHES[setting]))
    SEARCHES.update({k: v for k, v in LEVERS.items() if k in args.searches})
    unknown = sorted(set(args.searches) - set(SEARCHES))
    if unknown:
        ap.error(f"unknown search {unknown[0]!r}; known: {', '.join(dict.fromkeys([*SEARCHES, *LEVERS]))} (add one with --define)")
    if not args.report_only:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        # test re-scores shared by the runs (the base and experts, hand-made merges several searches find)
        os.environ.setdefault("EVOMERGE_SCORE_CACHE", str((args.root / "score_cache").resolve()))
        for setting in args.settings:
            for seed in args.seeds:
                for i, budget in enumerate(budgets[setting]):
                    for search in args.searches:
                        if not explicit and search not in DEFAULT_SEARCHES[setting]:
                            continue
                        smaller = None
                        if search in EXTENDABLE and not args.no_extend:
                            known = {*SETTINGS[setting]["budgets"], *budgets[setting][:i]}
                            smaller = extension_base(args.root, setting, search, budget, seed, known)
                        run_one(args.root, setting, search, budget, seed, args.override, smaller)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results = collect(args.root, args.settings, args.searches, budgets, args.seeds, results)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
    write_report(results, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
