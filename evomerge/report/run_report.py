"""``report.html`` for one run: fronts, parallel coordinates, progress, throughput, recipe
heatmaps, validation vs test, and the front table with export commands."""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from evomerge.errors import ConfigError
from evomerge.provenance import environment_line, read_environment
from evomerge.report.data import SEPARATION_Z, Point, RunData, load_run, recipe_table
from evomerge.report.page import data_block, esc, figure_block, page, write_atomic

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
FRONT_COLOR = "#1f77b4"
GREY = "#c4c4c4"
REF_COLORS = ["#000000", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
LIVE_REFRESH_S = 60


def export_command(run_dir: Path | str, point: int | str) -> str:
    return f"evomerge export run={shlex.quote(str(run_dir))} point={point}"


def score_text(p: Point, keys: Sequence[str]) -> list[str]:
    out = []
    for k in keys:
        if k not in p.scores:
            continue
        se = p.se(k)
        out.append(f"{k} = {p.scores[k]:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
    return out


def hover(p: Point, keys: Sequence[str], extra: str = "") -> str:
    head = f"<b>{esc(p.name)}</b>" + (f" (#{p.id})" if p.label else "") + (f", generation {p.generation}" if p.generation is not None else "")
    lines = [head + extra, *score_text(p, keys)]
    if p.fidelity is not None:
        lines.append(f"fidelity: {esc(p.fidelity)}")
    methods = p.methods()
    if methods and p.kind == "search":
        lines.append("methods:")
        lines += [f"  {esc(g)}: {esc(m)}" for g, m in methods]
    return "<br>".join(lines)


def _label(run: RunData) -> str:
    alg = str((run.config.get("algorithm") or {}).get("_target_", "")).rsplit(".", 1)[-1]
    return alg or "run"


# ---------------------------------------------------------------- figures


def fronts_figure(run: RunData) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    objs = run.objectives
    keys = objs + run.extras
    pairs = list(itertools.combinations(range(len(objs)), 2)) or [(0, 0)]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.08, vertical_spacing=0.12)
    front = run.front()
    front_ids = {p.id for p in front}
    dominated = [p for p in run.evaluated if p.id not in front_ids]
    close = run.not_separable()
    chosen = run.chosen()

    def err(points: list[Point], o: str) -> dict[str, Any] | None:
        se = [p.se(o) for p in points]
        if not any(v is not None for v in se):
            return None
        return {"type": "data", "array": [v or 0.0 for v in se], "visible": True, "thickness": 1, "width": 2}

    for k, (i, j) in enumerate(pairs):
        r, c = k // cols + 1, k % cols + 1
        xo, yo = objs[i], objs[j]
        first = k == 0

        def scatter(points: list[Point], name: str, **kw: Any) -> None:
            if not points:
                return
            extra = kw.pop("hover_extra", lambda p: "")
            fig.add_trace(
                go.Scatter(
                    x=[p.scores.get(xo) for p in points], y=[p.scores.get(yo) for p in points], name=name, legendgroup=name,
                    showlegend=first, customdata=[[p.id] for p in points], hovertext=[hover(p, keys, extra(p)) for p in points],
                    hoverinfo="text", **kw,
                ),
                row=r, col=c,
            )

        scatter(dominated, f"dominated ({len(dominated)})", mode="markers", marker={"color": GREY, "size": 6})
        sep = [p for p in front if p.id not in close]
        near = [p for p in front if p.id in close]
        line = len(objs) == 2  # a connecting line is only a front in the 2-objective case
        chosen_note = lambda p: (" — " + ", ".join(chosen[p.id])) if p.id in chosen else ""  # noqa: E731
        if line:
            along = sorted(front, key=lambda p: p.scores.get(xo, 0))
            fig.add_trace(go.Scatter(x=[p.scores[xo] for p in along], y=[p.scores[yo] for p in along], mode="lines",
                                     line={"color": FRONT_COLOR, "width": 1}, hoverinfo="skip", showlegend=False), row=r, col=c)
        scatter(sep, f"Pareto front ({len(front)})", mode="markers", marker={"color": FRONT_COLOR, "size": 9},
                error_x=err(sep, xo), error_y=err(sep, yo), hover_extra=chosen_note)
        scatter(near, f"front, within {SEPARATION_Z:g} s.e. of another front point", mode="markers",
                marker={"color": "white", "size": 9, "line": {"color": FRONT_COLOR, "width": 2}},
                error_x=err(near, xo), error_y=err(near, yo),
                hover_extra=lambda p: chosen_note(p) + "<br>not separable from " + ", ".join(f"#{q}" for q in close[p.id]))
        for n, ref in enumerate(run.references):
            scatter([ref], ref.name, mode="markers", marker={"symbol": "star", "size": 16, "color": REF_COLORS[n % len(REF_COLORS)],
                                                             "line": {"color": "white", "width": 1}},
                    error_x=err([ref], xo), error_y=err([ref], yo))
        fig.update_xaxes(title_text=f"{xo} (higher is better)", row=r, col=c)
        fig.update_yaxes(title_text=f"{yo} (higher is better)", row=r, col=c)
    fig.update_layout(height=430 * rows, margin={"l": 60, "r": 20, "t": 30, "b": 50}, hovermode="closest",
                      legend={"orientation": "h", "y": -0.18 if rows == 1 else -0.08}, template="plotly_white")
    return fig


def front3d_figure(run: RunData) -> Any | None:
    """Three objectives: the evaluated candidates in a rotatable 3-D scatter (the front is a
    surface, which no pair of 2-D projections shows whole); None for any other count."""
    import plotly.graph_objects as go

    objs = run.objectives
    if len(objs) != 3:
        return None
    keys = objs + run.extras
    front = run.front()
    front_ids = {p.id for p in front}
    chosen = run.chosen()
    fig = go.Figure()

    def add(points: list[Point], name: str, marker: dict[str, Any], extra=lambda p: "") -> None:
        if points:
            fig.add_trace(go.Scatter3d(
                x=[p.scores.get(objs[0]) for p in points], y=[p.scores.get(objs[1]) for p in points], z=[p.scores.get(objs[2]) for p in points],
                mode="markers", name=name, marker=marker, hovertext=[hover(p, keys, extra(p)) for p in points], hoverinfo="text",
            ))

    dominated = [p for p in run.evaluated if p.id not in front_ids]
    add(dominated, f"dominated ({len(dominated)})", {"color": GREY, "size": 3})
    add(front, f"Pareto front ({len(front)})", {"color": FRONT_COLOR, "size": 5},
        lambda p: (" — " + ", ".join(chosen[p.id])) if p.id in chosen else "")
    for n, ref in enumerate(run.references):
        add([ref], ref.name, {"symbol": "diamond", "size": 7, "color": REF_COLORS[n % len(REF_COLORS)]})
    axis = {"range": [0, 1]}
    fig.update_layout(
        height=560, margin={"l": 0, "r": 0, "t": 10, "b": 10}, template="plotly_white", legend={"orientation": "h"},
        scene={"xaxis": {**axis, "title": {"text": objs[0]}}, "yaxis": {**axis, "title": {"text": objs[1]}},
               "zaxis": {**axis, "title": {"text": objs[2]}}, "aspectmode": "cube"},
    )
    return fig


def parcoords_figure(run: RunData) -> Any | None:
    import plotly.graph_objects as go

    dims = run.objectives + run.extras
    pts = run.evaluated
    if len(dims) < 3 or not pts:
        return None
    front_ids = {p.id for p in run.front()}
    pts = sorted(pts, key=lambda p: p.id in front_ids)  # front lines drawn last, on top
    return go.Figure(
        go.Parcoords(
            line={"color": [1 if p.id in front_ids else 0 for p in pts], "colorscale": [[0, GREY], [1, FRONT_COLOR]], "cmin": 0, "cmax": 1},
            dimensions=[{"label": d + ("" if d in run.objectives else " (extra)"), "values": [p.scores.get(d, float("nan")) for p in pts],
                         "range": [0, max(1.0, max(p.scores.get(d, 0) for p in pts))]} for d in dims],
        ),
        layout={"height": 420, "margin": {"l": 60, "r": 60, "t": 50, "b": 30}},
    )


def progress_figure(run: RunData) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("hypervolume of the front so far", "best score so far (dotted: base and experts)"))
    hv = run.hv_history()
    fig.add_trace(go.Scatter(x=[n for n, _ in hv], y=[h for _, h in hv], mode="lines+markers", name="hypervolume",
                             hovertemplate="%{x} evaluations<br>HV %{y:.4f}<extra></extra>"), row=1, col=1)
    n = list(range(1, len(run.search) + 1))
    for k, (o, seq) in enumerate(run.best_so_far().items()):
        color = REF_COLORS[(k + 1) % len(REF_COLORS)]
        fig.add_trace(go.Scatter(x=n, y=seq, mode="lines", name=f"best {o}", line={"color": color},
                                 hovertemplate=f"%{{x}} evaluations<br>best {o} %{{y:.3f}}<extra></extra>"), row=1, col=2)
        for ref in run.references:
            if o in ref.scores and n:
                fig.add_trace(go.Scatter(x=[1, n[-1]], y=[ref.scores[o]] * 2, mode="lines", line={"dash": "dot", "width": 1, "color": color},
                                         showlegend=False, name=f"{ref.name}: {o}", hovertemplate=f"{esc(ref.name)}: {o} %{{y:.3f}}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="evaluations")
    fig.update_layout(height=380, margin={"l": 60, "r": 20, "t": 40, "b": 50}, template="plotly_white")
    return fig


def throughput_figure(run: RunData) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    elapsed, wall = run.elapsed_s()
    what = "wall clock" if wall else "cumulative merge + evaluation time"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"evaluations over time ({what})", "seconds per candidate"))
    search = run.search
    fig.add_trace(go.Scatter(x=[t / 60 for t in elapsed], y=list(range(1, len(search) + 1)), mode="lines", name="evaluations",
                             hovertemplate="%{x:.1f} min: %{y} evaluations<extra></extra>"), row=1, col=1)
    ids = [p.id for p in search]
    fig.add_trace(go.Bar(x=ids, y=[p.merge_s for p in search], name="merge s", marker_color="#ff7f0e"), row=1, col=2)
    fig.add_trace(go.Bar(x=ids, y=[p.eval_s for p in search], name="evaluation s", marker_color="#1f77b4"), row=1, col=2)
    fig.update_xaxes(title_text="minutes", row=1, col=1)
    fig.update_xaxes(title_text="candidate id", row=1, col=2)
    fig.update_layout(barmode="stack", height=340, margin={"l": 60, "r": 20, "t": 40, "b": 50}, template="plotly_white")
    return fig


