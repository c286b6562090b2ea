"""What an exported merge carries for the Hub and for lm-eval's tools.

- ``README.md``: a model card in the Hub's format: YAML front matter (``base_model``,
  ``library_name: transformers``, ``tags: [merge, evomerge]``, ``model-index`` with each
  objective's validation and test score and standard error, per lm-eval task), the recipe in
  prose and as mergekit YAML where mergekit can express it, the run's front with this point
  marked (``front.png``), the library versions and the weight digests.
- ``results.json``: the point's scores in lm-eval's own output format (the shape
  ``simple_evaluate`` returns: ``results``, ``versions``, ``n-shot``, ``higher_is_better``,
  ``n-samples``, ``config``), from the test re-score where the run made one, else from the
  scores the point was chosen on (validation).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from evomerge.provenance import library_versions, read_environment, read_json_object, weights_digest


def _objectives(cfg: Mapping[str, Any]) -> list[dict[str, str]]:
    fitness = cfg.get("fitness") or {}
    return [dict(o) for o in fitness.get("objectives") or [] if isinstance(o, Mapping) and {"name", "task", "metric"} <= set(o)]


def point_scores(run: Path, record: Any) -> dict[str, dict[str, Any]]:
    """Per split (``validation``, ``test``) the point's scores and standard errors, as the run
    recorded them: the final front's chosen-on scores, else the archive's; the test re-score."""
    summary = read_json_object(run / "summary.json", "the model card has no test scores") or {}
    front = {p.get("id"): p for p in summary.get("front") or [] if isinstance(p, Mapping)}
    uncertainty = {u.get("id"): u for u in summary.get("front_uncertainty") or [] if isinstance(u, Mapping)}
    entry = front.get(record.id) or {}
    validation = {"scores": dict(entry.get("scores") or record.scores), "stderr": dict((uncertainty.get(record.id) or {}).get("stderr") or record.stderr or {}),
                  "chosen_by": entry.get("chosen_by", "search scores")}
    out = {"validation": validation}
    test = [t for t in (summary.get("test") or {}).values() if isinstance(t, Mapping) and t.get("id") == record.id]
    if test:
        out["test"] = {"scores": dict(test[0].get("scores") or {}), "stderr": dict(test[0].get("stderr") or {})}
    return out


def task_versions(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval task name -> (version, num_fewshot) from the task's own YAML."""
    from evomerge.estimators.tasks import find_tasks

    names = sorted({o["task"] for o in _objectives(cfg)})
    include = list((cfg.get("fitness") or {}).get("include_paths") or [])
    try:
        found = find_tasks(names, include)
    except Exception:  # noqa: BLE001 -- a task no longer findable: the card says unknown
        found = {}
    out = {}
    for name in names:
        d = found.get(name)
        config = getattr(d, "config", {}) or {}
        out[name] = {"version": (config.get("metadata") or {}).get("version"), "num_fewshot": config.get("num_fewshot", 0) or 0}
    return out


def lm_eval_results(cfg: Mapping[str, Any], scores: Mapping[str, Mapping[str, Any]], model: str) -> dict[str, Any]:
    """``results.json`` in the shape of lm-eval's ``simple_evaluate`` output (test split when
    the run re-scored the point on it, else validation)."""
    split = "test" if "test" in scores else "validation"
    s, se = scores[split]["scores"], scores[split].get("stderr") or {}
    versions = task_versions(cfg)
    results, higher, n_samples = {}, {}, {}
    for o in _objectives(cfg):
        task, metric = o["task"], o["metric"]
        if o["name"] not in s:
            continue
        name, _, filt = metric.partition(",")
        row = results.setdefault(task, {"alias": task})
        row[metric] = float(s[o["name"]])
        row[f"{name}_stderr,{filt or 'none'}"] = float(se[o["name"]]) if o["name"] in se else "N/A"
        higher.setdefault(task, {})[name] = True
        n_samples[task] = {"original": None, "effective": None}
    return {
        "results": results,
        "group_subtasks": {task: [] for task in results},
        "configs": {task: {"task": task, "split": split} for task in results},
        "versions": {task: versions.get(task, {}).get("version") for task in results},
        "n-shot": {task: versions.get(task, {}).get("num_fewshot", 0) for task in results},
        "higher_is_better": higher,
        "n-samples": n_samples,
        "config": {"model": "hf", "model_args": f"pretrained={model}", "batch_size": (cfg.get("fitness") or {}).get("batch_size"),
                   "split": split, "produced_by": "evomerge (in-memory lm-eval scoring, the same scores as simple_evaluate)"},
        "git_hash": None,
        "date": time.time(),
        "evomerge": {"split": split, **{k: v for k, v in scores.items()}},
    }


