"""Command line: ``evomerge [hydra overrides]`` runs a search; ``evomerge export run=DIR point=ID``
writes one archived candidate as an HF model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError
from evomerge.run import export_point, raise_user_errors, run_search


def _first_not_null(value, default):
    return default if value in (None, "", "null") else value


if not OmegaConf.has_resolver("em_or"):
    OmegaConf.register_new_resolver("em_or", _first_not_null)


@hydra.main(config_path="pkg://evomerge.configs", config_name="config", version_base="1.3")
@raise_user_errors
def search_main(cfg: DictConfig) -> None:
    run_search(cfg, Path(HydraConfig.get().runtime.output_dir))


@raise_user_errors
def export_main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a] + sorted(set(args) - {"run", "point", "out"})
    if bad or "run" not in args:
        raise ConfigError("usage: evomerge export run=<run dir> [point=<id|knee|best_<objective>>] [out=<folder>]")
    target = export_point(args["run"], args.get("point", "knee"), args.get("out"))
    print(f"exported to {target}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        export_main(sys.argv[2:])
        return
    search_main()


if __name__ == "__main__":
    main()
