"""Plugins the Python way: what a user's installed package adds, found through entry points.

- ``evomerge.methods``: a module that registers merge methods on import (``register(...)``), or
  a ``MergeMethod``, or a callable returning one or a list of them. Loaded the first time a
  method name is not in the registry, in every process (Ray workers too).
- ``evomerge.configs``: a package holding Hydra config groups (``algorithm/``, ``genome/``,
  ``modelpool/``, ``fitness/``, ``executor/``, ``experiment/``); each is added to the config
  search path, so ``algorithm=my_algo`` finds ``my_pkg/configs/algorithm/my_algo.yaml``, whose
  ``_target_`` can name any importable class or function.

A plugin that fails to load is one warning line naming it; the others still load.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

METHODS_GROUP = "evomerge.methods"
CONFIGS_GROUP = "evomerge.configs"
_loaded: set[str] = set()


def entry_points(group: str) -> list[Any]:
    try:
        return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)
    except Exception:  # noqa: BLE001 -- broken distribution metadata must not stop a run
        return []


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_methods() -> list[str]:
    """Load every ``evomerge.methods`` entry point once; returns the names loaded now."""
    from evomerge.merge.methods import REGISTRY, MergeMethod, register

    done = []
    for ep in entry_points(METHODS_GROUP):
        key = f"{ep.name}={ep.value}"
        if key in _loaded:
            continue
        _loaded.add(key)
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, MergeMethod) and not hasattr(obj, "__path__"):
                obj = obj()
            for method in obj if isinstance(obj, (list, tuple)) else [obj]:
                if isinstance(method, MergeMethod) and method.name not in REGISTRY:
                    register(method)
        except Exception as exc:  # noqa: BLE001 -- one plugin's fault is one line
            _warn(f"merge-method plugin {ep.name} ({ep.value}) could not be loaded: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        done.append(ep.name)
    return done


def config_search_path() -> list[str]:
    """``pkg://`` search-path entries of the installed ``evomerge.configs`` plugins."""
    paths = []
    for ep in entry_points(CONFIGS_GROUP):
        module = ep.value.split(":")[0].strip()
        if module:
            paths.append(f"pkg://{module}")
    return paths
