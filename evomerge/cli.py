"""Command line: ``evomerge [hydra overrides]`` runs a search; ``evomerge export run=DIR point=ID``
writes one archived candidate as an HF model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError
from evomerge.rundir import check_resume_target, run_suffix
from evomerge.run import export_point, raise_user_errors, run_search


def _first_not_null(value, default):
    return default if value in (None, "", "null") else value


if not OmegaConf.has_resolver("em_or"):
    OmegaConf.register_new_resolver("em_or", _first_not_null)
if not OmegaConf.has_resolver("em_suffix"):
    OmegaConf.register_new_resolver("em_suffix", run_suffix)


@hydra.main(config_path="pkg://evomerge.configs", config_name="config", version_base="1.3")
@raise_user_errors
def search_main(cfg: DictConfig) -> None:
    run_search(cfg, Path(HydraConfig.get().runtime.output_dir), overrides=list(HydraConfig.get().overrides.task))


@raise_user_errors
def export_main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a] + sorted(set(args) - {"run", "point", "out", "force"})
    if bad or "run" not in args or args.get("force", "false").lower() not in ("true", "false"):
        raise ConfigError("usage: evomerge export run=<run dir> [point=<id|knee|best_<objective>>] [out=<folder>] [force=true]")
    target = export_point(args["run"], args.get("point", "knee"), args.get("out"), force=args.get("force", "false").lower() == "true")
    print(f"exported to {target}")


@raise_user_errors
def check_resume_argument(argv: list[str]) -> None:
    """Hydra creates its run directory (hydra.run.dir = resume) before any of our code runs:
    a mistyped ``resume=`` must fail before that, leaving the folder it names untouched."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "resume" and value not in ("", "null"):
            check_resume_target(value)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        export_main(sys.argv[2:])
        return
    check_resume_argument(sys.argv[1:])
    search_main()


if __name__ == "__main__":
    main()
