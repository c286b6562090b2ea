"""Up-front checks: configuration mistakes that would make every candidate fail are
reported before any model is loaded (or, for the weights, right after), in one line."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError, PoolError

DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


def check_config(cfg: DictConfig) -> None:
    dtype = OmegaConf.select(cfg, "dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pop = OmegaConf.select(cfg, "algorithm.pop_size")
    if pop is not None:
        if isinstance(pop, bool) or not isinstance(pop, int):
            raise ConfigError(f"algorithm.pop_size must be an integer, got {pop!r}")
        if pop < 2:
            raise ConfigError(f"algorithm.pop_size must be at least 2 (a population of {pop} cannot evolve), got {pop}")
    check_genome_ranges(cfg)


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
    return files


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
