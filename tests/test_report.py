"""report.html and `evomerge compare`: content checks on hand-built run directories, the
on_generation refresh with a real (synthetic-evaluator) search loop, and a headless browser."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.report import build_report, refresh_report, write_run_report
from evomerge.report.compare import compare_runs, expand_runs
from evomerge.report.data import load_run, recipe_table

# ---------------------------------------------------------------- a hand-built run


def _recipe(w_embed, d_embed, w_layers, t_head=0.3):
    return {
        "evomerge_recipe": 1, "base": None, "experts": ["x", "y"], "metadata": {},
        "groups": [
            {"name": "embed", "part": "embed", "method": "ties", "params": {"weight": w_embed, "density": d_embed}},
            {"name": "layers.0-1", "part": "layers", "layers": [0, 1], "component": "all", "method": "task_arithmetic", "params": {"weight": w_layers}},
            {"name": "head", "part": "head", "method": "slerp", "params": {"t": t_head}},
        ],
    }


def _rec(id_, kind, scores, generation=None, label=None, error=None, stderr=None, recipe=None, merge_s=0.1, eval_s=0.9):
    losses = [1.0, 1.0] if error else [1 - scores["a"], 1 - scores["b"]]
    r = {"id": id_, "kind": kind, "key": f"k{id_}", "genome": None if kind == "reference" else [0.5], "recipe": recipe or _recipe([0.5, 0.5], [1.0, 1.0], [0.5, 0.5]),
         "scores": scores, "losses": losses, "error": error, "label": label, "generation": generation, "merge_s": merge_s, "eval_s": eval_s, "extra": {}}
    if stderr is not None:
        r["stderr"] = stderr  # the optional field of archives written with standard errors
    return r


def config(seed=0, algorithm="nsga2"):
    return {
        "seed": seed,
        "algorithm": {"_target_": f"evomerge.search.algorithms.{algorithm}", "_partial_": True, "pop_size": 4},
        "modelpool": {"kind": "paths", "base": "/m/base", "experts": {"x": "/m/x", "y": "/m/y"}},
        "fitness": {"objectives": [{"name": "a", "task": "ta", "metric": "acc"}, {"name": "b", "task": "tb", "metric": "acc"}],
                    "extra": [{"name": "c", "task": "tc", "metric": "acc"}]},
        "search": {"max_evals": 7, "ref_point": None},
        "hydra": {"run": {"dir": f"runs/s{seed}"}},
    }


SE = {"a": 0.05, "b": 0.05}
FAKE_RECORDS = [
    _rec(0, "reference", {"a": 0.1, "b": 0.1, "c": 0.0}, label="base", recipe=_recipe([0, 0], [1, 1], [0, 0])),
    _rec(1, "reference", {"a": 0.9, "b": 0.1, "c": 0.0}, label="expert:x", recipe=_recipe([1, 0], [1, 1], [1, 0])),
    _rec(2, "reference", {"a": 0.1, "b": 0.9, "c": 0.0}, label="expert:y", recipe=_recipe([0, 1], [1, 1], [0, 1])),
    # generation 0: front {3, 4}; 5 failed
    _rec(3, "search", {"a": 0.8, "b": 0.2, "c": 0.1}, generation=0, stderr={"a": 0.01, "b": 0.01}),
    _rec(4, "search", {"a": 0.3, "b": 0.3, "c": 0.0}, generation=0),
    _rec(5, "search", {}, generation=0, error="RuntimeError: CUDA out of memory", merge_s=0.0, eval_s=0.5),
    # generation 1: 6 and 9 are within 2 standard errors of each other; 8 is dominated by 6
    _rec(6, "search", {"a": 0.5, "b": 0.6, "c": 0.2}, generation=1, stderr=SE, recipe=_recipe([0.25, 0.75], [0.5, 0.9], [0.125, 0.875], 0.3)),
    _rec(7, "search", {"a": 0.2, "b": 0.9, "c": 0.0}, generation=1, stderr=SE),
    _rec(8, "search", {"a": 0.4, "b": 0.5, "c": 0.0}, generation=1, stderr=SE),
    _rec(9, "search", {"a": 0.55, "b": 0.58, "c": 0.1}, generation=1, stderr=SE),
]
SUMMARY = {
    "objectives": ["a", "b"],
    "chosen": {"best_a": 3, "best_b": 7, "knee": 6},
    "test": {"base": {"id": 0, "scores": {"a": 0.12, "b": 0.08, "c": 0.0}}, "knee": {"id": 6, "scores": {"a": 0.45, "b": 0.62, "c": 0.1}}},
}


def make_run(path: Path, records=FAKE_RECORDS, summary=SUMMARY, cfg=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg or config()))
    (path / "archive.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def embedded(html: str, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html, re.S)
    assert m, element_id
    return json.loads(m.group(1))


# ---------------------------------------------------------------- run data


def test_front_hypervolume_history_and_best_so_far_by_hand(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    assert run.objectives == ["a", "b"] and run.extras == ["c"] and run.expert_names == ["x", "y"]
    assert [p.id for p in run.front()] == [3, 9, 6, 7]  # by score on a, high first
    # losses (.2,.8) (.45,.42) (.5,.4) (.8,.1) against (1,1): .25*.2 + .05*.58 + .3*.6 + .2*.9
    assert run.hypervolume() == pytest.approx(0.439)
    # generation 0 ends after 3 search records: front {(.2,.8), (.7,.7)} -> .5*.2 + .3*.3
    assert run.hv_history() == [(3, pytest.approx(0.19)), (7, pytest.approx(0.439))]
    best = run.best_so_far()
    assert best["a"] == [0.8] * 7
    assert best["b"] == [0.2, 0.3, 0.3, 0.6, 0.9, 0.9, 0.9]
    elapsed, wall = run.elapsed_s()
    assert not wall and elapsed == pytest.approx([4.0, 5.0, 5.5, 6.5, 7.5, 8.5, 9.5])  # after 3 references of 1 s
    # |.55-.5| and |.58-.6| are within 2*hypot(.05,.05) = .141; 7 is .3 away on a
    assert run.not_separable() == {9: [6], 6: [9]}
    assert run.knee().id == 6 and run.chosen() == {3: ["best_a"], 7: ["best_b"], 6: ["knee"]}


def test_wall_clock_time_is_used_when_records_carry_it(tmp_path):
    recs = [dict(r, time=1000.0 + 10 * r["id"]) for r in FAKE_RECORDS]
    elapsed, wall = load_run(make_run(tmp_path / "r", recs)).elapsed_s()
    assert wall and elapsed == [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]


def test_recipe_table_rows():
    t = recipe_table(_recipe([0.25, 0.75], [0.5, 0.9], [0.125, 0.875], 0.3), ["x", "y"])
    assert t["experts"] == ["x", "y"]
    assert [(g["group"], g["method"]) for g in t["groups"]] == [("embed", "ties"), ("layers.0-1", "task_arithmetic"), ("head", "slerp")]
    assert t["groups"][0]["weight"] == [0.25, 0.75] and t["groups"][0]["density"] == [0.5, 0.9]
    assert t["groups"][1]["density"] == [None, None]  # task arithmetic has no density
    assert t["groups"][2]["weight"] == [None, None] and t["groups"][2]["other"] == {"t": 0.3}


def _ta_recipe(w):
    return {"evomerge_recipe": 1, "base": None, "experts": ["x", "y"], "metadata": {},
            "groups": [{"name": "layers.0-1", "part": "layers", "layers": [0, 1], "component": "all", "method": "task_arithmetic", "params": {"weight": w}}]}


def test_recipes_without_any_density_show_the_weight_panel_only(tmp_path):
    recs = [dict(r, recipe=_ta_recipe([0.5, 0.25])) for r in FAKE_RECORDS]
    html, _ = build_report(load_run(make_run(tmp_path / "ta", recs)), "runs/ta")
    figs = embedded(html, "recipe-figures")
    assert [t["z"] for t in figs["6"]["data"]] == [[[0.5, 0.25]]]  # one heatmap: weight
    assert figs["6"]["data"][0]["showscale"] and [a["text"] for a in figs["6"]["layout"]["annotations"]] == ["weight"]
    assert "no merge method on the front has a density" in html
    # one front recipe with a density keeps both panels for every point (the layout does not jump)
    recs[6] = dict(recs[6], recipe=_recipe([0.25, 0.75], [0.5, 0.9], [0.125, 0.875]))
    html, _ = build_report(load_run(make_run(tmp_path / "mixed", recs)), "runs/mixed")
    figs = embedded(html, "recipe-figures")
    assert all(len(f["data"]) == 2 for f in figs.values()) and "blank: the method has no such parameter" in html


# ---------------------------------------------------------------- report content


def test_report_embeds_points_recipes_commands_and_test_scores(tmp_path):
    run = load_run(make_run(tmp_path / "r"))
    html, data = build_report(run, "runs/fake")
    assert embedded(html, "evomerge-report-data") == json.loads(json.dumps(data))
    assert [p["id"] for p in data["front"]] == [3, 9, 6, 7]
    assert data["hypervolume"] == pytest.approx(0.439) and data["n_evaluated"] == 7 and data["n_failed"] == 1
    p6 = next(p for p in data["front"] if p["id"] == 6)
    assert p6["scores"] == {"a": 0.5, "b": 0.6, "c": 0.2} and p6["stderr"] == SE and p6["chosen_as"] == ["knee"]
    assert p6["methods"] == {"embed": "ties", "layers.0-1": "task_arithmetic", "head": "slerp"}
    # the exact export command, in the data and in the visible front table
    for pid in (3, 9, 6, 7):
        assert f"<code>evomerge export run=runs/fake point={pid}</code>" in html
    assert "point=8<" not in html and "point=4<" not in html  # dominated points have no row
    # hover text: scores with standard errors, methods per group
    assert "a = 0.500 ± 0.050" in html and "b = 0.600 ± 0.050" in html and "  layers.0-1: task_arithmetic" in html
    assert "not separable from #9" in html
    # recipes: data and the heatmap figures (weight, density matrices: rows = groups, columns = experts)
    assert data["recipes"]["6"]["groups"][0]["weight"] == [0.25, 0.75]
    figs = embedded(html, "recipe-figures")
    assert set(figs) == {"3", "9", "6", "7"}
    weight, density = (t for t in figs["6"]["data"] if t["type"] == "heatmap")
    assert weight["z"] == [[0.25, 0.75], [0.125, 0.875], [None, None]]
    assert density["z"] == [[0.5, 0.9], [None, None], [None, None]]
    assert weight["y"] == ["embed · ties", "layers.0-1 · task_arithmetic", "head · slerp"] and weight["x"] == ["x", "y"]
    assert '<option value="6" selected>' in html  # the knee is shown first
    # base/experts and validation vs test
    assert set(data["references"]) == {"base", "expert:x", "expert:y"}
    assert data["test"]["knee"]["scores"]["b"] == 0.62
    assert "<td>0.500 / 0.450</td><td>0.600 / 0.620</td>" in html  # knee: validation / test per objective
    # self-contained: plotly.js inline, nothing fetched
    assert "<script src" not in html and "<link" not in html
    assert len(html) > 3_000_000  # plotly.min.js itself
    assert 'http-equiv="refresh"' not in html  # finished run


def test_three_objectives_get_every_pair_and_parallel_coordinates(tmp_path):
    cfg = config()
    cfg["fitness"]["objectives"].append(cfg["fitness"].pop("extra")[0])
    recs = [dict(r, losses=[1 - r["scores"][k] for k in "abc"]) if not r["error"] else dict(r, losses=[1.0] * 3) for r in FAKE_RECORDS]
    run = load_run(make_run(tmp_path / "r", recs, SUMMARY, cfg))
    assert run.objectives == ["a", "b", "c"] and run.extras == []
    html, data = build_report(run)
    fronts = json.loads(re.search(r'data-figure="fig-fronts">(.*?)</script>', html, re.S).group(1))
    titles = sorted((k, v["title"]["text"]) for k, v in fronts["layout"].items() if k.startswith(("xaxis", "yaxis")))
    assert [t for _, t in titles] == ["a (higher is better)", "a (higher is better)", "b (higher is better)",
                                      "b (higher is better)", "c (higher is better)", "c (higher is better)"]  # (a,b) (a,c) (b,c)
    par = json.loads(re.search(r'data-figure="fig-parcoords">(.*?)</script>', html, re.S).group(1))
    assert [d["label"] for d in par["data"][0]["dimensions"]] == ["a", "b", "c"]
    assert len(par["data"][0]["dimensions"][0]["values"]) == 6  # every successful search candidate
    assert 6 in [p["id"] for p in data["front"]]


def _three_objective_run(path: Path, records=FAKE_RECORDS) -> Path:
    cfg = config()
    cfg["fitness"]["objectives"].append(cfg["fitness"].pop("extra")[0])
    recs = [dict(r, losses=[1 - r["scores"][k] for k in "abc"]) if not r["error"] else dict(r, losses=[1.0] * 3) for r in records]
    return make_run(path, recs, SUMMARY, cfg)


def test_three_objectives_get_a_3d_front(tmp_path):
    html, _ = build_report(load_run(_three_objective_run(tmp_path / "r")))
    cube = json.loads(re.search(r'data-figure="fig-front3d">(.*?)</script>', html, re.S).group(1))
    traces = {t["name"].split(" (")[0]: t for t in cube["data"]}
    assert {t["type"] for t in cube["data"]} == {"scatter3d"}
    # over (a, b, c): 4 and 8 are dominated by 6 (.5, .6, .2); 9 beats 6 on a, 3 is best on a, 7 on b
    front = traces["Pareto front"]
    assert sorted(zip(front["x"], front["y"], front["z"])) == [(0.2, 0.9, 0.0), (0.5, 0.6, 0.2), (0.55, 0.58, 0.1), (0.8, 0.2, 0.1)]
    assert sorted(zip(traces["dominated"]["x"], traces["dominated"]["y"])) == [(0.3, 0.3), (0.4, 0.5)]
    assert {"base", "expert:x", "expert:y"} <= set(traces)
    assert [cube["layout"]["scene"][f"{ax}axis"]["title"]["text"] for ax in "xyz"] == ["a", "b", "c"]
    two, _ = build_report(load_run(make_run(tmp_path / "two")))
    assert "fig-front3d" not in two  # two objectives: the pair plot is the whole front


def test_compare_three_objectives_every_pair_and_3d(tmp_path):
    runs = tmp_path / "runs"
    _three_objective_run(runs / "s0")
    _three_objective_run(runs / "s1", [r for r in FAKE_RECORDS if r["id"] != 9])
    data = compare_runs(str(runs / "*"), out=tmp_path / "cmp")
    assert data["objectives"] == ["a", "b", "c"]
    html = (tmp_path / "cmp" / "compare.html").read_text()
    cube = json.loads(re.search(r'data-figure="fig-fronts3d">(.*?)</script>', html, re.S).group(1))
    fronts = [t for t in cube["data"] if t["name"] not in ("base", "expert:x", "expert:y")]
    assert sorted(len(t["z"]) for t in fronts) == [3, 4]  # without 9 the front is {3, 6, 7}
    pairs = json.loads(re.search(r'data-figure="fig-fronts">(.*?)</script>', html, re.S).group(1))
    assert len({k for k in pairs["layout"] if k.startswith("xaxis")}) == 3  # (a, b), (a, c), (b, c)
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    width = int.from_bytes(png[16:20], "big")
    assert width == 4 * 6 * 110  # three pair panels and the hypervolume curves


def test_report_of_a_running_run_without_summary_or_stderr(tmp_path):
    recs = [{k: v for k, v in r.items() if k != "stderr"} for r in FAKE_RECORDS]
    make_run(tmp_path / "r", recs, summary=None)
    path = write_run_report(tmp_path / "r", live=True)
    html = path.read_text()
    data = embedded(html, "evomerge-report-data")
    assert data["finished"] is False and data["test"] == {} and data["not_separable"] == {}
    assert 'http-equiv="refresh" content="60"' in html and "running" in html
    assert "Validation vs test" not in html
    assert "± " not in html.split('id="evomerge-report-data"')[0].split("<nav>")[1]  # no error bars or ± without stderr
    assert f"run={tmp_path / 'r'} point=6" in html  # outside the working directory: absolute path


def test_refresh_after_every_generation_of_a_search_loop(tmp_path, monkeypatch):
    """The run.py wiring: SearchLoop.run(on_generation=...) keeps report.html current, and its
    hypervolume curve equals the loop's own history."""
    from evomerge.search.algorithms import nsga2
    from evomerge.search.genome import GenomeSpace
    from evomerge.search.loop import SearchLoop

    space = GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic", "ties"), separate_embed_head=False)

    def evaluate(recipe):
        w0, w1 = recipe.groups[1].params["weight"]
        return {"a": w0 * (1 - 0.5 * w1), "b": w1 * (1 - 0.5 * w0)}, 0.001, 0.002

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"fitness": {"objectives": [{"name": "a"}, {"name": "b"}]}}))
    seen, archived = [], []

    def hook(loop):
        refresh_report(tmp_path, live=True)
        seen.append(embedded((tmp_path / "report.html").read_text(), "evomerge-report-data")["n_evaluated"])
        archived.append(len(loop.archive.search_records()))

    loop = SearchLoop(space, nsga2(pop_size=6), ["a", "b"], tmp_path, max_evals=18, seed=0, progress=False)
    loop.run(evaluate, on_generation=hook)
    # genomes that decode to an archived recipe are served from the archive (free), so up to 6
    # new ones per generation, and as many generations as 18 evaluations take (the last one cut)
    assert seen == archived and len(seen) >= 3 and seen[0] == 6 and seen == sorted(seen) and seen[-1] == 18
    data = embedded((tmp_path / "report.html").read_text(), "evomerge-report-data")
    assert [h for _, h in data["hv_history"]] == pytest.approx([h["hypervolume"] for h in loop.state.history])
    assert sorted(p["id"] for p in data["front"]) == sorted(r.id for r in loop.front_records())


