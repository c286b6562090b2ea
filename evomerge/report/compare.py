"""``evomerge compare``: several runs side by side -- hypervolume table (mean ± std over
seeds for runs that share a config but not a seed), overlaid fronts and hypervolume
curves -- as one HTML page, a Markdown table and a PNG (for READMEs)."""

from __future__ import annotations

import glob
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from evomerge.errors import ConfigError
from evomerge.provenance import environment_line, read_environment
from evomerge.report.data import RunData, config_without_seed, load_run
from evomerge.report.page import data_block, esc, figure_block, page, write_atomic
from evomerge.report.run_report import REF_COLORS, _display_path, export_command

GROUP_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
DASHES = ["solid", "dot", "dash", "longdash", "dashdot"]
UNFINISHED_MARK = "*"
IGNORED_OVERRIDES = ("seed=", "hydra.", "resume=", "search.progress=", "report.")


@dataclass
class Group:
    """Runs that share their config except the seed."""

    label: str
    runs: list[RunData] = field(default_factory=list)

    @property
    def hvs(self) -> list[float]:
        return [r.hypervolume() for r in self.runs]

    def mean_std(self) -> tuple[float, float | None]:
        hv = self.hvs
        return float(np.mean(hv)), (float(np.std(hv, ddof=1)) if len(hv) > 1 else None)


