"""A run's heavy objects, built once from a composed config: model pool, merger, fitness
estimator (``Session``), and the genome space and algorithm bound to it."""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge import rundir
from evomerge.checks import check_tasks, check_weights_finite, warn_zero_task_vectors
from evomerge.dfs import wiring as dfs
from evomerge.errors import ConfigError
from evomerge.estimators.base import Estimator, FitnessContext
from evomerge.estimators.build import build_estimator
from evomerge.estimators.lm_eval_fitness import FitnessTask
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool
from evomerge.search.genome import GenomeSpace


def config_value(cfg: DictConfig, key: str, kind: type, positive: bool = False) -> Any:
    """``cfg.key`` converted to ``kind``; a missing or wrong value is a ConfigError naming the key."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        raise ConfigError(f"config value '{key}' is missing")
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError  # int(1.5) would silently be 1
        converted = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config value '{key}' must be {kind.__name__}, got {value!r}") from None
    if positive and converted <= 0:
        raise ConfigError(f"config value '{key}' must be positive, got {value!r}")
    return converted


def table_size(cfg: DictConfig) -> int | None:
    """``merger.table_size``: null (the default) = exact thresholds, as exports and the test
    re-score; a number = slots of a sampled magnitude table. A run's config without the key is
    from before it existed, when the search used the 4096-slot table: it resumes with it."""
    from evomerge.merge.groups import LEGACY_TABLE_SIZE

    value = OmegaConf.select(cfg, "merger.table_size", default=LEGACY_TABLE_SIZE)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config value 'merger.table_size' must be a positive integer or null, got {value!r}")
    return value


def fitness_tasks(items: Any, where: str) -> list[FitnessTask]:
    """The ``{name, task, metric}`` entries of a ``fitness.objectives``/``fitness.extra`` list."""
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
        zoo = toy_zoo(cfg)
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


def toy_zoo(cfg: DictConfig):
    """The toy zoo of ``cfg.modelpool``: the shipped one (``source: shipped``, the default: the
    same weights on every machine) or one trained into the cache (``source: built``)."""
    from evomerge.zoo.build import default_cache_dir
    from evomerge.zoo.k3 import build_zoo_with
    from evomerge.zoo.shipped import SIZES, matches_config, read_record, shipped_zoo

    size = OmegaConf.select(cfg, "modelpool.size") or "default"
    if size not in SIZES:
        raise ConfigError(f"modelpool.size must be {' or '.join(SIZES)}, got {size!r}")
    source = OmegaConf.select(cfg, "modelpool.source") or "shipped"
    if source not in ("shipped", "built"):
        raise ConfigError(f"modelpool.source must be shipped or built, got {source!r}")
    names = OmegaConf.select(cfg, "modelpool.experts")  # null: the zoo's own two experts
    if names is not None and not OmegaConf.is_list(names):
        raise ConfigError(f"modelpool.experts of the toy zoo must be a list of expert names, e.g. [math, lang, rev], got {names!r}")
    names = None if names is None else [str(n) for n in names]
    if source == "shipped" and matches_config(size, SIZES[size]):
        zoo = shipped_zoo(size, names)
        print(f"toy zoo: the shipped {size} zoo, digest {str((read_record(size) or {}).get('digest'))[:12]} ({zoo.root})", file=sys.stderr, flush=True)
        return zoo
    cache = OmegaConf.select(cfg, "modelpool.cache_dir") or default_cache_dir()
    why = "modelpool.source=built" if source == "built" else "the zoo config differs from the shipped zoo's"
    print(f"toy zoo: {why}: building or reusing a zoo trained on this machine in {cache} (it differs from the shipped zoo and by machine) ...",
          file=sys.stderr, flush=True)
    return build_zoo_with(cache, SIZES[size], names)


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
    allowed = {"methods", "layer_groups", "split_attn_mlp", "separate_embed_head", "search_lambda", "lines", "ranges", "blocks", "n_blocks", "layer_ranges"}
    unknown = set(g) - allowed
    if unknown:
        raise ConfigError(f"unknown genome option {sorted(unknown)[0]!r}; known: {', '.join(sorted(allowed))}")
    budget = OmegaConf.select(cfg, "search.max_evals")
    recorded = OmegaConf.select(cfg, RESOLVED_BLOCKS)
    recorded = OmegaConf.to_container(recorded, resolve=True) if isinstance(recorded, DictConfig) else None
    layer_ranges = genome_layer_ranges(g, merger, budget if isinstance(budget, int) else None, recorded)
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
            seed=config_value(cfg, "seed", int),
            layer_ranges=layer_ranges,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid genome config: {exc}") from None


RESOLVED_BLOCKS = "resolved_blocks"  # config.yaml: the adaptive blocks a run uses, written at its first start


def genome_layer_ranges(g: dict, merger: Merger, budget: int | None = None, recorded: Any = None) -> list[tuple[int, int]] | None:
    """Explicit layer blocks of a genome config: ``layer_ranges`` as given, or with
    ``blocks: adaptive`` the ``n_blocks`` blocks segmented from the experts' per-layer
    task-vector norms (evomerge.search.blocks; ``n_blocks: auto`` chooses the count from the
    norms and ``budget``); None for uniform ``layer_groups``. ``recorded``: the run's
    ``resolved_blocks`` from its config.yaml, used as they are (a resume keeps its genome)."""
    blocks = g.get("blocks") or "uniform"
    if blocks not in ("uniform", "adaptive"):
        raise ConfigError(f"genome.blocks must be uniform or adaptive, got {blocks!r}")
    if g.get("layer_ranges"):
        try:
            return [(int(a), int(b)) for a, b in g["layer_ranges"]]
        except (TypeError, ValueError):
            raise ConfigError(f"genome.layer_ranges must be a list of [first, last] layer pairs, got {g['layer_ranges']!r}") from None
    if blocks == "uniform":
        return None
    from evomerge.search.blocks import adaptive_blocks, auto_block_count

    n_blocks = check_n_blocks(g.get("n_blocks", "auto"), merger.n_layers)
    norms = merger.layer_task_vector_norms()
    if isinstance(recorded, dict) and recorded.get("setting") == n_blocks and recorded.get("blocks"):
        kept = [(int(a), int(b)) for a, b in recorded["blocks"]]
        if adaptive_blocks(norms, len(kept)) != kept and not getattr(merger, "_warned_blocks", False):
            merger._warned_blocks = True
            print(f"warning: this evomerge cuts the pool's layers into other blocks than the run recorded ({kept}); the run keeps its recorded blocks",
                  file=sys.stderr, flush=True)
        return kept
    why: dict[str, Any] = {}
    if n_blocks == "auto":
        if budget is None:
            raise ConfigError("genome.n_blocks=auto needs the budget (search.max_evals)")
        count, why = auto_block_count(norms, budget)
    else:
        count = n_blocks
    ranges = adaptive_blocks(norms, count)
    merger.resolved_blocks = {"setting": n_blocks, "n_blocks": len(ranges), "blocks": [list(r) for r in ranges], **({"auto": why} if why else {})}
    if getattr(merger, "_announced_blocks", None) != ranges:  # once per run, not per stage/check
        merger._announced_blocks = ranges
        unused = g.get("layer_groups", 1)
        # a preset's or user's layer_groups does nothing here: say so rather than ignore it silently
        note = f" (genome.layer_groups={unused} is not used: genome.blocks=uniform for equal blocks)" if unused not in (None, 1) else ""
        chosen = f", chosen automatically from {why['max_blocks']} at most" if why else ""
        print(f"adaptive blocks ({len(ranges)}{chosen}): " + ", ".join(f"layers {a}-{b}" for a, b in ranges) + note, file=sys.stderr, flush=True)
    return ranges


def check_n_blocks(value: Any, n_layers: int | None = None) -> int | str:
    """``genome.n_blocks``: ``auto`` or a block count from 1 to the model's layers."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"genome.n_blocks must be auto or an integer, got {value!r}")
    if value < 1 or (n_layers is not None and value > n_layers):
        limit = f"the model's {n_layers} layers" if n_layers is not None else "the model's layer count"
        raise ConfigError(f"genome.n_blocks must be between 1 and {limit}, got {value}")
    return value


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