def test_a_broken_run_dir_does_not_stop_the_search(tmp_path, capsys):
    assert refresh_report(tmp_path / "missing") is None
    assert refresh_report(tmp_path / "missing") is None
    err = capsys.readouterr().err
    assert err.count("report.html not written") == 1  # one warning per run, not one per generation


# ---------------------------------------------------------------- CLI


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "evomerge", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_report_and_user_errors(tmp_path, monkeypatch, capsys):
    from evomerge import cli

    make_run(tmp_path / "r")
    proc = run_cli("report", "run=r", cwd=tmp_path)  # the installed entry point, once
    assert proc.returncode == 0, proc.stderr
    assert "<code>evomerge export run=r point=6</code>" in (tmp_path / "r" / "report.html").read_text()
    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["report", "run=nowhere"], "evomerge: error: nowhere is not an evomerge run directory (no archive.jsonl)"),
        (["compare", "run=r"], "evomerge: error: usage: evomerge compare runs=[<run dir>,...]|'<glob>' [budget=<evaluations>] [labels=[<name>,...]] [out=<folder>]"),
        (["compare", "runs=[r]", "budget=ten"], "evomerge: error: budget must be an integer, got 'ten'"),
    ):
        monkeypatch.setattr(sys, "argv", ["evomerge", *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 2 and capsys.readouterr().err.strip() == message
    monkeypatch.setattr(sys, "argv", ["evomerge", "compare", "runs=[r]", "labels=['nsga2 (mixed, 40 genes)']", "out=cmp"])
    cli.main()
    assert "comparison written to cmp/compare.html" in capsys.readouterr().out
    assert "| nsga2 (mixed, 40 genes) | 1 (0) | 7 | 0.4390 |" in (tmp_path / "cmp" / "compare.md").read_text()


# ---------------------------------------------------------------- compare


def _simple(points):
    return [_rec(0, "reference", {"a": 0.1, "b": 0.1, "c": 0.0}, label="base")] + [
        _rec(i + 1, "search", {"a": a, "b": b, "c": 0.0}, generation=g) for i, (a, b, g) in enumerate(points)
    ]


DONE = {"objectives": ["a", "b"]}  # a summary.json: the run finished


@pytest.fixture
def three_runs(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "nsga2-s0", _simple([(0.8, 0.2, 0), (0.5, 0.6, 1)]), DONE, config(0, "nsga2"))  # HV .06 + .3 = .36
    make_run(runs / "nsga2-s1", _simple([(0.5, 0.5, 0), (0.1, 0.1, 1)]), DONE, config(1, "nsga2"))  # HV .25
    make_run(runs / "random-s0", _simple([(0.9, 0.1, 0), (0.1, 0.9, 0)]), DONE, config(0, "random"))  # HV .08 + .09 = .17
    return runs


def test_compare_groups_seeds_mean_std_and_writes_html_md_png(three_runs, tmp_path):
    data = compare_runs(str(three_runs / "*"), out=tmp_path / "cmp")
    groups = {g["label"]: g for g in data["groups"]}
    assert set(groups) == {"algorithm=nsga2", "algorithm=random"}  # the config key that differs
    g = groups["algorithm=nsga2"]
    assert [r["seed"] for r in g["runs"]] == [0, 1]
    assert g["hypervolume_mean"] == pytest.approx(0.305)
    assert g["hypervolume_std"] == pytest.approx(0.11 / math.sqrt(2))  # sample std of .36, .25
    assert groups["algorithm=random"]["hypervolume_std"] is None
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| algorithm=nsga2 | 2 (0, 1) | 2 | 0.3050 ± 0.0778 | 0.3600, 0.2500 |" in md
    assert "| algorithm=random | 1 (0) | 2 | 0.1700 | 0.1700 |" in md
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert embedded(html, "evomerge-compare-data") == json.loads(json.dumps(data))
    assert "0.3050 ± 0.0778" in html and "<script src" not in html
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_budget_labels_and_errors(three_runs, tmp_path):
    runs = [str(three_runs / n) for n in ("nsga2-s0", "nsga2-s1", "random-s0")]
    data = compare_runs(runs, out=tmp_path / "cmp", budget=1, labels=["evolution", "random search"])
    hv = {g["label"]: [r["hypervolume"] for r in g["runs"]] for g in data["groups"]}
    assert hv == {"evolution": [pytest.approx(0.16), pytest.approx(0.25)], "random search": [pytest.approx(0.09)]}  # first evaluation only
    assert expand_runs(f"[{runs[2]}, {runs[0]}]") == [Path(runs[2]), Path(runs[0])]
    with pytest.raises(ConfigError, match="labels names 1 groups"):
        compare_runs(runs, out=tmp_path / "cmp", labels=["x"])
    with pytest.raises(ConfigError, match="no run directories match"):
        expand_runs(str(tmp_path / "nothing-*"))
    other = make_run(tmp_path / "other", cfg={**config(), "fitness": {"objectives": [{"name": "a"}, {"name": "z"}]}},
                     records=[_rec(0, "reference", {"a": 0.1, "b": 0.1}, label="base")])
    with pytest.raises(ConfigError, match="different objectives"):
        compare_runs([runs[0], str(other)], out=tmp_path / "cmp")


def test_compare_labels_from_hydra_overrides(three_runs, tmp_path):
    for name, preset in (("nsga2-s0", "toy_nsga2"), ("nsga2-s1", "toy_nsga2"), ("random-s0", "toy_random")):
        seed = name[-1]
        (three_runs / name / ".hydra").mkdir()
        (three_runs / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+experiment={preset}", "search.max_evals=144", f"seed={seed}"]))
    data = compare_runs(str(three_runs / "*"), out=tmp_path / "cmp")
    assert [g["label"] for g in data["groups"]] == ["+experiment=toy_nsga2", "+experiment=toy_random"]


# ---------------------------------------------------------------- a real browser


def chromium() -> str:
    for name in (os.environ.get("EVOMERGE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.skip("no headless chromium found: CI installs Debian's chromium in .ci/run (apt-get install chromium); set EVOMERGE_CHROMIUM to another binary")


def browse(html_file: Path, tmp_path: Path, screenshot: Path | None = None, fragment: str = "") -> tuple[str, str]:
    """Load a page in headless chromium (local file, no network): the DOM after scripts ran, stderr."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--window-size=1400,3000"]
    args += ["--dump-dom"] + ([f"--screenshot={screenshot}"] if screenshot else [])
    proc = subprocess.run([*args, html_file.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def drawn_recipe_title(dom: str) -> str:
    """The title plotly drew (as SVG text) into the recipe heatmap's div."""
    drawn = dom.split('<div id="recipe-fig"', 1)[1].split('data-figure="recipe-fig"', 1)[0]
    return re.search(r'class="gtitle"[^>]*>([^<]*)<', drawn).group(1)


@pytest.mark.slow  # three chromium launches; each loads 5 MB of plotly.js (slow on a loaded machine)
def test_report_and_comparison_render_in_headless_chromium(three_runs, tmp_path):
    make_run(tmp_path / "r")
    report = write_run_report(tmp_path / "r")
    n_figures = report.read_text().count("data-figure=")
    assert n_figures == 6  # fronts, parallel coordinates (a, b, extra c), progress, throughput, recipe, validation vs test
    shot = tmp_path / "report.png"
    dom, log = browse(report, tmp_path, screenshot=shot)
    assert 'data-report-status="ok"' in dom, re.findall(r'id="report-status"[^<]*', dom)
    assert f'data-figures-drawn="{n_figures}"' in dom
    assert f"rendered {n_figures}/{n_figures} figures" in dom
    assert "Uncaught" not in log
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000  # a blank page is a few KB

    # the recipe heatmap follows a link to a front point (JavaScript wiring, not just plotting)
    assert drawn_recipe_title(dom).startswith("recipe of #6: ")  # the knee first
    dom, _ = browse(report, tmp_path, fragment="#point=7")
    assert 'data-report-status="ok"' in dom and drawn_recipe_title(dom).startswith("recipe of #7: a = 0.200 ± 0.050")

    compare_runs(str(three_runs / "*"), out=tmp_path / "cmp")
    dom, log = browse(tmp_path / "cmp" / "compare.html", tmp_path)
    assert 'data-report-status="ok"' in dom and 'data-figures-drawn="2"' in dom and "Uncaught" not in log


@pytest.mark.slow
def test_a_javascript_error_is_reported_by_the_status_marker(tmp_path):
    """The marker the browser test relies on can fail: a broken figure spec shows as an error."""
    make_run(tmp_path / "r")
    report = write_run_report(tmp_path / "r")
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace('data-figure="fig-progress">{', 'data-figure="fig-progress">{,', 1))
    dom, _ = browse(broken, tmp_path)
    assert 'data-report-status="error"' in dom and "RENDER ERROR: 5/6 figures" in dom


def test_test_table_says_whether_the_searched_merge_was_scored():
    from evomerge.report.run_report import test_table

    def table(entry):
        run = SimpleNamespace(test_scores=lambda: {"knee": entry}, objectives=["a"], extras=[], points=[])
        return test_table(run)

    assert "searched merge's test: a 0.400" in table({"id": 6, "scores": {"a": 0.5}, "exact_differs": True, "searched_scores": {"a": 0.4}})
    assert "searched merge not scored (fitness.test_rescore_searched=false)" in table({"id": 6, "scores": {"a": 0.5}, "exact_differs": True})
    assert "exact merge differs" not in table({"id": 6, "scores": {"a": 0.5}})
