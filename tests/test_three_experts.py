"""Three experts: the 3-expert toy zoo (the 2-expert zoo untouched, the third expert cached
on its own), the presets ``+experiment=toy_k3`` / ``smollm2_k3`` end to end at tiny size,
exact resume, and their reports with three objectives."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evomerge.errors import ConfigError
from evomerge.search.archive import Archive
from evomerge.zoo import k3
from evomerge.zoo.build import TINY, ZooConfig, _pretrain_sampler, build_zoo
from evomerge.zoo.tasks import SKILLS, fitness_records, held_out_prompts

from conftest import kill_when_searched

ROOT = Path(__file__).resolve().parents[1]
# The CLI on this checkout's configs/ and fitness/ (an editable install of another checkout
# would otherwise supply its own packaged ones).
CLI = (
    "import importlib, sys, evomerge\n"
    "for name, top in (('configs', 'configs'), ('fitness_tasks', 'fitness')):\n"
    "    sys.modules['evomerge.' + name] = importlib.import_module(top)\n"
    "    setattr(evomerge, name, sys.modules['evomerge.' + name])\n"
    "from evomerge.cli import main\n"
    "sys.argv[0] = 'evomerge'\n"
    "main()\n"
)


def cli(*args: str, cwd: Path, wait: bool = True, timeout: int = 600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", CLI, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"evomerge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """A cache folder holding the tiny 2-expert zoo and, separately, its rev expert."""
    cache = tmp_path_factory.mktemp("k3cache")
    k3.build_zoo_with(cache, TINY, k3.K3_EXPERTS)
    return cache


# ---------------------------------------------------------------- the zoo


def test_the_default_zoo_key_is_unchanged():
    # the default main job, the README numbers and every cached zoo rely on this key
    assert ZooConfig().key() == "0fa514e60670" and ZooConfig().experts == {"math": "math", "lang": "lang"}


def test_the_new_skill_leaves_the_other_skills_training_streams_alone():
    """rev prompts join the held-out set; the pre-training / replay streams of the 2-expert
    zoo (which skip held-out prompts) must not change."""
    held = held_out_prompts()
    without_rev = held - {r["question"] for s in ("validation", "test") for r in fitness_records("rev", s)}
    assert len(without_rev) == len(held) - 400
    cfg = ZooConfig()
    with_it, without = _pretrain_sampler(cfg, held, "pretrain:0"), _pretrain_sampler(cfg, without_rev, "pretrain:0")
    assert [with_it() for _ in range(3000)] == [without() for _ in range(3000)]
    assert list(SKILLS)[:3] == ["math", "lang", "target"]  # appended last


def test_rev_examples_by_hand():
    recs = fitness_records("rev", "test")
    assert all(r["answer"] == r["question"][2:-1][::-1] and 3 <= len(r["answer"]) <= 4 for r in recs)
    assert recs[0] == {"id": 0, "question": "R:359=", "answer": "953"}


def test_three_expert_zoo_adds_a_separately_cached_expert(tiny_cache, monkeypatch):
    two = build_zoo(tiny_cache, TINY)
    before = digests(two.root)
    zoo = k3.build_zoo_with(tiny_cache, TINY, ["math", "lang", "rev"])
    assert list(zoo.experts) == ["math", "lang", "rev"]
    assert (zoo.base, zoo.experts["math"], zoo.experts["lang"]) == (two.base, two.experts["math"], two.experts["lang"])
    rev = zoo.experts["rev"]
    assert rev.parent == tiny_cache and rev.name == f"expert-rev-{k3.extra_expert_key(TINY, 'rev')}" and not rev.is_relative_to(two.root)
    assert digests(two.root) == before  # adding an expert never touches the 2-expert zoo
    assert json.loads((rev / "expert.json").read_text())["zoo_config"]["experts"] == {"math": "math", "lang": "lang"}
    # cached: a second build trains nothing
    monkeypatch.setattr(k3, "_train", lambda *a, **k: pytest.fail("retrained a cached expert"))
    assert k3.build_zoo_with(tiny_cache, TINY, ["rev", "math"]).experts == {"rev": rev, "math": two.experts["math"]}
    assert k3.build_zoo_with(tiny_cache, TINY, None) == two


def test_the_added_expert_is_deterministic_and_differs_from_the_base(tiny_cache):
    from safetensors.torch import load_file

    first = k3.build_zoo_with(tiny_cache, TINY, k3.K3_EXPERTS)
    built = digests(first.experts["rev"])["model.safetensors"]
    again = k3.build_extra_expert(tiny_cache, TINY, "rev", force=True)
    assert again == first.experts["rev"] and digests(again)["model.safetensors"] == built
    base, rev = load_file(first.base / "model.safetensors"), load_file(first.experts["rev"] / "model.safetensors")
    changed = [k for k in base if not (base[k] == rev[k]).all()]
    assert changed and all(".layers." in k for k in changed)  # LoRA on the blocks only, as the other experts


@pytest.mark.parametrize(
    "experts, message",
    [(["math", "sort"], "unknown toy zoo expert 'sort'; known: math, lang, rev"),
     (["math", "math"], "at least two different experts"),
     (["rev"], "at least two different experts")],
)
def test_bad_expert_lists_are_config_errors(experts, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        k3.build_zoo_with(tmp_path, TINY, experts)
    assert not any(tmp_path.iterdir())  # refused before building anything


def test_toy_pool_expert_list_from_the_config(tiny_cache):
    from evomerge.session import build_pool

    cfg = OmegaConf.create({"modelpool": {"kind": "toy_zoo", "size": "tiny", "cache_dir": str(tiny_cache), "experts": ["math", "lang", "rev"]}})
    _, experts, _ = build_pool(cfg)
    assert list(experts) == ["math", "lang", "rev"]
    cfg.modelpool.experts = None
    assert list(build_pool(cfg)[1]) == ["math", "lang"]
    cfg.modelpool.experts = {"math": "/x"}
    with pytest.raises(ConfigError, match="must be a list of expert names"):
        build_pool(cfg)


def test_score_table_of_the_zoo(tiny_cache):
    zoo = k3.build_zoo_with(tiny_cache, TINY, k3.K3_EXPERTS)
    scores = k3.score_zoo(zoo, ["math", "rev"], split="validation", ta_weights=(1.0,), subset_size=8, include_paths=[ROOT / "fitness"])
    assert list(scores) == ["base", "expert:math", "expert:lang", "expert:rev", "task_arithmetic:1"]
    assert all(set(s) == {"math", "rev"} and all(0.0 <= v <= 1.0 for v in s.values()) for s in scores.values())
    table = k3.markdown_table(scores).splitlines()
    assert table[0] == "| model | math | rev |" and len(table) == 2 + 5


# ---------------------------------------------------------------- presets end to end


def tiny_args(cache: Path, preset: str = "toy_k3") -> list[str]:
    return [f"+experiment={preset}", "modelpool.size=tiny", f"modelpool.cache_dir={cache}", "device=cpu", "fitness.subset_size=6",
            "fitness.batch_size=8", "search.progress=false"]


def search_keys(run: Path) -> list[tuple[str, tuple]]:
    return [(r.key, tuple(r.losses)) for r in Archive(run / "archive.jsonl").search_records()]


@pytest.mark.slow
def test_toy_k3_runs_resumes_exactly_and_reports_three_objectives(tiny_cache, tmp_path):
    args = [*tiny_args(tiny_cache), "search.max_evals=36", "fitness.test_rescore=false"]
    reference = tmp_path / "uninterrupted"
    proc = cli(*args, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert "done: 36 candidates" in proc.stdout
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["objectives"] == ["math", "lang", "rev"]
    assert set(summary["references"]) >= {"base", "expert:math", "expert:lang", "expert:rev"}
    assert all(set(s) == {"math", "lang", "rev", "target"} for s in summary["references"].values())
    for name in ("best_math", "best_lang", "best_rev", "knee"):
        assert (reference / "recipes" / f"{name}.yaml").is_file()
    html = (reference / "report.html").read_text()
    assert 'data-figure="fig-front3d"' in html and 'data-figure="fig-parcoords"' in html
    assert (reference / "front.png").is_file()

    run = tmp_path / "killed"
    proc = cli(*args, f"hydra.run.dir={run}", cwd=tmp_path, wait=False)
    kill_when_searched(proc, run, 14, 600)
    proc.wait()
    before = search_keys(run)
    assert 14 <= len(before) < 36, "the kill should land mid-run"
    assert "done: 36 candidates" in cli(f"resume={run}", cwd=tmp_path).stdout
    after = search_keys(run)
    assert after[: len(before)] == before and after == search_keys(reference)  # same result as the uninterrupted run

    out = tmp_path / "cmp"
    cli("compare", f"runs=[{reference},{run}]", f"out={out}", cwd=tmp_path)
    assert 'data-figure="fig-fronts3d"' in (out / "compare.html").read_text()


@pytest.mark.slow
def test_toy_k3_grid_preset_is_the_full_3x3x3_grid(tiny_cache, tmp_path):
    run = tmp_path / "grid"
    cli(*tiny_args(tiny_cache, "toy_k3_grid_ta"), "search.max_evals=48", "fitness.test_rescore=false", "report.html=false",
        f"hydra.run.dir={run}", cwd=tmp_path)
    weights = {tuple(r.recipe["groups"][0]["params"]["weight"]) for r in Archive(run / "archive.jsonl").search_records()}
    assert len(weights) == 27 and {w for ws in weights for w in ws} == {0.0, 0.5, 1.0}


@pytest.mark.slow
def test_smollm2_k3_preset_end_to_end(tiny_models, tmp_path):
    out = tmp_path / "smollm2"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "smollm2" / "prepare.py"), "--out", str(out), "--base-hf", str(tiny_models["base"]),
         "--steps", "2", "--batch", "2", "--n-eval", "6", "--lr", "1e-3", "--skip-scores"],
        check=True, env=env, capture_output=True, text=True,
    )
    run = tmp_path / "run"
    cli("+experiment=smollm2_k3", f"smollm2_dir={out}", "device=cpu", "search.max_evals=6", "genome.layer_groups=2",
        "fitness.subset_size=4", "fitness.batch_size=8", "fitness.test_rescore=false", "search.progress=false", f"hydra.run.dir={run}", cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objectives"] == ["math", "roman", "sort"]
    assert set(summary["references"]) == {"base", "expert:math", "expert:roman", "expert:sort"}
    assert 'data-figure="fig-front3d"' in (run / "report.html").read_text()


# ---------------------------------------------------------------- front.png


@pytest.mark.parametrize("n_obj, joined", [(2, True), (3, False)])
def test_front_png_joins_the_front_only_for_two_objectives(tmp_path, monkeypatch, n_obj, joined):
    """With three objectives a pair shows a projection of the front: points, not a path."""
    import matplotlib.figure

    from evomerge.search.archive import Record
    from evomerge.search.report import plot_run

    names = ["a", "b", "c"][:n_obj]
    archive = Archive(tmp_path / "archive.jsonl")
    for i, s in enumerate([(0.9, 0.1, 0.5), (0.5, 0.5, 0.1), (0.1, 0.9, 0.2)]):
        scores = dict(zip(names, s))
        archive.append(Record(i, "search", f"k{i}", [0.0], {}, scores, [1 - v for v in scores.values()], generation=0))
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    plot_run(tmp_path, names, archive, history=[])
    front_lines = [ln for ax in drawn[0].axes for ln in ax.get_lines() if ln.get_label() == "Pareto front (all objectives)"]
    assert len(front_lines) == len(drawn[0].axes) == n_obj * (n_obj - 1) // 2
    assert all((ln.get_linestyle() == "-") == joined and len(ln.get_xdata()) == 3 for ln in front_lines)