def has_density(tables: Iterable[dict[str, Any]]) -> bool:
    """Whether any recipe table (``recipe_table``) has a density for some expert and group."""
    return any(v is not None for t in tables for g in t["groups"] for v in g["density"])


def recipe_figure(p: Point, experts: Sequence[str], with_density: bool = True) -> dict[str, Any]:
    """Weight and density heatmaps (layer groups × experts) of one recipe, as a plain plotly.js
    spec: built once per front point on every refresh, so no plotly.py objects (10x slower).
    ``with_density=False`` (no front recipe has a density, e.g. a task-arithmetic genome) leaves
    out the density panel instead of showing it empty."""
    from plotly.colors import sequential

    blues = [[i / (len(sequential.Blues) - 1), c] for i, c in enumerate(sequential.Blues)]
    table = recipe_table(p.recipe, experts)
    names, rows = table["experts"], table["groups"]
    ylabels = [f"{r['group']} · {r['method']}" for r in rows]
    other = [", ".join(f"{k}={v}" for k, v in r["other"].items()) for r in rows]
    data, layout = [], {}
    panels = ((1, "weight", [0.0, 0.41]), (2, "density", [0.59, 1.0])) if with_density else ((1, "weight", [0.0, 0.41]),)
    for col, key, domain in panels:
        suffix = "" if col == 1 else "2"
        data.append({
            "type": "heatmap", "z": [list(r[key]) for r in rows], "x": list(names), "y": ylabels,
            "text": [["" if v is None else f"{v:.2f}" for v in r[key]] for r in rows], "texttemplate": "%{text}",
            "zmin": 0, "zmax": 1, "colorscale": blues, "showscale": col == len(panels), "colorbar": {"len": 0.9, "x": domain[1] + 0.02, "xanchor": "left"},
            "customdata": [[other[i] for _ in names] for i in range(len(rows))], "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
            "hovertemplate": "%{y}<br>expert %{x}: " + key + " %{z:.3f}<br>%{customdata}<extra></extra>",
        })
        layout[f"xaxis{suffix}"] = {"domain": domain, "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "autorange": "reversed"}
        layout.setdefault("annotations", []).append({"text": key, "x": sum(domain) / 2, "y": 1.0, "xref": "paper", "yref": "paper",
                                                     "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 14}})
    layout.update(title={"text": f"recipe of #{p.id}: " + ", ".join(score_text(p, list(p.scores))), "font": {"size": 13}},
                  height=max(260, 60 + 34 * len(rows)), margin={"l": 170, "r": 20, "t": 60, "b": 40}, plot_bgcolor="white")
    return {"data": data, "layout": layout}


def validation_test_figure(run: RunData) -> Any | None:
    import plotly.graph_objects as go

    test = run.test_scores()
    if not test:
        return None
    by_id = {p.id: p for p in run.points}
    fig = go.Figure()
    for k, o in enumerate(run.objectives + run.extras):
        xs, ys, names = [], [], []
        for name, t in test.items():
            val = by_id.get(t.get("id"))
            if val is None or o not in val.scores or o not in (t.get("scores") or {}):
                continue
            xs.append(val.scores[o])
            ys.append(t["scores"][o])
            names.append(f"{name} (#{t.get('id')})")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=o, text=names, marker={"size": 10, "color": REF_COLORS[(k + 1) % len(REF_COLORS)]},
                                 hovertemplate="%{text}<br>" + o + ": validation %{x:.3f}, test %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#999", "width": 1}, name="test = validation", hoverinfo="skip"))
    fig.update_layout(height=380, width=560, xaxis_title="validation (search subset)", yaxis_title="test (full split)", template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 20, "b": 50})
    return fig