def model_index(name: str, cfg: Mapping[str, Any], scores: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The Hub's ``model-index``: one result per objective and split."""
    results = []
    for o in _objectives(cfg):
        metric = o["metric"].partition(",")[0]
        for split, data in scores.items():
            if o["name"] not in data["scores"]:
                continue
            value = float(data["scores"][o["name"]])
            se = (data.get("stderr") or {}).get(o["name"])
            entry = {"type": metric, "value": round(value, 4), "name": f"{o['name']} ({split})" + (f", stderr {float(se):.4f}" if se is not None else "")}
            results.append({
                "task": {"type": "text-generation", "name": o["name"]},
                "dataset": {"name": o["task"], "type": o["task"], "split": split},
                "metrics": [entry],
            })
    return [{"name": name, "results": results}]


def recipe_prose(recipe: Any, experts: list[str]) -> list[str]:
    """One line per recipe group: which layers, which method, which parameters."""
    lines = []
    for g in getattr(recipe, "groups", []) or []:
        where = g.name if getattr(g, "layers", None) is None else f"layers {g.layers[0]}-{g.layers[1]}" + (f" ({g.part})" if g.part not in ("layers",) else "")
        params = []
        for key, value in (g.params or {}).items():
            if isinstance(value, (list, tuple)) and len(value) == len(experts):
                params.append(f"{key} " + ", ".join(f"{e} {float(v):.3g}" for e, v in zip(experts, value)))
            else:
                params.append(f"{key} {value}")
        lines.append(f"- {where}: {g.method}" + (f" ({'; '.join(params)})" if params else ""))
    return lines


def write_card(target: Path, run: Path, record: Any, recipe: Any, base: str, experts: dict[str, str], mergekit_text: str | None,
               front_plot: Path | None = None) -> Path:
    """README.md (model card) and results.json into the exported folder ``target``."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    scores = point_scores(run, record)
    name = target.name
    front_matter = {
        "base_model": base,
        "library_name": "transformers",
        "tags": ["merge", "evomerge"],
        "model-index": model_index(name, cfg, scores),
    }
    env = read_environment(run) or {}
    versions = env.get("versions") or library_versions()
    digests = ((env.get("models") or {}).get("weights_digest") or {})
    table = ["| objective | lm-eval task | validation | test |", "|---|---|---|---|"]
    for o in _objectives(cfg):
        cells = []
        for split in ("validation", "test"):
            data = scores.get(split)
            if data is None or o["name"] not in data["scores"]:
                cells.append("not scored")
                continue
            se = (data.get("stderr") or {}).get(o["name"])
            cells.append(f"{float(data['scores'][o['name']]):.3f}" + (f" ± {float(se):.3f}" if se is not None else ""))
        table.append(f"| {o['name']} | `{o['task']}` (`{o['metric']}`) | {cells[0]} | {cells[1]} |")
    body = [
        f"# {name}",
        "",
        f"A merge of {len(experts)} fine-tuned models of `{base}` found by evomerge "
        f"(point {record.id} of the run `{run.name}`; chosen by {scores['validation']['chosen_by']}).",
        "",
        "## Scores",
        "",
        "Validation: the items the point was chosen on; test: the held-out split, scored once at the end. "
        "Standard errors as lm-eval computes them.",
        "",
        *table,
        "",
        "## Recipe",
        "",
        "Experts: " + ", ".join(f"`{k}` = `{v}`" for k, v in experts.items()),
        "",
        *recipe_prose(recipe, list(experts)),
        "",
    ]
    if mergekit_text:
        body += ["As a mergekit config (`mergekit-yaml` reproduces these weights; `evomerge export ... verify=true` checks it):", "",
                 "```yaml", "\n".join(line for line in mergekit_text.strip().splitlines() if not line.startswith("#")), "```", ""]
    else:
        body += ["mergekit cannot express this recipe (see `evomerge_recipe.yaml` in this folder for evomerge's own form).", ""]
    if front_plot is not None:
        body += ["## The run's front", "", f"![front with this point marked]({front_plot.name})", ""]
    body += ["## Provenance", "", "| library | version |", "|---|---|", *(f"| {k} | {v} |" for k, v in versions.items() if v), ""]
    if digests:
        body += ["Weight digests (SHA-256 over the tensors) of the models merged:", "", *(f"- {role}: `{d}`" for role, d in digests.items() if d), ""]
    merged_digest = weights_digest(target)
    if merged_digest:
        body += [f"This folder's weights: `{merged_digest}`.", ""]
    text = "---\n" + yaml.safe_dump(front_matter, sort_keys=False) + "---\n\n" + "\n".join(body)
    (target / "README.md").write_text(text)
    (target / "results.json").write_text(json.dumps(lm_eval_results(cfg, scores, str(target)), indent=2, default=str) + "\n")
    return target / "README.md"


def front_plot(run: Path, record_id: int, target: Path) -> Path | None:
    """front.png of the run's final front with the exported point marked (2+ objectives)."""
    from evomerge.plotting import pyplot
    from evomerge.report.data import load_run

    try:
        data = load_run(run)
    except Exception:  # noqa: BLE001 -- a report-unreadable run: the card goes without the plot
        return None
    if len(data.objectives) < 2:
        return None
    plt = pyplot()
    x, y = data.objectives[:2]
    front = data.front()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter([p.scores.get(x, 0) for p in data.evaluated], [p.scores.get(y, 0) for p in data.evaluated], s=8, c="lightgray", label="evaluated")
    ax.plot([p.scores.get(x, 0) for p in front], [p.scores.get(y, 0) for p in front], "o-", c="tab:blue", ms=4, label="front")
    mine = [p for p in front + data.evaluated if p.id == record_id][:1]
    if mine:
        ax.scatter([mine[0].scores.get(x, 0)], [mine[0].scores.get(y, 0)], marker="*", s=250, c="tab:red", zorder=5, label="this merge")
    for r in data.references:
        ax.scatter(r.scores.get(x, 0), r.scores.get(y, 0), marker="D", s=30, zorder=4, label=r.label)
    ax.set_xlabel(f"{x} (validation)")
    ax.set_ylabel(f"{y} (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path = target / "front.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
