"""Finding lm-eval task definitions and making their data paths absolute.

lm-eval resolves relative ``data_files`` against the current directory, not the YAML
file, so a task that works in the repo root breaks elsewhere. We load our YAMLs
ourselves, resolve relative paths against the YAML's folder and hand lm-eval a config
dict. The packaged ``fitness/`` folder (``evomerge.fitness_tasks``) is always searched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from evomerge.errors import ConfigError


def packaged_task_dir() -> Path:
    import evomerge.fitness_tasks

    return Path(evomerge.fitness_tasks.__file__).parent


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    path: Path
    config: dict[str, Any]
    custom_tags: bool = False  # uses !function etc.: lm-eval must load it by name

    def for_split(self, split: str) -> dict[str, Any]:
        """The config with absolute data paths, evaluating on ``split``."""
        cfg = copy.deepcopy(self.config)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            for key, value in files.items():
                p = Path(value)
                files[key] = str(p if p.is_absolute() else (self.path.parent / p).resolve())
                if not Path(files[key]).is_file():
                    raise ConfigError(f"fitness task '{self.name}': data file not found: {files[key]}")
        if split not in (cfg.get("test_split"), cfg.get("validation_split"), cfg.get("training_split")):
            raise ConfigError(f"fitness task '{self.name}' has no split named '{split}'")
        # lm-eval evaluates test_split when present, so point it at the split we want.
        cfg["test_split"] = split
        return cfg


class _TolerantLoader(yaml.SafeLoader):
    pass


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def find_tasks(names: Iterable[str], include_paths: Iterable[str | Path] = ()) -> dict[str, TaskDefinition]:
    """Locate the YAML of each named task in ``include_paths`` and the packaged folder."""
    wanted = list(names)
    dirs = [Path(p).expanduser() for p in include_paths] + [packaged_task_dir()]
    for d in dirs[:-1]:
        if not d.is_dir():
            raise ConfigError(f"fitness include path is not a folder: {d}")
    found: dict[str, TaskDefinition] = {}
    for d in dirs:
        for path in sorted(d.rglob("*.yaml")):
            try:
                cfg = yaml.load(path.read_text(), Loader=_TolerantLoader)
            except yaml.YAMLError:
                continue
            name = cfg.get("task") if isinstance(cfg, dict) else None
            if isinstance(name, str) and name in wanted and name not in found:
                found[name] = TaskDefinition(name, path, cfg, custom_tags="!" in path.read_text())
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ConfigError(
            f"fitness task '{missing[0]}' not found in {', '.join(str(d) for d in dirs)} "
            "(add its folder to fitness.include_paths)"
        )
    return found