# ---------------------------------------------------------------- tables


def front_table(run: RunData, run_arg: str) -> str:
    keys = run.objectives + run.extras
    close = run.not_separable()
    chosen = run.chosen()
    head = "".join(f"<th>{esc(k)}{'' if k in run.objectives else ' (extra)'}</th>" for k in keys)
    rows = []
    for p in run.front():
        cells = "".join(f"<td>{esc(s.split(' = ', 1)[1])}</td>" if (s := next(iter(score_text(p, [k])), "")) else "<td></td>" for k in keys)
        methods = ", ".join(sorted({m for _, m in p.methods()}))
        rows.append(
            f'<tr><td><a href="#point={p.id}" title="show its recipe">{p.id}</a></td>'
            f"<td class=l>{esc(', '.join(chosen.get(p.id, [])))}</td>{cells}<td class=l>{esc(methods)}</td>"
            f"<td>{'' if p.generation is None else p.generation}</td><td>{p.merge_s:.2f}</td><td>{p.eval_s:.2f}</td>"
            f"<td class=l>{esc(', '.join(f'#{q}' for q in close.get(p.id, [])))}</td>"
            f"<td class=l><code>{esc(export_command(run_arg, p.id))}</code></td></tr>"
        )
    return (
        f"<table><tr><th>id</th><th class=l>chosen as</th>{head}<th class=l>methods</th><th>gen</th><th>merge s</th><th>eval s</th>"
        f"<th class=l>within {SEPARATION_Z:g} s.e. of</th><th class=l>export as an HF model folder</th></tr>{''.join(rows)}</table>"
    )


