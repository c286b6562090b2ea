"""Wiring a composed config into a search run: pool -> merger -> fitness -> loop -> report."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evomerge import rundir
from evomerge.checks import check_config, check_tasks, check_weights_finite
from evomerge.dfs import wiring as dfs
from evomerge.dfs.path import LayerPath, candidate_from_dict, pool_paths
from evomerge.errors import ConfigError, EvomergeError
from evomerge.estimators.base import Estimator, FitnessContext
from evomerge.estimators.build import build_estimator
from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness, quiet_libraries
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe, reference_recipes  # noqa: F401 (re-exported)
from evomerge.pool import ModelPool
from evomerge.report import refresh_report
from evomerge.score_cache import ScoreCache
from evomerge.search.archive import Archive
from evomerge.search.genome import GenomeSpace
from evomerge.search.loop import SearchLoop
from evomerge.search.stages import carry_front, plan_stages
from evomerge.search.report import plot_run, write_front, write_recipes

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------- config helpers


def _get(cfg: DictConfig, key: str, kind: type, positive: bool = False) -> Any:
    value = OmegaConf.select(cfg, key)
    if value is None:
        raise ConfigError(f"config value '{key}' is missing")
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config value '{key}' must be {kind.__name__}, got {value!r}") from None
    if positive and converted <= 0:
        raise ConfigError(f"config value '{key}' must be positive, got {value!r}")
    return converted


def _tasks(items: Any, where: str) -> list[FitnessTask]:
    out = []
    for item in items or []:
        try:
            out.append(FitnessTask(str(item["name"]), str(item["task"]), str(item["metric"])))
        except (KeyError, TypeError):
            raise ConfigError(f"each entry of {where} needs name, task and metric, got {item!r}") from None
    return out


def build_pool(cfg: DictConfig) -> tuple[ModelPool, dict[str, str], str]:
    """The model pool named by ``cfg.modelpool`` (the toy zoo is built on first use)."""
    kind = OmegaConf.select(cfg, "modelpool.kind")
    if kind == "toy_zoo":
        from evomerge.zoo.build import TINY, ZooConfig, build_zoo, default_cache_dir

        size = OmegaConf.select(cfg, "modelpool.size") or "default"
        if size not in ("default", "tiny"):
            raise ConfigError(f"modelpool.size must be default or tiny, got {size!r}")
        cache = OmegaConf.select(cfg, "modelpool.cache_dir") or default_cache_dir()
        print(f"toy zoo: building or reusing in {cache} ...", file=sys.stderr, flush=True)
        zoo = build_zoo(cache, TINY if size == "tiny" else ZooConfig())
        experts = {k: str(v) for k, v in zoo.experts.items()}
        base = str(zoo.base)
    elif kind == "paths":
        base = OmegaConf.select(cfg, "modelpool.base")
        experts = OmegaConf.to_container(cfg.modelpool.experts, resolve=True) if OmegaConf.select(cfg, "modelpool.experts") else None
        if not base or base == "???":
            raise ConfigError("modelpool.base must be set to the base model's path")
        if not isinstance(experts, dict) or not experts:
            raise ConfigError("modelpool.experts must map expert names to paths, e.g. modelpool.experts.math=/path")
        experts = {str(k): str(v) for k, v in experts.items()}
    else:
        raise ConfigError(f"modelpool.kind must be toy_zoo or paths, got {kind!r}")
    return ModelPool(base, experts, dtype=resolve_dtype(OmegaConf.select(cfg, "dtype"), OmegaConf.select(cfg, "device"))), experts, str(base)


def resolve_dtype(dtype: str | None, device: str | None) -> str:
    """``auto``: bfloat16 on a GPU (half the memory, the dtype models ship in), float32 on CPU
    (bfloat16 arithmetic is slow there and the fused CPU kernels are float32/float64)."""
    if dtype not in (None, "", "auto"):
        return str(dtype)
    from evomerge.merge.merger import resolve_device

    return "bfloat16" if resolve_device(device or "auto").type == "cuda" else "float32"


def build_space(cfg: DictConfig, merger: Merger, expert_names: list[str], genome: dict | None = None) -> GenomeSpace:
    g = OmegaConf.to_container(cfg.genome, resolve=True) if genome is None else genome
    if not isinstance(g, dict):
        raise ConfigError("genome config must be a mapping")
    if dfs.is_dfs(g):  # data-flow (layer-path) genome: evomerge/dfs
        return dfs.build_space(g, merger.n_layers, expert_names)
    allowed = {"methods", "layer_groups", "split_attn_mlp", "separate_embed_head", "search_lambda", "lines", "ranges"}
    unknown = set(g) - allowed
    if unknown:
        raise ConfigError(f"unknown genome option {sorted(unknown)[0]!r}; known: {', '.join(sorted(allowed))}")
    try:
        return GenomeSpace(
            n_experts=merger.n_experts,
            n_layers=merger.n_layers,
            expert_names=expert_names,
            methods=tuple(g.get("methods", ["ties"])),
            layer_groups=int(g.get("layer_groups", 1)),
            split_attn_mlp=bool(g.get("split_attn_mlp", False)),
            separate_embed_head=bool(g.get("separate_embed_head", True)),
            search_lambda=bool(g.get("search_lambda", False)),
            lines=bool(g.get("lines", False)),
            ranges=dict(g.get("ranges") or {}),
            seed=_get(cfg, "seed", int),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid genome config: {exc}") from None


def build_strategy(cfg: DictConfig, space: GenomeSpace, algorithm: dict | None = None):
    """The run's ``algorithm`` (or a stage's own ``algorithm`` mapping) bound to ``space``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        factory = instantiate(cfg.algorithm if algorithm is None else OmegaConf.create(algorithm))
    except InstantiationException as exc:
        raise ConfigError(f"invalid algorithm config: {str(exc).splitlines()[0]}") from None
    kwargs = {"space": space} if "space" in inspect.signature(factory.func).parameters else {}
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid algorithm option: {exc}") from None


