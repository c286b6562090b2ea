"""Run outputs: Pareto front (CSV/JSON), plots, best/knee recipes (evomerge + mergekit YAML)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.dfs.path import LayerPath, candidate_from_dict, pool_paths
from evomerge.search.archive import Archive, Record
from evomerge.search.confirm import SEARCH_SCORES, FinalFront
from evomerge.search.pareto import hypervolume, knee_point, nondominated

log = logging.getLogger(__name__)


def front(records: Sequence[Record]) -> list[Record]:
    ok = [r for r in records if r.error is None]
    if not ok:
        return []
    return [ok[i] for i in nondominated(np.array([r.losses for r in ok]))]


def separable_from_neighbours(pareto: Sequence[Record], objectives: Sequence[str], k: float = 2.0) -> list[bool]:
    """For front points in order along the first objective: False where a neighbour on
    the front lies within ``k`` combined standard errors in every objective (the two are
    not told apart by the evaluation). Records without standard errors count as exact."""
    def close(a: Record, b: Record) -> bool:
        return all(
            abs(a.scores[o] - b.scores[o]) <= k * float(np.hypot(a.stderr.get(o, 0.0), b.stderr.get(o, 0.0)))
            for o in objectives
        )

    out = []
    for i, r in enumerate(pareto):
        neighbours = [pareto[j] for j in (i - 1, i + 1) if 0 <= j < len(pareto)]
        out.append(not any(close(r, n) for n in neighbours))
    return out


def final_records(archive: Archive, final: FinalFront | None) -> list[Record]:
    """The final front's records, each carrying the scores (and errors) it was chosen on,
    ordered along the losses; without ``final``, the front of the search scores."""
    if final is None:
        return sorted(front(archive.search_records()), key=lambda r: r.losses)
    by_id = {r.id: r for r in archive.records}
    out = []
    for i in final.ids:
        r, chosen_on = by_id[i], final.scores.get(i) or {}  # objective -> score, in the objectives' order
        losses = [1.0 - v for v in chosen_on.values()] if chosen_on else r.losses
        out.append(dataclasses.replace(r, scores={**r.scores, **chosen_on}, stderr={**r.stderr, **final.stderr.get(i, {})}, losses=losses))
    return sorted(out, key=lambda r: r.losses)


def write_front(run_dir: Path, objectives: Sequence[str], archive: Archive, ref_point: np.ndarray, final: FinalFront | None = None) -> dict[str, Any]:
    """pareto_front.csv/json of the final front: its scores are those it was chosen on (the
    confirmation's fresh items, or the search's scores), next to the search scores."""
    search = archive.search_records()
    pareto = final_records(archive, final)
    raw = {r.id: r for r in archive.records}
    estimate = final.estimate if final is not None else SEARCH_SCORES
    extras = sorted({k for r in archive.records for k in r.scores} - set(objectives))
    with (run_dir / "pareto_front.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *objectives, *extras, "methods", "chosen_by", *(f"search_{o}" for o in objectives)])
        for r in pareto:
            methods = sorted({g["method"] for g in r.recipe.get("groups") or []}) or [str(r.recipe.get("kind", ""))]
            w.writerow([r.id, *(r.scores[o] for o in objectives), *(r.scores.get(e, "") for e in extras), "+".join(methods), estimate,
                        *(raw[r.id].scores[o] for o in objectives)])
    F = np.array([[1.0 - r.scores[o] for o in objectives] for r in pareto]) if pareto else np.zeros((0, len(objectives)))
    separable = separable_from_neighbours(pareto, objectives)
    summary: dict[str, Any] = {
        "objectives": list(objectives),
        "ref_point_losses": ref_point.tolist(),
        "hypervolume": hypervolume(F, ref_point),
        "n_evaluated": len(search),
        "n_failed": sum(r.error is not None for r in search),
        # scores: those the point was chosen on (chosen_by); search_scores: the search's subset
        "front": [{"id": r.id, "scores": {o: r.scores[o] for o in r.scores}, "search_scores": raw[r.id].scores, "chosen_by": estimate} for r in pareto],
        # standard errors, items per score, and whether a front neighbour is within 2 SE
        "front_uncertainty": [
            {"id": r.id, "stderr": r.stderr, "fidelity": r.fidelity, "separable": sep} for r, sep in zip(pareto, separable)
        ],
        "references": {r.label: r.scores for r in archive.records if r.kind == "reference"},
        "final_front": {
            "estimate": estimate,
            "note": final.note if final is not None else "",
            "items": final.items if final is not None else {},
            "candidates": final.candidates if final is not None else [],
            # the front of the search's own scores, for the before/after comparison
            "search_front": [r.id for r in sorted(front(search), key=lambda r: r.losses)],
        },
    }
    (run_dir / "pareto_front.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_recipes(run_dir: Path, objectives: Sequence[str], archive: Archive, base: str, experts: dict[str, str],
                  final: FinalFront | None = None, dtype: str = "float32") -> dict[str, int]:
    """best_<objective>.yaml and knee.yaml of the final front (+ .mergekit.yaml where mergekit
    can express it, merged in ``dtype``: the pool's), chosen on the scores the front was chosen on."""
    out = run_dir / "recipes"
    out.mkdir(exist_ok=True)
    pareto = final_records(archive, final)
    estimate = final.estimate if final is not None else SEARCH_SCORES
    chosen: dict[str, int] = {}
    if not pareto:
        return chosen
    for i, o in enumerate(objectives):
        chosen[f"best_{o}"] = min(pareto, key=lambda r: (r.losses[i], sum(r.losses))).id
    chosen["knee"] = pareto[knee_point(np.array([r.losses for r in pareto]))].id
    by_id = {r.id: r for r in archive.records}
    for name, rid in chosen.items():
        recipe = candidate_from_dict(by_id[rid].recipe)  # a Recipe, or a LayerPath (evomerge/dfs)
        recipe.base, recipe.experts = base, list(experts)
        chosen_on = next(r for r in pareto if r.id == rid)
        recipe.metadata = {"archive_id": rid, "scores": chosen_on.scores, "search_scores": by_id[rid].scores, "chosen_by": estimate}
        recipe.save(out / f"{name}.yaml")
        try:
            if isinstance(recipe, LayerPath):
                text = recipe.to_mergekit_yaml(pool_paths(base, experts))
            else:
                text = recipe.to_mergekit_yaml(base=base, experts=list(experts.values()), dtype=dtype)
            (out / f"{name}.mergekit.yaml").write_text(text)
        except EvomergeError as exc:
            (out / f"{name}.mergekit.txt").write_text(f"not exported: {exc}\n")
    return chosen


def plot_run(run_dir: Path, objectives: Sequence[str], archive: Archive, history: list[dict[str, Any]], extra_fronts: dict[str, list[Record]] | None = None) -> list[Path]:
    """front.png (every objective pair) and progress.png (HV and best-so-far)."""
    from evomerge.plotting import pyplot

    plt = pyplot()

    written = []
    search = [r for r in archive.search_records() if r.error is None]
    refs = [r for r in archive.records if r.kind == "reference" and r.error is None]
    pareto = front(search)
    pairs = list(itertools.combinations(range(len(objectives)), 2)) or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.8), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        xi, yj = objectives[i], objectives[j]
        ax.scatter([r.scores[xi] for r in search], [r.scores[yj] for r in search], s=12, c="lightgray", label="evaluated")
        ordered = sorted(pareto, key=lambda r: (r.scores[xi], r.scores[yj]))
        if ordered:
            # a line joins a front only in the 2-objective case; with more, a pair's view of
            # the front is a scatter (a line through it zigzags between unrelated points)
            ax.plot([r.scores[xi] for r in ordered], [r.scores[yj] for r in ordered], "o-" if len(objectives) == 2 else "o",
                    c="tab:blue", ms=5, label="Pareto front (all objectives)")
            ax.errorbar(
                [r.scores[xi] for r in ordered], [r.scores[yj] for r in ordered],
                xerr=[r.stderr.get(xi, 0.0) for r in ordered], yerr=[r.stderr.get(yj, 0.0) for r in ordered],
                fmt="none", ecolor="tab:blue", alpha=0.5, lw=1, capsize=2,
            )
            blurred = [r for r, sep in zip(pareto, separable_from_neighbours(pareto, objectives)) if not sep]
            if blurred:
                ax.scatter([r.scores[xi] for r in blurred], [r.scores[yj] for r in blurred], s=70, facecolors="none",
                           edgecolors="tab:red", zorder=6, label="within 2 SE of a front neighbour")
        for name, recs in (extra_fronts or {}).items():
            p2 = sorted((r.scores[xi], r.scores[yj]) for r in front(recs))
            if p2:
                ax.plot(*zip(*p2), "s--", ms=4, label=name)
        for r in refs:
            ax.scatter(r.scores[xi], r.scores[yj], marker="*", s=160, zorder=5, label=r.label)
        ax.set_xlabel(f"{xi} (higher is better)")
        ax.set_ylabel(f"{yj} (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")  # scores rise up and right: the front is away from it ("best" warns it is slow)
    fig.suptitle(f"{run_dir.name}: {len(search)} candidates")
    fig.tight_layout()
    fig.savefig(run_dir / "front.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "front.png")

    if history:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        n = [h["n_evals"] for h in history]
        a1.plot(n, [h["hypervolume"] for h in history], "o-")
        a1.set_xlabel("evaluations")
        a1.set_ylabel("hypervolume of archive front")
        a1.grid(alpha=0.3)
        for o in objectives:
            a2.plot(n, [h["best"][o] for h in history], "o-", label=f"best {o}")
        for r in refs:
            for o in objectives:
                a2.axhline(r.scores[o], ls=":", lw=0.8, c="gray")
        a2.set_xlabel("evaluations")
        a2.set_ylabel("best so far (dotted: base/experts)")
        a2.legend(fontsize=8, loc="lower right")  # best-so-far rises: its start is low left
        a2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "progress.png", dpi=110)
        plt.close(fig)
        written.append(run_dir / "progress.png")
    return written
