"""Finding lm-eval tasks and loading them as lm-eval does, with three fixes.

Names resolve first in the user's ``fitness.include_paths``, then in the packaged toy
tasks (``evomerge.fitness_tasks``), then in lm-eval's own task registry (``arc_easy``,
``gsm8k``, groups such as ``mmlu``), with lm-eval's own YAML loader: ``include:`` and
``!function`` work as in lm-eval. Before a task is built we change three things in its
config and nothing else:

* relative ``data_files`` are resolved against the task's YAML folder (then the folders
  of the YAMLs it includes, then the working directory, which is all lm-eval tries), so a
  task works from any working directory;
* ``test_split`` is pointed at the split being scored (lm-eval evaluates ``test_split``);
* a dataset that cannot be loaded is one ``ConfigError`` line naming the task and the fix.

Group members named in the group's ``task:`` list get the same changes; a group can be an
objective when it defines ``aggregate_metric_list`` (its score is lm-eval's aggregate).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

TASK, GROUP, TAG, PYTHON = "task", "group", "tag", "python"
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")


def packaged_task_dir() -> Path:
    import evomerge.fitness_tasks

    return Path(evomerge.fitness_tasks.__file__).parent


def registry_dir() -> Path:
    """lm-eval's own task folder (its registry)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


@functools.lru_cache(maxsize=2)
def _registry_index(root: str) -> dict[str, Any]:
    """lm-eval's index of its own tasks (~15k YAMLs, several seconds: built once a process)."""
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([Path(root)])


@dataclass(frozen=True)
class TaskDefinition:
    """One name as lm-eval indexes it. ``config`` is the YAML with its includes merged and
    ``!function`` references left as strings (for checks; loading imports them)."""

    name: str
    path: Path | None
    config: dict[str, Any]
    kind: str = TASK
    members: tuple[str, ...] = ()  # leaf tasks of a group or tag
    files: tuple[Path, ...] = ()  # YAMLs, !function modules and local data files (fingerprinted)
    from_registry: bool = False
    custom_tags: bool = False  # uses !function: metric names may be decided by code

    def splits(self) -> list[str]:
        return sorted({str(self.config[k]) for k in SPLIT_KEYS if self.config.get(k)})

    def for_split(self, split: str) -> dict[str, Any]:
        """The loadable config (functions imported, data paths absolute) scoring ``split``."""
        if self.kind != TASK or self.path is None:
            raise ConfigError(f"fitness task '{self.name}' is a {self.kind}, not a single task")
        from lm_eval.tasks._yaml_loader import load_yaml

        try:
            cfg = copy.deepcopy(load_yaml(self.path, resolve_func=True))
        except (ImportError, AttributeError, OSError, ValueError, SyntaxError, yaml.YAMLError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"fitness task '{self.name}' ({self.path}): lm-eval could not read it ({type(exc).__name__}: {first})") from None
        kwargs = cfg.get("dataset_kwargs")
        if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
            kwargs["data_files"] = _absolute_data_files(self, kwargs["data_files"])
        if split not in self.splits():
            have = ", ".join(self.splits()) or "none"
            raise ConfigError(
                f"fitness task '{self.name}' has no split named '{split}' (it has: {have}); set fitness.split, "
                "or add the split to the task's YAML"
            )
        # lm-eval evaluates test_split, else validation_split. Change the config only when that
        # is not ``split``: even a no-op change alters lm-eval's few-shot draws (it treats
        # fewshot_split == test_split, both unset, as "may draw the doc itself": one more draw).
        if (cfg.get("test_split") or cfg.get("validation_split")) != split:
            cfg["test_split"] = split
        return cfg


def _search_folders(d: TaskDefinition) -> list[Path]:
    folders = [d.path.parent] if d.path is not None else []
    folders += [f.parent for f in d.files if f.suffix == ".yaml" and f.parent not in folders]
    return folders + [Path.cwd()]


def _absolute_data_files(d: TaskDefinition, files: Any) -> Any:
    if isinstance(files, dict):
        return {k: _absolute_data_files(d, v) for k, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute_data_files(d, v) for v in files]
    p = Path(str(files)).expanduser()
    if p.is_absolute() or "://" in str(files) or any(c in str(files) for c in "*?["):
        return str(files)
    candidates = [(folder / p).resolve() for folder in _search_folders(d)]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise ConfigError(f"fitness task '{d.name}': data file not found: {candidates[0]} (paths are relative to the task's YAML)")


def data_files_of(d: TaskDefinition) -> list[Path]:
    """The task's local data files (absolute), for fingerprinting; none for hub datasets."""
    files = (d.config.get("dataset_kwargs") or {}).get("data_files") if isinstance(d.config.get("dataset_kwargs"), dict) else None
    if files is None or d.kind != TASK:
        return []
    try:
        resolved = _absolute_data_files(d, files)
    except ConfigError:
        return []
    flat: list[str] = []
    stack = [resolved]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            flat.append(str(v))
    return sorted(Path(v) for v in flat if Path(v).is_file())