@dataclass
class Session:
    """Everything heavy for one run: built once, reused for every candidate."""

    cfg: DictConfig
    pool: ModelPool
    experts: dict[str, str]
    base: str
    merger: Merger
    fitness: Estimator
    objectives: list[str]

    def evaluate(self, recipe: Recipe) -> tuple[dict[str, float], float, float]:
        timing = self.merger.apply(recipe)
        started = time.perf_counter()
        scores = self.fitness()
        return scores, timing.seconds, time.perf_counter() - started


def open_session(cfg: DictConfig, run_dir: Path) -> Session:
    task_files = check_tasks(cfg)
    pool, experts, base = build_pool(cfg)
    models = {"base": base, **{f"expert:{k}": v for k, v in experts.items()}}
    rundir.verify_inputs(run_dir, models, task_files, force=bool(OmegaConf.select(cfg, "force")))
    device = OmegaConf.select(cfg, "device") or "auto"
    merger = Merger(pool, device=device, offload=bool(OmegaConf.select(cfg, "offload")))
    check_weights_finite(merger)
    genome = OmegaConf.to_container(cfg.genome, resolve=True) if OmegaConf.select(cfg, "genome") is not None else None
    if dfs.is_dfs(genome):  # candidates are layer paths over resident layers of the genome's models
        merger = dfs.path_merger(merger, genome, list(experts))
    objectives = _tasks(OmegaConf.select(cfg, "fitness.objectives"), "fitness.objectives")
    extra = _tasks(OmegaConf.select(cfg, "fitness.extra"), "fitness.extra")
    if OmegaConf.select(cfg, "fitness.extra_in_search") is False:
        extra = []  # recorded only by the test re-score (rescore_on_test reads fitness.extra itself)
    if not objectives:
        raise ConfigError("fitness.objectives must list at least one task")
    subset_size = OmegaConf.select(cfg, "fitness.subset_size")
    ctx = FitnessContext(
        merger.model,
        merger.tokenizer,
        objectives + extra,
        [t.name for t in objectives],
        split=str(OmegaConf.select(cfg, "fitness.split") or "validation"),
        subset_size=None if subset_size is None else _get(cfg, "fitness.subset_size", int, positive=True),
        subset_seed=_get(cfg, "fitness.subset_seed", int),
        batch_size=_get(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
        run_dir=run_dir,
        merger=merger,
        seed=_get(cfg, "seed", int),
    )
    fitness = build_estimator(OmegaConf.select(cfg, "fitness.estimator"), ctx)
    return Session(cfg, pool, experts, base, merger, fitness, [t.name for t in objectives])




def run_search(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``overrides``: the command line's (Hydra) overrides; on resume only safe ones may change."""
    quiet_libraries()
    # locked for the whole run; a fresh run's config is written exclusively (see evomerge.rundir)
    cfg, run_dir, lock = rundir.open_run_dir(cfg, run_dir, overrides)
    try:
        return _search(cfg, run_dir)
    finally:
        lock.release()


def _search(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    check_config(cfg)
    seed = _get(cfg, "seed", int)
    max_evals = _get(cfg, "search.max_evals", int, positive=True)
    session = open_session(cfg, run_dir)
    ref_point = OmegaConf.select(cfg, "search.ref_point")
    genome_cfg = OmegaConf.to_container(cfg.genome, resolve=True)
    stages_cfg = OmegaConf.select(cfg, "search.stages")
    stages = plan_stages(genome_cfg, OmegaConf.to_container(stages_cfg) if stages_cfg is not None else None, max_evals)
    check_async(cfg, session, stages)
    executor = build_executor(cfg, session, run_dir)
    try:
        loop = _run_stages(cfg, run_dir, session, executor, stages, seed, ref_point)
    finally:  # also on Ctrl-C: workers stopped, a Ray started here shut down
        executor.close()
    return finish_run(cfg, run_dir, session, loop)


def check_async(cfg: DictConfig, session: Session, stages: list) -> None:
    """``executor.mode=async`` with an algorithm that needs whole generations is refused
    before any worker starts (``executor=local`` ignores the mode)."""
    from evomerge.search.algorithms import require_async

    target = str(OmegaConf.select(cfg, "executor._target_") or "")
    if OmegaConf.select(cfg, "executor.mode") != "async" or target.endswith("local_executor"):
        return
    for stage in stages:
        require_async(build_strategy(cfg, build_space(cfg, session.merger, list(session.experts), stage.genome), stage.algorithm))


def build_executor(cfg: DictConfig, session: Session, run_dir: Path):
    """The run's ``executor`` group (``local`` when the config has none, e.g. older runs)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from evomerge.executors import local_executor

    node = OmegaConf.select(cfg, "executor")
    if node is None:
        return local_executor(session)
    try:
        factory = instantiate(node)
        return factory(session=session, cfg=cfg, run_dir=run_dir)
    except InstantiationException as exc:
        raise ConfigError(f"invalid executor config: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:
        raise ConfigError(f"invalid executor option: {exc}") from None


def _run_stages(cfg: DictConfig, run_dir: Path, session: Session, executor: Any, stages: list, seed: int, ref_point: Any) -> SearchLoop:
    history: list[dict[str, Any]] = []
    html = OmegaConf.select(cfg, "report.html") is not False
    for i, stage in enumerate(stages):
        space = build_space(cfg, session.merger, list(session.experts), stage.genome)
        strategy = build_strategy(cfg, space, stage.algorithm)
        initial = None
        if i > 0:  # later stages start from the front found so far (hand-made merges included)
            initial = carry_front(loop.archive.records, space)
            print(f"stage {stage.name}: starting from {len(initial)} front points of the earlier stages", file=sys.stderr, flush=True)
        elif OmegaConf.select(cfg, "search.seed_with_references"):
            initial = space.reference_genomes()
            print(f"warm start: {', '.join(space.hand_made_genomes())}", file=sys.stderr, flush=True)
        loop = SearchLoop(
            space,
            strategy,
            session.objectives,
            run_dir,
            max_evals=stage.evals,
            seed=seed + i,
            ref_point=None if ref_point is None else list(ref_point),
            progress=bool(OmegaConf.select(cfg, "search.progress")),
            initial=initial,
            checkpoint_name=stage.checkpoint,
            retry_failed=bool(OmegaConf.select(cfg, "search.retry_failed")),
        )
        if hasattr(session.fitness, "attach"):  # multi-fidelity promotion reads the live front
            session.fitness.attach(loop.archive)
        label = f"stage {stage.name}: " if len(stages) > 1 else "search: "
        print(
            f"{label}{strategy.name} over {space.n_var} genes ({len(space.slots)} groups, methods {', '.join(space.methods)}), "
            f"{stage.evals} evaluations, objectives {', '.join(session.objectives)}; run dir {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        if i == 0:
            refs = reference_recipes(session.merger.n_experts, list(session.experts), session.merger.n_layers)
            for label, rec in loop.evaluate_references(refs, executor).items():
                if rec.error:  # the references are plain merges: if they fail, every candidate would
                    raise ConfigError(f"reference {label} failed, so every candidate would: {rec.error}")
                print(f"reference {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in rec.scores.items()), file=sys.stderr)
        loop.run(executor, on_generation=(lambda _: refresh_report(run_dir, live=True)) if html else None)
        history += loop.state.history
    loop.state.history = history
    return loop


def finish_run(cfg: DictConfig, run_dir: Path, session: Session, loop: SearchLoop) -> dict[str, Any]:
    summary = write_front(run_dir, session.objectives, loop.archive, loop.ref_point)
    chosen = write_recipes(run_dir, session.objectives, loop.archive, session.base, session.experts)
    summary["chosen"] = chosen
    search = loop.archive.search_records()
    if search:
        summary["mean_merge_s"] = float(np.mean([r.merge_s for r in search]))
        summary["mean_eval_s"] = float(np.mean([r.eval_s for r in search]))
    summary["hypervolume_history"] = [{"n_evals": h["n_evals"], "hypervolume": h["hypervolume"]} for h in loop.state.history]
    rescore = OmegaConf.select(cfg, "fitness.test_rescore")
    if rescore:
        # true: the chosen points (best per objective, knee); "front": every front point
        targets = dict(chosen)
        if rescore == "front":
            targets.update({f"front:{p['id']}": p["id"] for p in summary["front"]})
        summary["test"] = rescore_on_test(cfg, session, loop.archive, targets, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if OmegaConf.select(cfg, "report.plots") is not False:
        plot_run(run_dir, session.objectives, loop.archive, loop.state.history)
    if OmegaConf.select(cfg, "report.html") is not False:
        refresh_report(run_dir)
    _print_summary(summary, run_dir)
    return summary


def rescore_on_test(cfg: DictConfig, session: Session, archive: Archive, chosen: dict[str, int], run_dir: Path | None = None) -> dict[str, Any]:
    """Score the chosen points and the references on the held-out test split (full)."""
    tasks = _tasks(OmegaConf.select(cfg, "fitness.objectives"), "") + _tasks(OmegaConf.select(cfg, "fitness.extra"), "")
    test = LmEvalFitness(
        session.merger.model,
        session.merger.tokenizer,
        tasks,
        split="test",
        batch_size=_get(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
    by_id = {r.id: r for r in archive.records}
    targets = {r.label: r for r in archive.records if r.kind == "reference"}
    targets.update({name: by_id[i] for name, i in chosen.items()})
    settings = {"split": "test", "tasks": [vars(t) for t in tasks], "batch_size": OmegaConf.select(cfg, "fitness.batch_size"), "max_length": OmegaConf.select(cfg, "fitness.max_length")}
    cache = ScoreCache.from_env(run_dir, settings) if run_dir is not None else None  # shared by runs when $EVOMERGE_SCORE_CACHE is set
    out = {}
    for name, rec in targets.items():
        scores = cache.get(rec.recipe) if cache else None
        if scores is None:
            session.merger.apply(candidate_from_dict(rec.recipe))
            scores = dict(test())
            if cache:
                cache.put(rec.recipe, scores)
        out[name] = {"id": rec.id, "scores": scores}
    return out


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    lines = [f"done: {summary['n_evaluated']} candidates, {len(summary['front'])} on the Pareto front, hypervolume {summary['hypervolume']:.4f}"]
    for name, scores in summary["references"].items():
        lines.append(f"  {name:>16}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    for p in summary["front"][:12]:
        lines.append(f"  front #{p['id']:<9}: " + ", ".join(f"{k}={v:.3f}" for k, v in p["scores"].items()))
    lines.append(f"outputs in {run_dir} (report.html, pareto_front.csv, front.png, progress.png, recipes/)")
    print("\n".join(lines))


# ---------------------------------------------------------------- export


def export_point(run_dir: str | Path, point: str, out: str | Path | None = None, force: bool = False) -> Path:
    """Write archive point ``point`` (an id, ``knee`` or ``best_<objective>``) of a run as an HF folder.
    Refuses a non-empty target (unless ``force``), a pool model's folder, and changed models."""
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file() or not (run / "archive.jsonl").is_file():
        raise ConfigError(f"{run} is not an evomerge run directory (no {CONFIG_FILE} / archive.jsonl)")
    archive = Archive(run / "archive.jsonl")
    by_id = {str(r.id): r for r in archive.records}
    by_label = {r.label: r for r in archive.records if r.label}
    if point in by_id:
        record = by_id[point]
    elif point in by_label:
        record = by_label[point]
    elif (run / "recipes" / f"{point}.yaml").is_file():
        rid = Recipe.load(run / "recipes" / f"{point}.yaml").metadata.get("archive_id")
        if str(rid) not in by_id:
            raise ConfigError(f"recipes/{point}.yaml names archive id {rid}, which {run / 'archive.jsonl'} does not hold")
        record = by_id[str(rid)]
    else:
        raise ConfigError(f"no point {point!r} in {run}: use an archive id, knee, best_<objective> or a reference label")
    if record.error:
        raise ConfigError(f"point {point} failed during the search ({record.error}); nothing to export")
    cfg = OmegaConf.load(run / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    quiet_libraries()
    pool, experts, base = build_pool(cfg)
    target = Path(out) if out else run / "exports" / f"point-{record.id}"
    rundir.check_export_target(target, [base, *experts.values()], force)
    models = {"base": base, **{f"expert:{k}": v for k, v in experts.items()}}
    rundir.check_fingerprints(run, rundir.fingerprints(models), force, "export")
    merger = Merger(pool, device=OmegaConf.select(cfg, "device") or "auto", offload=bool(OmegaConf.select(cfg, "offload")))
    recipe = candidate_from_dict(record.recipe)
    if isinstance(recipe, LayerPath):  # a data-flow point: its layers materialised (evomerge/dfs/export.py)
        recipe.base, recipe.experts = base, list(experts)
        return dfs.export_path(recipe, merger, list(experts), target, pool_paths(base, experts))
    merger.apply(recipe)
    recipe.base, recipe.experts = base, list(experts)
    merger.save(target, recipe)
    return target


def raise_user_errors(fn):
    """Decorator for CLI entry points: user mistakes exit 2 with one line, no traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvomergeError as exc:
            print(f"evomerge: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            fix = "make it writable" if exc.errno == errno.EROFS else "free space"
            print(f"evomerge: error: cannot write {exc.filename or 'a file'}: {exc.strerror}; {fix}, then resume with resume=<run dir>", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("evomerge: interrupted; resume with resume=<run dir>", file=sys.stderr)
            raise SystemExit(130) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