def expand_runs(spec: str | Sequence[str]) -> list[Path]:
    """``[a,b]``, ``a,b``, a glob (``runs/*``) or a list of those -> run directories."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [s.strip().strip("'\"") for s in text.split(",") if s.strip()]
    else:
        items = [str(s) for s in spec]
    out: list[Path] = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item) if (Path(m) / "archive.jsonl").is_file())
            if not matches:
                raise ConfigError(f"no run directories match {item!r}")
            out += matches
        else:
            out.append(Path(item))
    if not out:
        raise ConfigError("compare needs at least one run directory: runs=[dirA,dirB] or runs='glob/*'")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]


def _overrides(run: RunData) -> list[str] | None:
    f = run.run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return None
    try:
        items = yaml.safe_load(f.read_bytes().decode("utf-8")) or []
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # damaged: labels come from the configs instead
    if not isinstance(items, list):
        return None
    return [str(o) for o in items if not str(o).lstrip("+~").startswith(IGNORED_OVERRIDES)]


def _short(v: Any) -> str:
    if isinstance(v, str) and v.count(".") >= 2 and " " not in v:
        return v.rsplit(".", 1)[-1]  # _target_ paths: the function name says enough
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def auto_labels(groups: list[list[RunData]]) -> list[str]:
    """Name each group by what sets it apart: its command-line overrides when they differ,
    else the config keys whose values differ between groups."""
    if len(groups) == 1:
        r = groups[0][0]
        return [str((r.config.get("algorithm") or {}).get("_target_", r.run_dir.name)).rsplit(".", 1)[-1]]
    ov = [_overrides(g[0]) for g in groups]
    if all(o is not None for o in ov):
        common = set.intersection(*(set(o) for o in ov))  # type: ignore[arg-type]
        labels = [" ".join(x for x in o if x not in common) or "(defaults)" for o in ov]  # type: ignore[union-attr]
        if len(set(labels)) == len(labels):
            return labels
    flats = [config_without_seed(g[0].config) for g in groups]
    keys = sorted(k for k in set().union(*flats) if len({json.dumps(f.get(k), default=str, sort_keys=True) for f in flats}) > 1)
    labels = []
    for i, f in enumerate(flats):
        parts = [f"{k.removesuffix('._target_')}={_short(f.get(k))}" for k in keys[:4]]
        labels.append(" ".join(parts) + (" …" if len(keys) > 4 else "") or f"group {i + 1}")
    return labels if len(set(labels)) == len(labels) else [f"{lbl} [{i + 1}]" for i, lbl in enumerate(labels)]


def group_runs(runs: list[RunData], labels: Sequence[str] | None = None) -> list[Group]:
    keyed: dict[str, list[RunData]] = {}
    for r in runs:
        keyed.setdefault(json.dumps(config_without_seed(r.config), sort_keys=True, default=str), []).append(r)
    members = list(keyed.values())
    if labels is not None:
        if len(labels) != len(members):
            raise ConfigError(f"labels names {len(labels)} groups but the runs form {len(members)} (runs that differ only in seed share a group)")
        names = [str(x) for x in labels]
    else:
        names = auto_labels(members)
    return [Group(n, m) for n, m in zip(names, members)]


def _seed(r: RunData) -> Any:
    return r.config.get("seed", "?")


def _seed_mark(r: RunData) -> str:
    """The seed as the tables show it: marked when the run is unfinished."""
    return f"{_seed(r)}{'' if r.finished else UNFINISHED_MARK}"


def _check_out(out: str | Path) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out={out} is a file; compare writes compare.html, .md and .png into a folder")
    return out_dir


def _make_out(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"out={out_dir}: cannot create the folder ({exc.strerror or exc})") from None
    return out_dir


def _usable_runs(runs: list[RunData]) -> tuple[list[RunData], list[str]]:
    """Runs with at least one evaluated search candidate, and notes on what was left out
    or skipped (an empty run would count as a seed with hypervolume 0)."""
    notes = [r.damage + "; compared on the intact records" for r in runs if r.damage]
    usable = []
    for r in runs:
        if r.evaluated:
            usable.append(r)
        else:
            notes.append(f"{_display_path(r.run_dir)} left out: no evaluated search candidate" + (" within the budget" if r.budget else ""))
    if not usable:
        raise ConfigError("no run to compare: none has an evaluated search candidate (" + ", ".join(_display_path(r.run_dir) for r in runs) + ")")
    return usable, notes


def _duplicate_seeds(groups: list[Group]) -> list[str]:
    """Two runs of one setting with the same seed are repeats, not independent samples."""
    notes = []
    for g in groups:
        by_seed: dict[str, list[RunData]] = {}
        for r in g.runs:
            by_seed.setdefault(json.dumps(_seed(r), default=str), []).append(r)
        for seed, runs in by_seed.items():
            if len(runs) > 1:
                notes.append(f"group {g.label!r}: {', '.join(_display_path(r.run_dir) for r in runs)} share seed {json.loads(seed)}; "
                             "they are repeats of one run, not independent seeds, so the mean ± std over-counts them")
    return notes


def _knee_test(r: RunData) -> dict[str, float]:
    return ((r.test_scores().get("knee") or {}).get("scores")) or {}


def _fmt(v: float | None, d: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def markdown(groups: list[Group], objectives: list[str], extras: list[str], budget: int | None, ref: np.ndarray) -> str:
    keys = objectives + extras
    lines = [
        "| search | runs (seeds) | evaluations | hypervolume mean ± std | per seed | " + " | ".join(f"best {o}" for o in keys)
        + " | knee on test: " + " / ".join(keys) + " | merge s / cand. | eval s / cand. |",
        "|---|---|---|---|---|" + "---|" * len(keys) + "---|---|---|",
    ]
    for g in groups:
        mean, std = g.mean_std()
        evals = sorted({len(r.search) for r in g.runs})
        best = [max((p.scores.get(o, float("nan")) for r in g.runs for p in r.evaluated), default=float("nan")) for o in keys]
        knee = _knee_test(g.runs[0])
        knee_s = " / ".join(_fmt(knee.get(k), 3) for k in keys) if knee else "–"
        ms = [p.merge_s for r in g.runs for p in r.search]
        es = [p.eval_s for r in g.runs for p in r.search]
        lines.append(
            f"| {g.label} | {len(g.runs)} ({', '.join(_seed_mark(r) for r in g.runs)}) | {'/'.join(map(str, evals))} | "
            f"{mean:.4f}{'' if std is None else f' ± {std:.4f}'} | {', '.join(f'{h:.4f}' for h in g.hvs)} | "
            + " | ".join(_fmt(b, 3) for b in best)
            + f" | {knee_s} | {_fmt(float(np.mean(ms)) if ms else None, 2)} | {_fmt(float(np.mean(es)) if es else None, 2)} |"
        )
    ref_scores = ", ".join(f"{o} {1 - x:g}" for o, x in zip(objectives, ref))
    note = (f"Hypervolume of each run's front over the objectives ({', '.join(objectives)}), reference point at score ({ref_scores}); "
            "higher is better. Best: best validation score of any candidate. Knee on test: the knee point of the group's first run, re-scored on the test split.")
    if budget is not None:
        note += f" Every run is cut at its first {budget} search evaluations."
    first = groups[0].runs[0]
    refs = {p.label: t for p in first.references if (t := first.test_scores().get(p.label or ""))}
    if refs:
        note += "\n\nSource models on the test split (" + _display_path(first.run_dir) + "):\n\n| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
        note += "".join(f"| {name} | " + " | ".join(_fmt((t.get("scores") or {}).get(k), 3) for k in keys) + " |\n" for name, t in refs.items())
    return "\n".join(lines) + "\n\n" + note + "\n\n" + environment_text(groups) + "\n"


def environment_text(groups: list[Group]) -> str:
    """One ``environment: ...`` line when every run shares it, else one per run (environment.json)."""
    lines = {_display_path(r.run_dir): environment_line(read_environment(r.run_dir)) for g in groups for r in g.runs}
    if len(set(lines.values())) == 1:
        return f"environment: {next(iter(lines.values()))}"
    return "environments differ (environment.json of each run):\n\n" + "".join(f"- {run}: {line}\n" for run, line in lines.items())


def _curve(r: RunData) -> tuple[list[int], list[float]]:
    hv = r.hv_history()
    return [n for n, _ in hv], [h for _, h in hv]


def fronts_figure(groups: list[Group], objectives: list[str]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = list(itertools.combinations(range(len(objectives)), 2)) or [(0, 0)]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.12)
    for k, (i, j) in enumerate(pairs):
        r_, c_ = k // cols + 1, k % cols + 1
        xo, yo = objectives[i], objectives[j]
        for gi, g in enumerate(groups):
            color = GROUP_COLORS[gi % len(GROUP_COLORS)]
            for si, run in enumerate(g.runs):
                pts = sorted(run.front(), key=lambda p: p.scores.get(xo, 0))
                name = f"{g.label} (seed {_seed(run)})" if len(g.runs) > 1 else g.label
                fig.add_trace(go.Scatter(
                    x=[p.scores.get(xo) for p in pts], y=[p.scores.get(yo) for p in pts], name=name, legendgroup=name, showlegend=k == 0,
                    mode="lines+markers" if len(objectives) == 2 else "markers",
                    line={"color": color, "dash": DASHES[si % len(DASHES)], "width": 1.5}, marker={"color": color, "size": 7},
                    hovertext=[f"<b>{esc(g.label)}</b> seed {_seed(run)}<br>#{p.id}: " + ", ".join(f"{o} {v:.3f}" for o, v in p.scores.items())
                               + f"<br>{esc(export_command(_display_path(run.run_dir), p.id))}" for p in pts],
                    hoverinfo="text"), row=r_, col=c_)
        first = groups[0].runs[0]
        for n, ref in enumerate(first.references):
            fig.add_trace(go.Scatter(x=[ref.scores.get(xo)], y=[ref.scores.get(yo)], mode="markers", name=ref.name, legendgroup=ref.name,
                                     showlegend=k == 0, marker={"symbol": "star", "size": 15, "color": REF_COLORS[n % len(REF_COLORS)]},
                                     hovertext=[f"{esc(ref.name)}: " + ", ".join(f"{o} {v:.3f}" for o, v in ref.scores.items())], hoverinfo="text"),
                          row=r_, col=c_)
        fig.update_xaxes(title_text=f"{xo} (higher is better)", row=r_, col=c_)
        fig.update_yaxes(title_text=f"{yo} (higher is better)", row=r_, col=c_)
    fig.update_layout(height=460 * rows, template="plotly_white", margin={"l": 60, "r": 20, "t": 30, "b": 50}, hovermode="closest")
    return fig


def hv_figure(groups: list[Group]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for gi, g in enumerate(groups):
        color = GROUP_COLORS[gi % len(GROUP_COLORS)]
        for si, run in enumerate(g.runs):
            x, y = _curve(run)
            name = f"{g.label} (seed {_seed(run)})" if len(g.runs) > 1 else g.label
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line={"color": color, "dash": DASHES[si % len(DASHES)]},
                                     marker={"size": 5}, hovertemplate=f"{esc(name)}<br>%{{x}} evaluations: HV %{{y:.4f}}<extra></extra>"))
    fig.update_layout(height=400, xaxis_title="evaluations", yaxis_title="hypervolume of the front so far", template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 20, "b": 50})
    return fig


def html_table(groups: list[Group]) -> str:
    rows = []
    for gi, g in enumerate(groups):
        mean, std = g.mean_std()
        for si, run in enumerate(g.runs):
            first = si == 0
            span = f' rowspan="{len(g.runs)}"'
            lead = (f'<td class=l{span} style="border-left:5px solid {GROUP_COLORS[gi % len(GROUP_COLORS)]}">{esc(g.label)}</td>'
                    f"<td{span}>{mean:.4f}{'' if std is None else f' ± {std:.4f}'}</td>") if first else ""
            rows.append(f"<tr>{lead}<td>{esc(_seed_mark(run))}</td><td class=l>{esc(_display_path(run.run_dir))}</td><td>{len(run.search)}</td>"
                        f"<td>{run.hypervolume():.4f}</td><td>{len(run.front())}</td></tr>")
    return ("<table><tr><th class=l>search</th><th>hypervolume mean ± std</th><th>seed</th><th class=l>run</th><th>evaluations</th>"
            f"<th>hypervolume</th><th>front size</th></tr>{''.join(rows)}</table>")


def png(groups: list[Group], objectives: list[str], path: Path) -> None:
    """Static fronts (every objective pair) + HV curves, for READMEs."""
    from evomerge.plotting import pyplot

    plt = pyplot()

    pairs = list(itertools.combinations(objectives, 2)) or [(objectives[0], objectives[0])]
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(6 * (len(pairs) + 1), 4.8), squeeze=False)
    fronts, a2 = list(axes[0][:-1]), axes[0][-1]
    for gi, g in enumerate(groups):
        color = GROUP_COLORS[gi % len(GROUP_COLORS)]
        mean, std = g.mean_std()
        for si, run in enumerate(g.runs):
            label = f"{g.label}: HV {mean:.3f}" + ("" if std is None else f" ± {std:.3f}") if si == 0 else None
            ls = ["-", ":", "--", "-."][si % 4]
            for a1, (xo, yo) in zip(fronts, pairs):
                pts = sorted((p.scores.get(xo, 0), p.scores.get(yo, 0)) for p in run.front())
                if pts:  # with more than two objectives a projected front is points, not a line
                    a1.plot(*zip(*pts), "o" + (ls if len(objectives) == 2 else ""), c=color, ms=4, label=label)
            x, y = _curve(run)
            a2.plot(x, y, ls, c=color, marker="o", ms=3, label=label if si == 0 else None)
    for a1, (xo, yo) in zip(fronts, pairs):
        for n, ref in enumerate(groups[0].runs[0].references):
            a1.scatter(ref.scores.get(xo), ref.scores.get(yo), marker="*", s=180, zorder=5, c=REF_COLORS[n % len(REF_COLORS)], label=ref.name)
        a1.set_xlabel(f"{xo} (higher is better)")
        a1.set_ylabel(f"{yo} (higher is better)")
        a1.set_title("Pareto fronts" if len(pairs) == 1 else f"Pareto fronts: {xo} vs {yo}")
    a2.set_xlabel("evaluations")
    a2.set_ylabel("hypervolume")
    a2.set_title("hypervolume vs. evaluations")
    for a in (*fronts, a2):
        a.grid(alpha=0.3)
    if len(pairs) == 1:
        for a in (fronts[0], a2):
            a.legend(fontsize=7)
        fig.tight_layout()
    else:  # one legend under the panels: per-panel legends would cover the small fronts
        handles, labels = fronts[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.05 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fronts3d_figure(groups: list[Group], objectives: list[str]) -> Any | None:
    """Three objectives: every run's front in one rotatable 3-D scatter; None otherwise."""
    import plotly.graph_objects as go

    if len(objectives) != 3:
        return None
    fig = go.Figure()
    for gi, g in enumerate(groups):
        color = GROUP_COLORS[gi % len(GROUP_COLORS)]
        for si, run in enumerate(g.runs):
            pts = run.front()
            name = f"{g.label} (seed {_seed(run)})" if len(g.runs) > 1 else g.label
            fig.add_trace(go.Scatter3d(
                x=[p.scores.get(objectives[0]) for p in pts], y=[p.scores.get(objectives[1]) for p in pts],
                z=[p.scores.get(objectives[2]) for p in pts], mode="markers", name=name,
                marker={"color": color, "size": 4, "symbol": ["circle", "square", "diamond", "cross", "x"][si % 5]},
                hovertext=[f"<b>{esc(g.label)}</b> seed {_seed(run)}<br>#{p.id}: " + ", ".join(f"{o} {v:.3f}" for o, v in p.scores.items())
                           for p in pts], hoverinfo="text"))
    for n, ref in enumerate(groups[0].runs[0].references):
        fig.add_trace(go.Scatter3d(x=[ref.scores.get(objectives[0])], y=[ref.scores.get(objectives[1])], z=[ref.scores.get(objectives[2])],
                                   mode="markers", name=ref.name, marker={"symbol": "diamond", "size": 7, "color": REF_COLORS[n % len(REF_COLORS)]},
                                   hovertext=[f"{esc(ref.name)}: " + ", ".join(f"{o} {v:.3f}" for o, v in ref.scores.items())], hoverinfo="text"))
    axis = {"range": [0, 1]}
    fig.update_layout(height=560, template="plotly_white", margin={"l": 0, "r": 0, "t": 10, "b": 10}, legend={"orientation": "h"},
                      scene={"xaxis": {**axis, "title": {"text": objectives[0]}}, "yaxis": {**axis, "title": {"text": objectives[1]}},
                             "zaxis": {**axis, "title": {"text": objectives[2]}}, "aspectmode": "cube"})
    return fig