class _TolerantLoader(yaml.SafeLoader):
    """Reads YAMLs with lm-eval's tags without acting on them (syntax checks)."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _yaml_chain(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """``path`` and the YAMLs it includes (recursively)."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_TolerantLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return [path]
    out = [path]
    inc = raw.get("include") if isinstance(raw, dict) else None
    for item in inc if isinstance(inc, list) else [inc] if inc else []:
        p = Path(str(item))
        out += _yaml_chain(p if p.is_absolute() else path.parent / p, seen)
    return out


def _function_modules(chain: list[Path]) -> tuple[list[Path], bool]:
    """The ``utils.py``-style modules named by ``!function`` in ``chain`` (and whether any)."""
    modules: list[Path] = []
    uses = False
    for y in chain:
        text = y.read_text(errors="replace")
        for line in text.splitlines():
            if "!function" not in line:
                continue
            uses = True
            ref = line.split("!function", 1)[1].strip().strip("'\"")
            mod = ref.rpartition(".")[0]
            candidate = (y.parent / f"{mod.replace('.', '/')}.py").resolve()
            if mod and candidate.is_file() and candidate not in modules:
                modules.append(candidate)
    return modules, uses


class TaskCatalog:
    """The task index for one run: the user's folders, the packaged toy tasks and, when a
    name is not found there, lm-eval's registry (later folders override earlier ones,
    user folders last, as in lm-eval)."""

    def __init__(self, include_paths: Iterable[str | Path] = (), registry_root: Path | None = None):
        self.user_dirs = [Path(p).expanduser() for p in include_paths]
        for d in self.user_dirs:
            if not d.is_dir():
                raise ConfigError(f"fitness include path is not a folder: {d}")
        self.dirs = [packaged_task_dir(), *self.user_dirs]
        self.registry_root = registry_root or registry_dir()
        self.with_registry = False
        self.manager = self._make_manager(False)
        self._definitions: dict[str, TaskDefinition] = {}  # from the index as built, before any patching

    def _make_manager(self, with_registry: bool):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=[str(d) for d in self.dirs], include_defaults=False)
        if with_registry:
            own = dict(manager.task_index)
            manager.task_index.clear()
            manager.task_index.update(copy.copy(_registry_index(str(self.registry_root))))
            manager.task_index.update(own)  # the user's and packaged tasks win, as in lm-eval
        return manager

    @property
    def index(self) -> dict[str, Any]:
        return self.manager.task_index

    def find(self, names: Iterable[str]) -> dict[str, TaskDefinition]:
        wanted = list(dict.fromkeys(names))
        if any(n not in self.index for n in wanted) and not self.with_registry:
            self.manager = self._make_manager(True)
            self.with_registry = True
        missing = [n for n in wanted if n not in self.index]
        if missing:
            raise ConfigError(
                f"fitness task '{missing[0]}' not found in {', '.join(str(d) for d in self.dirs)} nor in lm-eval's task "
                "registry (add its folder to fitness.include_paths; `lm-eval ls tasks` lists the registry)"
            )
        return {n: self.definition(n) for n in wanted}

    def definition(self, name: str, _seen: frozenset[str] = frozenset()) -> TaskDefinition:
        if name not in self._definitions:
            self._definitions[name] = self._define(name, _seen)
        return self._definitions[name]

    def _define(self, name: str, _seen: frozenset[str]) -> TaskDefinition:
        from lm_eval.tasks._index import Kind

        entry = self.index[name]
        path = Path(entry.yaml_path) if entry.yaml_path else None
        from_registry = path is not None and _is_under(path, self.registry_root)
        if entry.kind == Kind.TAG:
            members = tuple(sorted(entry.tags))
            return TaskDefinition(name, None, {}, TAG, members, self._files_of(members, _seen | {name}), from_registry)
        chain = _yaml_chain(path) if path is not None else []
        modules, uses_functions = _function_modules(chain)
        cfg = copy.deepcopy(entry.cfg or {})
        if entry.kind == Kind.GROUP:
            members = tuple(self._group_leaves(name, cfg, _seen | {name}))
            files = tuple(dict.fromkeys([*chain, *modules, *self._files_of(members, _seen | {name})]))
            return TaskDefinition(name, path, cfg, GROUP, members, files, from_registry, uses_functions)
        kind = PYTHON if entry.kind == Kind.PY_TASK else TASK
        d = TaskDefinition(name, path, cfg, kind, (), tuple([*chain, *modules]), from_registry, uses_functions)
        return TaskDefinition(name, path, cfg, kind, (), tuple([*chain, *modules, *data_files_of(d)]), from_registry, uses_functions)

    def _group_leaves(self, group: str, cfg: dict[str, Any], seen: frozenset[str]) -> list[str]:
        out: list[str] = []
        for item in cfg.get("task") or []:
            ref = item if isinstance(item, str) else (item.get("task") or item.get("group")) if isinstance(item, dict) else None
            if not isinstance(ref, str):
                continue
            if ref in self.index and ref not in seen:
                d = self.definition(ref, seen)
                out += list(d.members) if d.kind in (GROUP, TAG) else [ref]
            elif isinstance(item, dict) and "group" in item:
                out += self._group_leaves(f"{group}::{ref}", item, seen)
            else:
                out.append(f"{group}::{ref}")  # an inline task: lm-eval namespaces it
        return out

    def _files_of(self, members: Iterable[str], seen: frozenset[str]) -> tuple[Path, ...]:
        files: list[Path] = []
        for m in members:
            if m in self.index and m not in seen:
                files += list(self.definition(m, seen).files)
        return tuple(dict.fromkeys(files))

    def load(self, names: Iterable[str], split: str) -> dict[str, Any]:
        """lm-eval's ``TaskManager.load`` of ``names`` (tasks, groups, tags) scoring ``split``:
        ``{"tasks": {leaf: Task}, "groups": {name: Group}, "group_map": ...}``."""
        wanted = list(dict.fromkeys(names))
        definitions = self.find(wanted)
        for d in definitions.values():
            self._patch(d, split, frozenset())
        tasks: dict[str, Any] = {}
        groups: dict[str, Any] = {}
        group_map: dict[str, list[str]] = {}
        for name in wanted:
            try:
                loaded = self.manager.load([name])
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 -- lm-eval and datasets raise many kinds
                raise ConfigError(load_error_line(name, definitions[name], exc)) from None
            tasks.update(loaded["tasks"])
            groups.update(loaded.get("groups") or {})
            group_map.update(loaded.get("group_map") or {})
        return {"tasks": tasks, "groups": groups, "group_map": group_map}

    def _patch(self, d: TaskDefinition, split: str, seen: frozenset[str]) -> None:
        """Replace the index entries of ``d`` (and of a group's or tag's members) by loadable
        configs scoring ``split`` with absolute data paths."""
        from lm_eval.tasks._index import Entry, Kind

        if d.name in seen:
            return
        if d.kind == TASK and d.path is not None:
            entry = self.index[d.name]
            self.index[d.name] = Entry(d.name, Kind.TASK, None, d.for_split(split), set(entry.tags))
        elif d.kind == PYTHON:
            log.warning("task %s is a Python task: lm-eval loads it as written (its own split)", d.name)
        elif d.kind in (GROUP, TAG):
            refs = sorted(self.index[d.name].tags) if d.kind == TAG else _group_refs(d.config)
            for ref in refs:
                if ref in self.index:
                    self._patch(self.definition(ref), split, seen | {d.name})


