"""Command line: ``evomerge [hydra overrides]`` runs a search; ``evomerge export run=DIR point=ID``
writes one archived candidate as an HF model folder; ``evomerge report run=DIR`` writes the
run's interactive report.html; ``evomerge compare runs=[A,B,...]`` compares runs; ``evomerge reproduce run=DIR`` runs a
recorded search again and compares it record by record.

Heavy modules (torch, transformers, lm-eval) are imported inside the commands, so
``evomerge --help`` and shell completion (which run this module) answer in about a second."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError, raise_user_errors
from evomerge.rundir import check_resume_target, run_suffix


def _first_not_null(value, default):
    return default if value in (None, "", "null") else value


if not OmegaConf.has_resolver("em_or"):
    OmegaConf.register_new_resolver("em_or", _first_not_null)
if not OmegaConf.has_resolver("em_suffix"):
    OmegaConf.register_new_resolver("em_suffix", run_suffix)


@hydra.main(config_path="pkg://evomerge.configs", config_name="config", version_base="1.3")
@raise_user_errors
def search_main(cfg: DictConfig) -> None:
    from evomerge.run import run_search

    run_search(cfg, Path(HydraConfig.get().runtime.output_dir), overrides=list(HydraConfig.get().overrides.task))


@raise_user_errors
def export_main(argv: list[str]) -> None:
    usage = "evomerge export run=<run dir> [point=<id|knee|best_<objective>>] [out=<folder>] [force=true] [verify=true] [push_to_hub=<user>/<repo>]"
    args = _key_values(argv, {"run", "point", "out", "force", "verify", "push_to_hub"}, {"run"}, usage)
    flags = [args.get(f, "false").lower() for f in ("force", "verify")]
    if any(f not in ("true", "false") for f in flags):
        raise ConfigError(f"usage: {usage}")
    from evomerge.run import export_point

    target = export_point(args["run"], args.get("point", "knee"), args.get("out"), force=flags[0] == "true", verify=flags[1] == "true",
                          push_to_hub=args.get("push_to_hub"))
    print(f"exported to {target}")


@raise_user_errors
def check_resume_argument(argv: list[str]) -> None:
    """Hydra creates its run directory (hydra.run.dir = resume) before any of our code runs:
    a mistyped ``resume=`` must fail before that, leaving the folder it names untouched."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "resume" and value not in ("", "null"):
            check_resume_target(value)


def _key_values(argv: list[str], allowed: set[str], required: set[str], usage: str) -> dict[str, str]:
    if "-h" in argv or "--help" in argv:
        print(f"usage: {usage}")
        raise SystemExit(0)
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a] + sorted(set(args) - allowed)
    if bad or not required <= set(args):
        raise ConfigError(f"usage: {usage}")
    return args


@raise_user_errors
def report_main(argv: list[str]) -> None:
    from evomerge.report import write_run_report

    args = _key_values(argv, {"run", "out"}, {"run"}, "evomerge report run=<run dir> [out=<file.html or folder>]")
    print(f"report written to {write_run_report(args['run'], out=args.get('out'))}")


@raise_user_errors
def compare_main(argv: list[str]) -> None:
    from evomerge.report.compare import compare_runs, expand_runs

    usage = "evomerge compare runs=[<run dir>,...]|'<glob>' [budget=<evaluations>] [labels=[<name>,...]] [out=<folder>]"
    args = _key_values(argv, {"runs", "budget", "labels", "out"}, {"runs"}, usage)
    try:
        budget = int(args["budget"]) if args.get("budget") not in (None, "", "null") else None
    except ValueError:
        raise ConfigError(f"budget must be an integer, got {args['budget']!r}") from None
    labels = expand_labels(args["labels"]) if "labels" in args else None
    out = Path(args.get("out", "."))
    compare_runs(expand_runs(args["runs"]), out=out, budget=budget, labels=labels)
    print((out / "compare.md").read_text(), end="")
    print(f"comparison written to {out / 'compare.html'}, {out / 'compare.md'}, {out / 'compare.png'}")


def expand_labels(text: str) -> list[str]:
    """``[a,b]`` or ``a,b``; quote a label that holds a comma: ``['x, y',z]``."""
    import yaml

    try:
        items = yaml.safe_load(text if text.strip().startswith("[") else f"[{text}]")
    except yaml.YAMLError:
        items = None
    if isinstance(items, list) and all(isinstance(i, (str, int, float)) for i in items):
        return [str(i) for i in items]
    return [s.strip().strip("'\"") for s in text.strip().strip("[]").split(",") if s.strip()]


@raise_user_errors
def reproduce_main(argv: list[str]) -> None:
    from evomerge.reproduce import reproduce

    usage = "evomerge reproduce run=<run dir> [max_evals=<search candidates>] [out=<scratch folder>]"
    args = _key_values(argv, {"run", "max_evals", "out"}, {"run"}, usage)
    try:
        max_evals = int(args["max_evals"]) if args.get("max_evals") not in (None, "", "null") else None
    except ValueError:
        raise ConfigError(f"max_evals must be an integer, got {args['max_evals']!r}") from None
    result = reproduce(args["run"], max_evals=max_evals, out=args.get("out"))
    print("\n".join(result.lines()))
    raise SystemExit(0 if result.identical else 1)


SUBCOMMANDS = {"export": export_main, "report": report_main, "compare": compare_main, "reproduce": reproduce_main}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        SUBCOMMANDS[sys.argv[1]](sys.argv[2:])
        return
    check_resume_argument(sys.argv[1:])
    add_plugin_configs(sys.argv)
    search_main()


def add_plugin_configs(argv: list[str]) -> None:
    """Config groups of installed plugins (entry point group ``evomerge.configs``) join Hydra's
    search path, unless the command line sets ``hydra.searchpath`` itself."""
    if any(a.lstrip("+").startswith("hydra.searchpath=") for a in argv[1:]):
        return
    from evomerge.plugins import config_search_path

    paths = config_search_path()
    if paths:
        argv.append(f"hydra.searchpath=[{','.join(paths)}]")


if __name__ == "__main__":
    main()
