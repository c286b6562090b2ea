"""What ``evomerge.run`` needs for a data-flow search, kept out of run.py.

A genome config is a DFS one when its ``_target_`` is in ``evomerge.dfs``; it is built
with the pool's model names and layer count (``build_dfs_space``), and the session's
merger is wrapped in a ``PathMerger`` over the genome's models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from evomerge.errors import ConfigError, MergeError


def is_dfs(genome: Any) -> bool:
    return isinstance(genome, dict) and str(genome.get("_target_", "")).startswith("evomerge.dfs.")


def build_space(genome: dict[str, Any], n_layers: int, expert_names: Sequence[str]):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    pool_models = ["base", *(f"expert:{e}" for e in expert_names)]
    try:
        return instantiate(genome, pool_models=pool_models, n_layers=n_layers, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        message = str(cause or exc).splitlines()[0]
        if isinstance(cause, TypeError) and "unexpected keyword" in message:
            message = "unknown genome option " + message.split("argument")[-1].strip()
        raise ConfigError(f"invalid dfs genome config: {message}") from None


def path_merger(merger, genome: dict[str, Any], expert_names: Sequence[str]):
    """The session's merger for a DFS genome: resident layers of the genome's models."""
    from evomerge.dfs.model import PathMerger

    space = build_space(genome, merger.n_layers, expert_names)
    return PathMerger(merger, expert_names, space.layout.models, space.merged)


def export_path(path, merger, expert_names: Sequence[str], target: Path, pool_paths: dict[str, str]) -> Path:
    """Write ``path`` as an HF folder (+ ``evomerge_path.yaml``, + ``mergekit.yaml`` or
    ``mergekit.txt`` saying why not)."""
    from evomerge.dfs.export import save_path_model
    from evomerge.dfs.model import PathMerger

    pm = PathMerger(merger, expert_names, path.models, path.merged)
    save_path_model(pm, path, target)
    try:
        (target / "mergekit.yaml").write_text(path.to_mergekit_yaml(pool_paths))
    except MergeError as exc:
        (target / "mergekit.txt").write_text(f"not exported: {exc}\n")
    return target
