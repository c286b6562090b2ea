"""Up-front checks: configuration mistakes that would make every candidate fail are
reported before any model is loaded (or, for the weights, right after), in one line."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError, PoolError

DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


SEED_MAX = 2**32 - 1  # numpy's legacy seeding (pymoo) takes 0 .. 2**32 - 1
MAX_POP_SIZE = 10_000  # pymoo's duplicate check holds pop_size**2 distances in memory
DEVICE_TYPES = ("cpu", "cuda")


def check_config(cfg: DictConfig) -> None:
    """Every numeric option, the dtype, the device, the genome ranges and the score cache:
    a mistake is one line here, before any model loads, not a traceback later."""
    check_setup(cfg)
    dtype = OmegaConf.select(cfg, "dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    searched = OmegaConf.select(cfg, "fitness.test_rescore_searched")
    if searched is not None and not isinstance(searched, bool):
        raise ConfigError(f"fitness.test_rescore_searched must be true or false, got {searched!r}")
    check_numbers(cfg)
    from evomerge.confirmation import confirm_settings
    from evomerge.session import check_n_blocks

    confirm_settings(cfg)
    if OmegaConf.select(cfg, "genome.n_blocks") is not None:
        check_n_blocks(OmegaConf.select(cfg, "genome.n_blocks"))
    check_device(OmegaConf.select(cfg, "device"))
    check_genome_ranges(cfg)
    from evomerge.score_cache import cache_folder

    cache_folder()  # $EVOMERGE_SCORE_CACHE must be a folder (or creatable)


def check_setup(cfg: DictConfig) -> None:
    """A preset that reads files made by a script names them in ``setup.folder`` and the script in
    ``setup.command``: when the folder is missing, say which command makes it (not which of its
    files was looked for first)."""
    folder = OmegaConf.select(cfg, "setup.folder")
    if folder and not Path(str(folder)).expanduser().is_dir():
        command = OmegaConf.select(cfg, "setup.command") or "the preset's setup script"
        key = OmegaConf.select(cfg, "setup.key")
        elsewhere = f" (or {key}=<folder> where they are)" if key else ""
        raise ConfigError(f"this experiment reads models and tasks from {folder}, which does not exist: make them first with `{command}`{elsewhere}")


def integer(cfg: DictConfig, key: str, low: int | None = None, high: int | None = None, optional: bool = False) -> int | None:
    """``cfg.key`` as an int within [low, high]; floats with a fraction, booleans and text are
    refused by name (``int(1.5)`` would silently be 1)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config value '{key}' is missing")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{key} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be at most {high}, got {value}")
    return value


def check_numbers(cfg: DictConfig) -> None:
    stages = OmegaConf.select(cfg, "search.stages")
    n_stages = len(stages) if OmegaConf.is_list(stages) else 1
    if OmegaConf.select(cfg, "seed") is not None:  # stage i is seeded with seed + i
        integer(cfg, "seed", 0, SEED_MAX - (n_stages - 1))
    max_evals = integer(cfg, "search.max_evals", 1, optional=True)
    integer(cfg, "fitness.subset_size", 1, optional=True)
    integer(cfg, "fitness.subset_seed", 0, SEED_MAX, optional=True)
    integer(cfg, "fitness.batch_size", 1, optional=True)
    integer(cfg, "fitness.max_length", 1, optional=True)
    pops = [("algorithm.pop_size", OmegaConf.select(cfg, "algorithm.pop_size"))]
    for i, stage in enumerate(list(stages) if OmegaConf.is_list(stages) else []):
        pops.append((f"search.stages[{i}].algorithm.pop_size", OmegaConf.select(stage, "algorithm.pop_size") if isinstance(stage, DictConfig) else None))
    model_based = is_model_based(OmegaConf.select(cfg, "algorithm._target_"))
    for key, pop in pops:
        if pop is None:
            continue
        # a model-based search proposes pop_size candidates per round from its model: 1 is a
        # valid round; an evolutionary population of 1 cannot recombine
        least = 1 if model_based and key == "algorithm.pop_size" else 2
        if isinstance(pop, bool) or not isinstance(pop, int) or pop < least:
            why = "candidates per round of the model" if least == 1 else "a population smaller than 2 cannot evolve"
            raise ConfigError(f"{key} must be an integer of at least {least} ({why}), got {pop!r}")
        if pop > MAX_POP_SIZE:
            raise ConfigError(
                f"{key}={pop} is too large (at most {MAX_POP_SIZE}: the algorithm keeps pop_size² distances in memory)"
                + (f"; with search.max_evals={max_evals} at most {max_evals} candidates are evaluated anyway" if max_evals else "")
            )
        if max_evals is not None and pop > max_evals and key == "algorithm.pop_size" and n_stages == 1:
            print(f"note: {key}={pop} is larger than search.max_evals={max_evals}: only the first {max_evals} candidates of the first "
                  "generation are evaluated (raise the budget on resume to continue)", file=sys.stderr, flush=True)
    if model_based:
        check_model_based(cfg, max_evals)
    ref = OmegaConf.select(cfg, "search.ref_point")
    if ref is not None:
        values = OmegaConf.to_container(ref) if OmegaConf.is_list(ref) else ref
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ConfigError(f"search.ref_point must be a list of finite numbers (losses, 1 - score), got {values!r}")
        n_obj = len(OmegaConf.select(cfg, "fitness.objectives") or [])
        if n_obj and len(values) != n_obj:
            raise ConfigError(f"search.ref_point has {len(values)} values for {n_obj} objectives")


