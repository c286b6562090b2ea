"""Each merge method's best single-point merge at an equal search budget (toy zoo, SmolLM2).

Per method: random search over a model-wise genome that offers only that method
(one weight per expert, the method's shared genes, ``lambda`` searched where the method
has one), ``--budget`` evaluations, no reference genomes in the first population. The
best point is the one with the highest mean of the objectives on the validation subset;
it is then re-scored on the full test split. One seed by default (the CPU budget of this
study), so differences of a few points are within noise.

    python experiments/methods/compare.py                          # toy: runs what is missing, then reports
    python experiments/methods/compare.py --setting smollm2 --budget 12
    python experiments/methods/compare.py --budget 48 --methods task_arithmetic tsv_m

Runs go to experiments/methods/runs/<setting>/<method>-s<seed>; results.json
(``{setting: {budget, seed, objectives, methods: {method: {best_test, ...}}, references_test}}``)
and results.md are written next to this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from evomerge.search.archive import Archive

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import run_evomerge  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINES = ["task_arithmetic", "ties"]
NEW = ["task_arithmetic_trim", "breadcrumbs_ties", "della_linear", "sce", "karcher", "multislerp", "nuslerp", "tsv_m", "iso_c", "iso_cts"]
SETTINGS: dict[str, list[str]] = {
    "toy": [],
    # model-wise genome: the preset's 3 layer groups are replaced; the stretch objective is test-only
    "smollm2": ["+experiment=smollm2", "fitness.extra_in_search=false", "genome.layer_groups=1"],
}
# same budget, a lambda range fitted to the method's scale (Iso's flat spectrum shrinks the
# dominant directions, so its useful lambda lies above the default range [0.5, 1.5])
VARIANTS = {
    "iso_c (lambda 1-5)": ("iso_c", ["++genome.ranges.lambda=[1.0,5.0]"]),
    "iso_cts (lambda 1-5)": ("iso_cts", ["++genome.ranges.lambda=[1.0,5.0]"]),
}


def run(setting: str, name: str, run_dir: Path, budget: int, seed: int) -> None:
    if (run_dir / "summary.json").is_file():
        return
    if (run_dir / "config.yaml").is_file():  # interrupted earlier: continue it
        run_evomerge([f"resume={run_dir}"], run_dir, f"methods {name}")
        return
    method, extra = VARIANTS.get(name, (name, []))
    args = [
        *SETTINGS[setting], "algorithm=random", "genome=modelwise_ta", f"genome.methods=[{method}]",
        "genome.search_lambda=true", f"search.max_evals={budget}", "search.seed_with_references=false",
        "fitness.test_rescore=false", "report.plots=false", "device=cpu", f"seed={seed}", f"hydra.run.dir={run_dir}", *extra,
    ]
    run_evomerge(args, run_dir, f"methods {name}")


def best_point(run_dir: Path, budget: int, objectives: list[str]):
    records = [r for r in Archive(run_dir / "archive.jsonl").search_records()[:budget] if r.error is None]
    return max(records, key=lambda r: np.mean([r.scores[o] for o in objectives])), records


def rescore_on_test(run_dirs: dict[str, Path], best: dict[str, dict]) -> dict[str, dict]:
    """Score every method's best recipe (and the references) on the full test split, in one session."""
    from omegaconf import OmegaConf

    from evomerge.estimators.lm_eval_fitness import LmEvalFitness
    from evomerge.merge.recipe import Recipe
    from evomerge.merge.recipe import reference_recipes
    from evomerge.run import CONFIG_FILE
    from evomerge.session import fitness_tasks, open_session

    first = next(iter(run_dirs.values()))
    cfg = OmegaConf.load(first / CONFIG_FILE)
    session = open_session(cfg, first)
    tasks = fitness_tasks(cfg.fitness.objectives, "") + fitness_tasks(cfg.fitness.extra, "")
    test = LmEvalFitness(
        session.merger.model, session.merger.tokenizer, tasks, split="test", batch_size=int(cfg.fitness.batch_size),
        max_length=cfg.fitness.max_length, include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
    out = {}
    for label, recipe in reference_recipes(session.merger.n_experts, list(session.experts), session.merger.n_layers).items():
        session.merger.apply(recipe)
        out[label] = test()
    for method, rec in best.items():
        session.merger.apply(Recipe.from_dict(rec["recipe"]))
        out[method] = test()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="toy")
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=BASELINES + NEW + list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=None, help="default: experiments/methods/runs/<setting>")
    args = parser.parse_args()
    runs = args.runs or HERE / "runs" / args.setting
    run_dirs, best, rows = {}, {}, {}
    objectives: list[str] = []
    for method in args.methods:
        run_dir = runs / f"{method.replace(' ', '_').replace('(', '').replace(')', '')}-s{args.seed}"
        run(args.setting, method, run_dir, args.budget, args.seed)
        run_dirs[method] = run_dir
        summary = json.loads((run_dir / "summary.json").read_text())
        objectives = list(summary["objectives"])
        rec, records = best_point(run_dir, args.budget, objectives)
        best[method] = {"id": rec.id, "recipe": rec.recipe}
        rows[method] = {
            "n_ok": len(records),
            "best_validation": rec.scores,
            "best_params": {g["name"]: g["params"] for g in rec.recipe["groups"]},
            "mean_merge_s": summary.get("mean_merge_s"),
            "mean_eval_s": summary.get("mean_eval_s"),
            "references_validation": summary.get("references"),
        }
    test = rescore_on_test(run_dirs, best)
    for method in rows:
        rows[method]["best_test"] = test[method]
    out = HERE / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    if "methods" in results:  # the one-setting shape of earlier versions (a zoo that no longer exists)
        results = {}
    results[args.setting] = {"budget": args.budget, "seed": args.seed, "objectives": objectives, "methods": rows,
                             "references_test": {k: v for k, v in test.items() if k not in rows}}
    out.write_text(json.dumps(results, indent=2))
    write_markdown(results)
    print((HERE / "results.md").read_text())