def test_table(run: RunData) -> str:
    test = run.test_scores()
    keys = run.objectives + run.extras
    by_id = {p.id: p for p in run.points}
    rows = []
    for name, t in test.items():
        val = by_id.get(t.get("id"))
        cells = "".join(
            f"<td>{(val.scores[k] if val and k in val.scores else float('nan')):.3f} / {(t.get('scores') or {}).get(k, float('nan')):.3f}</td>" for k in keys
        )
        note = ""
        if t.get("exact_differs"):  # the exact merge (export, mergekit) is not the one the search scored
            searched = ", ".join(f"{esc(k)} {v:.3f}" for k, v in (t.get("searched_scores") or {}).items())
            searched = f"searched merge's test: {searched}" if searched else "searched merge not scored (fitness.test_rescore_searched=false)"
            note = f"<br><small>exact merge differs from the searched one (sampled magnitude table); {searched}</small>"
        rows.append(f"<tr><td class=l>{esc(name)}{note}</td><td>{t.get('id')}</td>{cells}</tr>")
    head = "".join(f"<th>{esc(k)}: validation / test</th>" for k in keys)
    return f"<table><tr><th class=l>point</th><th>id</th>{head}</tr>{''.join(rows)}</table>"


# ---------------------------------------------------------------- page


RECIPE_SCRIPT = """
window.afterRender=function(){
  var recipes=JSON.parse(document.getElementById('recipe-figures').textContent);
  var select=document.getElementById('recipe-select');
  function show(id){
    var f=recipes[String(id)]; if(!f){return;}
    select.value=String(id);
    Plotly.react('recipe-fig',f.data,f.layout,{responsive:true,displaylogo:false});
  }
  select.addEventListener('change',function(){show(select.value);});
  document.querySelectorAll('[data-clickable-front]').forEach(function(div){
    div.on('plotly_click',function(ev){var cd=ev.points[0].customdata; if(cd){show(cd[0]);}});
  });
  function fromHash(){  // report.html#point=<id> opens that point's recipe (links in the front table)
    var m=/point=(\d+)/.exec(location.hash);
    if(m&&recipes[m[1]]){show(m[1]);document.getElementById('recipes').scrollIntoView();}
  }
  window.addEventListener('hashchange',fromHash);
  fromHash();
};
"""