def compare_runs(runs: str | Sequence[str], out: str | Path = ".", budget: int | None = None, labels: Sequence[str] | None = None,
                 name: str = "compare") -> dict[str, Any]:
    """Write ``<out>/<name>.html``, ``.md`` and ``.png``; return the comparison as data."""
    dirs = expand_runs(runs)
    if budget is not None and budget <= 0:
        raise ConfigError(f"budget must be positive, got {budget}")
    out_dir = _check_out(out)
    loaded = [load_run(d, budget=budget) for d in dirs]
    objectives = loaded[0].objectives
    for r in loaded[1:]:
        if r.objectives != objectives:
            raise ConfigError(f"runs optimise different objectives: {loaded[0].run_dir} has {objectives}, {r.run_dir} has {r.objectives}")
    loaded, notes = _usable_runs(loaded)
    ref = loaded[0].ref_point
    for r in loaded:
        r.ref_point = ref  # one reference point, or hypervolumes are not comparable
    extras = sorted(set().union(*(r.extras for r in loaded)))
    groups = group_runs(loaded, labels)
    notes += _duplicate_seeds(groups)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    _make_out(out_dir)
    md = markdown(groups, objectives, extras, budget, ref)
    unfinished = [r for r in loaded if not r.finished]
    if unfinished:
        md += f"\n{UNFINISHED_MARK} unfinished run (no summary.json: killed or still running); its numbers may still change.\n"
    if notes:
        md += "\nNotes:\n\n" + "".join(f"- {n}\n" for n in notes)
    write_atomic(out_dir / f"{name}.md", md)
    png(groups, objectives, out_dir / f"{name}.png")
    data = {
        "objectives": objectives,
        "budget": budget,
        "ref_point_losses": ref.tolist(),
        "notes": notes,
        "groups": [
            {"label": g.label, "hypervolume_mean": g.mean_std()[0], "hypervolume_std": g.mean_std()[1],
             "runs": [{"run": _display_path(r.run_dir), "seed": _seed(r), "finished": r.finished, "evaluations": len(r.search), "hypervolume": r.hypervolume(),
                       "hv_history": r.hv_history(), "front": [{"id": p.id, "scores": p.scores} for p in r.front()]} for r in g.runs]}
            for g in groups
        ],
    }
    md_html = "<pre>" + esc(md) + "</pre>"
    sections = [
        ("hv", "Hypervolume", html_table(groups) + '<p class="note">Runs that share their config except the seed form one group '
         "(mean ± sample std over seeds)." + (f" {UNFINISHED_MARK}: unfinished run (no summary.json)." if unfinished else "") + "</p>"
         + "".join(f'<p class="note">warning: {esc(n)}</p>' for n in notes) + "<details><summary>Markdown</summary>" + md_html + "</details>"),
        ("fronts", "Fronts", '<p class="note">One colour per group, one dash style per seed; stars: base and experts of the first run.</p>'
         + figure_block("fig-fronts", fronts_figure(groups, objectives))),
        ("curves", "Hypervolume vs. evaluations", figure_block("fig-hv", hv_figure(groups)) + data_block("evomerge-compare-data", data)),
        ("environment", "Environment", "<pre>" + esc(environment_text(groups)) + "</pre>"),
    ]
    cube = fronts3d_figure(groups, objectives)
    if cube is not None:
        sections.insert(2, ("fronts3d", "Fronts in 3-D", '<p class="note">Every run\'s front over the three objectives (drag to rotate); '
                            "diamonds: base and experts of the first run.</p>" + figure_block("fig-fronts3d", cube)))
    subtitle = f"{len(loaded)} runs in {len(groups)} groups · objectives {esc(', '.join(objectives))}" + (f" · budget {budget}" if budget else "")
    write_atomic(out_dir / f"{name}.html", page("evomerge run comparison", subtitle, sections))
    return data