def _group_refs(cfg: dict[str, Any]) -> list[str]:
    out = []
    for item in cfg.get("task") or []:
        ref = item if isinstance(item, str) else (item.get("task") or item.get("group")) if isinstance(item, dict) else None
        if isinstance(ref, str):
            out.append(ref)
    return out


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


OFFLINE_VARS = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline_mode() -> list[str]:
    """The offline variables the user has set (to 1/true/yes/on)."""
    return [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]


def load_error_line(name: str, d: TaskDefinition, exc: BaseException) -> str:
    """One line for a task lm-eval could not build: which task, why, and the fix."""
    reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
    dataset = d.config.get("dataset_path") if d.kind == TASK else None
    what = f"its dataset '{dataset}'" if dataset else "a dataset it needs"
    if _is_dataset_error(exc):
        offline = offline_mode()
        if offline:
            many = len(offline) > 1
            fix = (
                f"{' and '.join(offline)} {'are' if many else 'is'} set, so only datasets already in the local Hugging Face "
                f"cache load: unset {'them' if many else 'it'} for one run with network (the download is cached), "
                "or point dataset_path/data_files at local files"
            )
        else:
            fix = "check the network and the task's dataset_path/dataset_name, or point data_files at local files"
        return f"fitness task '{name}': {what} could not be loaded ({reason}); {fix}"
    return f"fitness task '{name}': lm-eval could not build it ({reason}); check the task's YAML ({d.path or 'registry'})"


def _is_dataset_error(exc: BaseException) -> bool:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__ or ""
        if module.split(".")[0] in ("datasets", "huggingface_hub", "requests", "urllib3", "httpx", "fsspec"):
            return True
        if isinstance(e, (ConnectionError, TimeoutError, FileNotFoundError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def find_tasks(names: Iterable[str], include_paths: Iterable[str | Path] = ()) -> dict[str, TaskDefinition]:
    """Locate each named task, group or tag (see ``TaskCatalog``)."""
    return TaskCatalog(include_paths).find(names)