def check_objectives(cfg: DictConfig) -> list[FitnessTask]:
    """The objectives, before any model loads; none is a one-line hint at what to write."""
    objectives = fitness_tasks(OmegaConf.select(cfg, "fitness.objectives"), "fitness.objectives")
    if not objectives:
        hint = ""
        if OmegaConf.select(cfg, "modelpool.kind") != "toy_zoo":
            hint = (
                " -- your models need your tasks, e.g. fitness.objectives='[{name: arc, task: arc_easy, metric: \"acc,none\"}]' "
                "(lm-eval task names; your YAMLs via fitness.include_paths; see docs/own-models.md)"
            )
        raise ConfigError("fitness.objectives must list at least one task" + hint)
    return objectives


def open_session(cfg: DictConfig, run_dir: Path) -> Session:
    task_files = check_tasks(cfg)
    pool, experts, base = build_pool(cfg)  # cheap for paths (no weights loaded): its mistakes come first
    check_objectives(cfg)
    models = {"base": base, **{f"expert:{k}": v for k, v in experts.items()}}
    rundir.verify_inputs(run_dir, models, task_files, force=bool(OmegaConf.select(cfg, "force")))
    device = OmegaConf.select(cfg, "device") or "auto"
    merger = Merger(pool, device=device, offload=bool(OmegaConf.select(cfg, "offload")), table_size=table_size(cfg))
    check_weights_finite(merger)
    warn_zero_task_vectors(merger)
    genome = OmegaConf.to_container(cfg.genome, resolve=True) if OmegaConf.select(cfg, "genome") is not None else None
    if dfs.is_dfs(genome):  # candidates are layer paths over resident layers of the genome's models
        merger = dfs.path_merger(merger, genome, list(experts))
    objectives = fitness_tasks(OmegaConf.select(cfg, "fitness.objectives"), "fitness.objectives")
    extra = fitness_tasks(OmegaConf.select(cfg, "fitness.extra"), "fitness.extra")
    if OmegaConf.select(cfg, "fitness.extra_in_search") is False:
        extra = []  # recorded only by the test re-score (rescore_on_test reads fitness.extra itself)
    subset_size = OmegaConf.select(cfg, "fitness.subset_size")
    ctx = FitnessContext(
        merger.model,
        merger.tokenizer,
        objectives + extra,
        [t.name for t in objectives],
        split=str(OmegaConf.select(cfg, "fitness.split") or "validation"),
        subset_size=None if subset_size is None else config_value(cfg, "fitness.subset_size", int, positive=True),
        subset_seed=config_value(cfg, "fitness.subset_seed", int),
        batch_size=config_value(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
        run_dir=run_dir,
        merger=merger,
        seed=config_value(cfg, "seed", int),
    )
    fitness = build_estimator(OmegaConf.select(cfg, "fitness.estimator"), ctx)
    return Session(cfg, pool, experts, base, merger, fitness, [t.name for t in objectives])