def build_report(run: RunData, run_arg: str | None = None, live: bool = False) -> tuple[str, dict[str, Any]]:
    """The report's HTML and the data it embeds (also returned for callers and tests)."""

    run_arg = run_arg if run_arg is not None else str(run.run_dir)
    front = run.front()
    knee = run.knee()
    chosen = run.chosen()
    hv = run.hypervolume()
    recipes = {str(p.id): recipe_table(p.recipe, run.expert_names) for p in front}
    env = read_environment(run.run_dir)  # environment.json (evomerge.provenance)
    data = {
        "run": run_arg,
        "objectives": run.objectives,
        "extras": run.extras,
        "ref_point_losses": run.ref_point.tolist(),
        "hypervolume": hv,
        "n_evaluated": len(run.search),
        "n_failed": len(run.failed),
        "finished": run.finished,
        "front": [
            {"id": p.id, "scores": p.scores, "stderr": p.stderr, "fidelity": p.fidelity, "generation": p.generation,
             "methods": dict(p.methods()), "chosen_as": chosen.get(p.id, []), "export": export_command(run_arg, p.id)}
            for p in front
        ],
        "not_separable": {str(k): v for k, v in run.not_separable().items()},
        "references": {p.name: {"id": p.id, "scores": p.scores, "stderr": p.stderr} for p in run.references},
        "hv_history": run.hv_history(),
        "test": run.test_scores(),
        "recipes": recipes,
        "damage": run.damage,
        "environment": env,
    }
    state = "finished" if run.finished else '<span class="live">running</span> (refreshes every minute)' if live else "unfinished"
    subtitle = (
        f"{esc(run_arg)} · {esc(_label(run))} · objectives {esc(', '.join(run.objectives))} · {len(run.search)} candidates"
        f" ({len(run.failed)} failed) · {len(front)} on the front · hypervolume {hv:.4f} · {state} · updated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    if run.damage:
        subtitle += f'</p><p class="damage">skipped in the archive: {esc(run.damage)}'
    sections: list[tuple[str, str, str]] = []
    fronts = figure_block("fig-fronts", fronts_figure(run)).replace('class="fig"', 'class="fig" data-clickable-front="1"', 1)
    sections.append(("fronts", "Fronts", '<p class="note">Every objective pair; the front is over all objectives. Hover a point for its '
                     "scores and methods; click a front point to show its recipe in the next section. Stars: base and experts; grey: dominated candidates."
                     + (f" Error bars: ±1 standard error; open circles: front points within {SEPARATION_Z:g} standard errors of another front point on every objective."
                        if any(p.stderr for p in front) else "")
                     + (" The front was chosen with validation items outside the search's subset (the final front, docs/concepts.md: "
                        f"{run.chosen_by()}): its points show those scores, the grey candidates their search scores."
                        if run.chosen_by() in ("confirmation", "pooled") else "")
                     + "</p>" + fronts))
    if front:
        with_density = has_density(recipes.values())
        figs = {str(p.id): recipe_figure(p, run.expert_names, with_density) for p in front}
        start = knee or front[0]
        options = "".join(
            f'<option value="{p.id}"{" selected" if p is start else ""}>#{p.id}: '
            + esc(", ".join(f"{o} {p.scores.get(o, float('nan')):.3f}" for o in run.objectives))
            + (f" ({esc(', '.join(chosen[p.id]))})" if p.id in chosen else "") + "</option>"
            for p in front
        )
        sections.append(("recipes", "Recipes of the front", '<p class="note">Layer groups (rows, with their merge method) × experts: '
                         + ("weight and density per expert; blank: the method has no such parameter." if with_density else "weight per expert (no merge method on the front has a density).")
                         + f'</p><label>front point <select id="recipe-select">{options}</select></label>'
                         + figure_block("recipe-fig", recipe_figure(start, run.expert_names, with_density)) + data_block("recipe-figures", figs)))
    cube = front3d_figure(run)
    if cube is not None:
        sections.append(("front3d", "Front in 3-D", '<p class="note">The three objectives at once (drag to rotate, scroll to zoom): '
                         "blue: the Pareto front; grey: dominated candidates; diamonds: base and experts.</p>" + figure_block("fig-front3d", cube)))
    par = parcoords_figure(run)
    if par is not None:
        sections.append(("parallel", "Parallel coordinates", '<p class="note">Blue: front; grey: the rest. Drag along an axis to filter.</p>' + figure_block("fig-parcoords", par)))
    sections.append(("progress", "Hypervolume and best so far", figure_block("fig-progress", progress_figure(run))))
    sections.append(("throughput", "Throughput", figure_block("fig-throughput", throughput_figure(run))))
    vt = validation_test_figure(run)
    if vt is not None:
        sections.append(("test", "Validation vs test", '<p class="note">Re-scored points (summary.json → test): search-subset score vs. held-out test score.</p>'
                         + figure_block("fig-valtest", vt) + test_table(run)))
    sections.append(("table", "Front table", front_table(run, run_arg) + data_block("evomerge-report-data", data)))
    sections.append(("environment", "Environment", f"<p>environment: {esc(environment_line(env))}</p>"
                     + '<p class="note">Library versions, device, dtype, threads and weight digests the run was made with: environment.json.</p>'))
    head = f'<meta http-equiv="refresh" content="{LIVE_REFRESH_S}">' if live and not run.finished else ""
    html = page(f"evomerge run report: {run.run_dir.name}", subtitle, sections, extra_head=head, extra_script=RECIPE_SCRIPT if front else "")
    return html, data


def _display_path(run_dir: Path) -> str:
    """The run directory as the user would type it: relative to the current directory when
    inside it (export commands are run from there), else absolute."""
    rel = os.path.relpath(run_dir.resolve())
    return str(run_dir.resolve()) if rel.startswith("..") else rel


def report_target(run_dir: str | Path, out: str | Path | None) -> Path:
    """Where the report goes: ``out`` (a file, or a folder that gets report.html) or the run
    directory; a missing folder is a one-line error."""
    if out is None:
        return Path(run_dir) / REPORT_FILE
    target = Path(out)
    if target.is_dir():
        return target / REPORT_FILE
    if not target.parent.is_dir():
        raise ConfigError(f"out={out}: the folder {target.parent} does not exist; create it first")
    return target


def write_run_report(run_dir: str | Path, live: bool = False, out: str | Path | None = None) -> Path:
    """Write ``report.html`` into the run directory (or ``out``) and return its path. A
    damaged archive is reported on what is intact, with the skipped lines named on the page
    (and on stderr unless ``live``)."""
    target = report_target(run_dir, out)
    run = load_run(run_dir)
    if run.damage and not live:
        print(f"warning: {run.damage}; reporting the intact records", file=sys.stderr, flush=True)
    html, _ = build_report(run, _display_path(Path(run_dir)), live=live)
    try:
        return write_atomic(target, html)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the CLI's one line for a full disk
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None


_report_warned: set[str] = set()


def refresh_report(run_dir: str | Path, live: bool = False) -> Path | None:
    """Write report.html during or after a run; a failing report is skipped with one
    warning per run directory (not one per generation) and never stops the search or keeps
    disk space (used as ``SearchLoop.run(..., on_generation=...)``)."""
    try:
        return write_run_report(run_dir, live=live)
    except Exception as exc:  # noqa: BLE001 - the search matters more than its report
        key = str(Path(run_dir).resolve())
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if key not in _report_warned:
            _report_warned.add(key)
            print(f"warning: report.html not written ({reason}); the search goes on (this warning is not repeated)", file=sys.stderr, flush=True)
        log.debug("report.html not written: %s", exc)
        return None