# the model-based strategies (their factories' import paths) and their integer settings
MODEL_BASED_TARGETS = ("evomerge.search.bayes.bo", "evomerge.search.surrogate.map_search")
MODEL_INTEGERS = {"num_restarts": 1, "raw_samples": 1, "mc_samples": 1, "maxiter": 1, "nsga_pop": 2, "nsga_gen": 1}


def is_model_based(target: Any) -> bool:
    return isinstance(target, str) and target in MODEL_BASED_TARGETS


def check_model_based(cfg: DictConfig, max_evals: int | None) -> None:
    """``algorithm.n_init`` and the acquisition settings of bo / map, before any model loads."""
    n_init = OmegaConf.select(cfg, "algorithm.n_init")
    if n_init is not None or OmegaConf.select(cfg, "algorithm._target_") == MODEL_BASED_TARGETS[0]:
        value = integer(cfg, "algorithm.n_init", 0, optional=True)
        if value is not None and max_evals is not None and value >= max_evals:
            # a note, not an error: small test budgets with the default n_init are legitimate
            print(f"note: algorithm.n_init={value} is at least the budget (search.max_evals={max_evals}): every candidate is a "
                  "space-filling (Sobol) point and the model proposes none; lower n_init or raise the budget for a model-based search",
                  file=sys.stderr, flush=True)
    for key, least in MODEL_INTEGERS.items():
        if OmegaConf.select(cfg, f"algorithm.{key}") is not None:
            integer(cfg, f"algorithm.{key}", least)
    acquisition = OmegaConf.select(cfg, "algorithm.acquisition")
    if acquisition is not None:
        from evomerge.search.bayes import ACQUISITIONS

        if acquisition not in ACQUISITIONS:
            raise ConfigError(f"algorithm.acquisition must be one of {', '.join(ACQUISITIONS)}, got {acquisition!r}")
    alpha = OmegaConf.select(cfg, "algorithm.partitioning_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < 1.0):
        raise ConfigError(f"algorithm.partitioning_alpha must be a number in [0, 1) or null, got {alpha!r}")


def check_device(device: Any) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` naming a GPU that is there."""
    if device in (None, "", "auto"):
        return
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no GPU is available here (use device=cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def check_genome_ranges(cfg: DictConfig) -> None:
    """Each genome range must lie within the bounds of every method that uses the parameter."""
    from evomerge.merge.methods import get_method

    genome = OmegaConf.to_container(cfg.genome, resolve=True) if OmegaConf.select(cfg, "genome") is not None else {}
    if not isinstance(genome, dict):
        return
    ranges = genome.get("ranges") or {}
    if not isinstance(ranges, dict):
        raise ConfigError(f"genome.ranges must map parameter names to [low, high], got {ranges!r}")
    for name, bounds in ranges.items():
        try:
            lo, hi = (float(v) for v in bounds)
        except (TypeError, ValueError):
            raise ConfigError(f"genome.ranges.{name} must be [low, high], got {bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigError(f"genome.ranges.{name} must be finite, got {[lo, hi]}")
        for method in genome.get("methods") or []:
            try:
                spec = get_method(str(method)).spec(str(name))
            except KeyError:
                continue  # this method has no such parameter
            except Exception:  # noqa: BLE001 -- unknown methods are reported by the genome itself
                continue
            if lo < spec.low or hi > spec.high:
                raise ConfigError(
                    f"genome.ranges.{name}={[lo, hi]} is outside what merge method '{method}' accepts "
                    f"([{spec.low}, {spec.high}]); every candidate would fail"
                )


def _task_entries(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where in ("fitness.objectives", "fitness.extra"):
        for item in OmegaConf.select(cfg, where) or []:
            entry = OmegaConf.to_container(item, resolve=True) if isinstance(item, DictConfig) else item
            if isinstance(entry, dict):
                out.append((where, entry))
    return out


def check_tasks(cfg: DictConfig) -> dict[str, list[Path]]:
    """Find every fitness task (the user's folders, the packaged tasks, lm-eval's registry),
    check it (kind, output type, metric, splits) and return its files (YAMLs, ``!function``
    modules, local data) for fingerprinting."""
    from evomerge.estimators.tasks import GROUP, TAG, TASK, TaskCatalog, packaged_task_dir

    entries = _task_entries(cfg)
    names = {str(e["task"]) for _, e in entries if "task" in e}
    if not names:
        return {}
    include = [str(p) for p in (OmegaConf.select(cfg, "fitness.include_paths") or [])]
    try:
        catalog = TaskCatalog(include)
        found = catalog.find(sorted(names))
    except ConfigError as exc:
        broken = _broken_yamls([Path(p).expanduser() for p in include] + [packaged_task_dir()])
        if broken:
            path, err = broken[0]
            missing = str(exc).split("'")[1] if str(exc).count("'") >= 2 else "?"
            raise ConfigError(f"fitness task '{missing}' not found: {path} has a YAML syntax error ({err}) -- is that the task's file?") from None
        raise
    splits = [str(OmegaConf.select(cfg, "fitness.split") or "validation")]
    if OmegaConf.select(cfg, "fitness.test_rescore") not in (None, False):
        splits.append("test")
    files: dict[str, list[Path]] = {}
    for where, entry in entries:
        d = found.get(str(entry.get("task")))
        if d is None:
            continue
        if d.kind == TAG:
            raise ConfigError(f"{where}: '{d.name}' is a tag (a list of tasks, no aggregate score): name one of its tasks ({', '.join(d.members[:5])}, ...)")
        if d.kind == GROUP:
            if not d.config.get("aggregate_metric_list"):
                raise ConfigError(
                    f"{where}: '{d.name}' is a group without aggregate_metric_list, so it has no score: "
                    f"name one of its tasks ({', '.join(d.members[:5])}, ...) or add aggregate_metric_list to its YAML"
                )
            leaves = [catalog.definition(m) for m in d.members if m in catalog.index]
        else:
            leaves = [d]
            output_type = d.config.get("output_type")
            if output_type is not None and output_type not in OUTPUT_TYPES:
                raise ConfigError(f"fitness task '{d.name}' ({d.path}): output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
            _check_metric(where, entry, d)
        for leaf in leaves:
            for split in splits:
                if leaf.kind == TASK and split not in leaf.splits():
                    why = "fitness.split" if split == splits[0] else "the final re-score on the test split (fitness.test_rescore)"
                    fix = "set fitness.split" if split == splits[0] else "set fitness.test_rescore=false"
                    raise ConfigError(
                        f"fitness task '{leaf.name}' has no split named '{split}', needed by {why} "
                        f"(it has: {', '.join(leaf.splits()) or 'none'}); {fix} or add the split to the task's YAML"
                    )
        files[d.name] = list(d.files)
    check_registry_data(catalog, found, include, splits[0])
    return files


def check_registry_data(catalog: Any, found: dict[str, Any], include: list[str], split: str) -> None:
    """Tasks from lm-eval's registry (not the user's folders, not the packaged toy tasks) load
    their data now, before any model: a dataset that cannot be loaded (offline, not cached, a
    gated hub dataset) is one line here instead of after the models loaded. Local tasks' data
    are files the checks above already found."""
    from evomerge.estimators.tasks import _is_under, packaged_task_dir

    roots = [Path(p).expanduser().resolve() for p in include] + [packaged_task_dir().resolve()]
    registry = sorted(n for n, d in found.items() if d.path is None or not any(_is_under(Path(d.path).resolve(), r) for r in roots))
    if registry:
        catalog.load(registry, split)  # ConfigError: one line naming the task, the dataset and the fix


def _check_metric(where: str, entry: dict[str, Any], d: Any) -> None:
    metric = str(entry.get("metric", ""))
    metric_list = d.config.get("metric_list")
    if d.custom_tags or not isinstance(metric_list, list):
        return  # lm-eval's defaults or code decide; the reference evaluation catches the rest
    names = {str(m.get("metric")) for m in metric_list if isinstance(m, dict)}
    if d.config.get("output_type") == "multiple_choice":
        names.add("acc_norm")
    filters = {str(f.get("name")) for f in d.config.get("filter_list") or [] if isinstance(f, dict)} or {"none"}
    available = sorted(f"{m},{f}" for m in names for f in filters)
    if metric not in available:
        raise ConfigError(
            f"{where}: task '{d.name}' has no metric {metric!r} (entry '{entry.get('name')}'); available: {', '.join(available)}"
        )


def _broken_yamls(dirs: list[Path]) -> list[tuple[Path, str]]:
    from evomerge.estimators.tasks import _TolerantLoader

    out = []
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.rglob("*.yaml")):
            try:
                yaml.load(path.read_text(), Loader=_TolerantLoader)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f"line {mark.line + 1}: " if mark is not None else ""
                out.append((path, where + str(getattr(exc, "problem", None) or exc).splitlines()[0]))
            except (OSError, UnicodeDecodeError) as exc:
                out.append((path, str(exc)))
    return out


def check_weights_finite(merger: Any) -> None:
    """Non-finite base or expert weights make every merge fail: name the model and tensor."""
    import torch

    names = ["base"] + [f"expert '{e.name}'" for e in merger.pool.experts]
    by_unit: dict[int, list[tuple[str, int, int]]] = {}
    for pname, (u, start, size) in merger._param_slices.items():
        by_unit.setdefault(u, []).append((pname, start, size))
    for u, buffers in enumerate(merger._units):
        g = buffers.group
        rows = [g.base] + [g.deltas[i] for i in range(g.deltas.shape[0])]
        for who, row in zip(names, rows):
            if bool(torch.isfinite(row).all()):
                continue
            bad = int((~torch.isfinite(row)).nonzero()[0, 0])
            tensor = next((n for n, s, k in by_unit.get(u, []) if s <= bad < s + k), buffers.unit.name)
            raise PoolError(f"{who} has non-finite weights (NaN or inf) in {tensor}; every merge with it would fail")


ZERO_TASK_VECTOR = 1e-6  # ||expert - base|| / ||base|| below this: the expert adds nothing


def warn_zero_task_vectors(merger: Any) -> list[str]:
    """Warn (once per expert) when an expert's task vector is zero or nearly so -- e.g. the
    base listed as an expert: every merge weight on it is then wasted search space."""
    import torch

    n = len(merger.pool.experts)
    delta_sq = [0.0] * n
    base_sq = 0.0
    for buffers in merger._units:  # norms in place, row by row: no copy of a unit's task vectors
        deltas = buffers.host_deltas if buffers.host_deltas is not None else buffers.group.deltas
        for i in range(n):
            delta_sq[i] += float(torch.linalg.vector_norm(deltas[i])) ** 2
        base_sq += float(torch.linalg.vector_norm(buffers.group.base)) ** 2
    scale = math.sqrt(base_sq) or 1.0
    zero = []
    for expert, sq in zip(merger.pool.experts, delta_sq):
        relative = math.sqrt(sq) / scale
        if relative < ZERO_TASK_VECTOR:
            zero.append(expert.name)
            print(f"warning: expert '{expert.name}' is (nearly) identical to the base (task vector norm {relative:.1e} of the base's): "
                  "merging it changes nothing -- is it the base model itself?", file=sys.stderr, flush=True)
    return zero