def write_markdown(results: dict) -> None:
    lines = [
        "# Best single-point merge per method at an equal search budget",
        "",
        "Generated by `python experiments/methods/compare.py [--setting S]`. Random search over a model-wise",
        "genome offering one method; best = highest mean of the objectives on the validation subset, re-scored",
        "on the full test split. One seed: read differences of a few points as noise. Merge time is the mean",
        "per candidate in the search on a shared 2-core CPU whose load varied between runs (some ran beside other",
        "experiments): an order of magnitude, not a benchmark (that is `experiments/bench_merge.py`). Reading: docs/results.md, *Merge methods compared*.",
    ]
    for setting, res in results.items():
        objectives = res["objectives"]
        head = " | ".join(f"{o} (test)" for o in objectives)
        lines += ["", f"## {setting}: {res['budget']} evaluations per method, seed {res['seed']}", "",
                  f"| method | mean (test) | {head} | target (test) | mean (validation) | merge ms |",
                  "|---|---|" + "---|" * len(objectives) + "---|---|---|"]
        order = sorted(res["methods"].items(), key=lambda kv: -np.mean([kv[1]["best_test"][o] for o in objectives]))
        for method, row in order:
            t, v = row["best_test"], row["best_validation"]
            merge_ms = (row["mean_merge_s"] or 0) * 1e3
            cells = " | ".join(f"{t[o]:.3f}" for o in objectives)
            lines.append(f"| {method} | {np.mean([t[o] for o in objectives]):.3f} | {cells} | {t.get('target', float('nan')):.3f} "
                         f"| {np.mean([v[o] for o in objectives]):.3f} | {merge_ms:.1f} |")
        lines += ["", f"Source models ({setting}, test split):", "", f"| model | mean | {' | '.join(objectives)} | target |",
                  "|---|---|" + "---|" * len(objectives) + "---|"]
        for label, sc in res["references_test"].items():
            cells = " | ".join(f"{sc[o]:.3f}" for o in objectives)
            lines.append(f"| {label} | {np.mean([sc[o] for o in objectives]):.3f} | {cells} | {sc.get('target', float('nan')):.3f} |")
    lines += ["", "Best parameters per method are in `results.json` (`best_params`).", ""]
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
