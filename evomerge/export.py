"""``evomerge export``: one archived point of a run written as an HF model folder."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evomerge import rundir
from evomerge.dfs import wiring as dfs
from evomerge.dfs.path import LayerPath, candidate_from_dict, pool_paths
from evomerge.errors import ConfigError, EvomergeError
from evomerge.estimators.lm_eval_fitness import quiet_libraries
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import dtype_name
from evomerge.search.archive import Archive
from evomerge.session import build_pool

CONFIG_FILE = "config.yaml"


def export_point(run_dir: str | Path, point: str, out: str | Path | None = None, force: bool = False, verify: bool = False,
                 push_to_hub: str | None = None) -> Path:
    """Write archive point ``point`` (an id, ``knee`` or ``best_<objective>``) of a run as an HF folder.
    Refuses a non-empty target (unless ``force``), a pool model's folder, and changed models.
    The merge is exact (mergekit's choice among tied magnitudes, no sampled table). With
    ``verify``: mergekit runs on the recipe's YAML (written as ``mergekit.yaml``, its header
    saying what was verified) and one line compares it with the folder (evomerge/verify.py)."""
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file() or not (run / "archive.jsonl").is_file():
        raise ConfigError(f"{run} is not an evomerge run directory (no {CONFIG_FILE} / archive.jsonl)")
    archive = Archive(run / "archive.jsonl")
    by_id = {str(r.id): r for r in archive.records}
    by_label = {r.label: r for r in archive.records if r.label}
    if point in by_id:
        record = by_id[point]
    elif point in by_label:
        record = by_label[point]
    elif point in _chosen_points(run) and str(_chosen_points(run)[point]) in by_id:  # knee / best_*: any recipe kind
        record = by_id[str(_chosen_points(run)[point])]
    elif (run / "recipes" / f"{point}.yaml").is_file():
        rid = Recipe.load(run / "recipes" / f"{point}.yaml").metadata.get("archive_id")
        if str(rid) not in by_id:
            raise ConfigError(f"recipes/{point}.yaml names archive id {rid}, which {run / 'archive.jsonl'} does not hold")
        record = by_id[str(rid)]
    else:
        raise ConfigError(f"no point {point!r} in {run}: use an archive id, knee, best_<objective> or a reference label")
    if record.error:
        raise ConfigError(f"point {point} failed during the search ({record.error}); nothing to export")
    recipe = candidate_from_dict(record.recipe)
    if push_to_hub:
        check_repo_id(push_to_hub)
    if verify:  # checked before anything is loaded, merged or written: a retry needs no force=true
        if isinstance(recipe, LayerPath):
            raise ConfigError("verify=true checks recipe exports; this point is a data-flow (layer path) merge")
        from evomerge.verify import require_mergekit

        require_mergekit()
    cfg = OmegaConf.load(run / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    quiet_libraries()
    pool, experts, base = build_pool(cfg)
    if verify:
        from evomerge.verify import mergekit_yaml_text

        mergekit_yaml_text(recipe, base, list(experts.values()))  # one line when mergekit cannot express the recipe
    target = Path(out) if out else run / "exports" / f"point-{record.id}"
    rundir.check_export_target(target, [base, *experts.values()], force)
    models = {"base": base, **{f"expert:{k}": v for k, v in experts.items()}}
    rundir.check_fingerprints(run, rundir.fingerprints(models), force, "export")
    # exact "top d" masks (mergekit's choice among ties), whatever table the search used
    merger = Merger(pool, device=OmegaConf.select(cfg, "device") or "auto", offload=bool(OmegaConf.select(cfg, "offload")), table_size=None)
    if isinstance(recipe, LayerPath):  # a data-flow point: its layers materialised (evomerge/dfs/export.py)
        recipe.base, recipe.experts = base, list(experts)
        return dfs.export_path(recipe, merger, list(experts), target, pool_paths(base, experts))
    merger.apply(recipe)
    recipe.base, recipe.experts = base, list(experts)
    merger.save(target, recipe)
    write_hub_files(run, target, record, recipe, base, experts, dtype_name(pool))
    if verify:
        from evomerge.verify import mergekit_yaml_text, verify_export

        result = verify_export(target, recipe, base, list(experts.values()), dtype=dtype_name(pool))
        text = mergekit_yaml_text(recipe, base, list(experts.values()), verified=result, dtype=dtype_name(pool))
        (target / "mergekit.yaml").write_text(text)
        print(result.line())
        if not result.same:
            raise VerifyDiffers(f"{target}: {result.line()}")
    if push_to_hub:
        push_folder(target, push_to_hub)
    return target


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or any(c.isspace() for c in repo_id):
        raise ConfigError(f"push_to_hub must be a Hub repo id '<user or org>/<name>', got {repo_id!r}")


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload an exported folder to the Hub with huggingface_hub (your token: ``hf auth login``
    or ``HF_TOKEN``); creates the model repo if it does not exist. Returns the commit URL."""
    import huggingface_hub

    check_repo_id(repo_id)
    try:
        huggingface_hub.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                             commit_message=f"evomerge export of {folder.name}")
    except Exception as exc:  # noqa: BLE001 -- auth, network, permissions: one line, the folder stays
        raise ConfigError(f"push_to_hub={repo_id}: the upload failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"the exported folder {folder} is complete; upload it again later") from None
    url = str(getattr(info, "commit_url", info))
    print(f"pushed to https://huggingface.co/{repo_id} ({url})")
    return url


def write_hub_files(run: Path, target: Path, record, recipe: Recipe, base: str, experts: dict[str, str], dtype: str = "float32") -> None:
    """README.md (a Hub model card), results.json (lm-eval's format) and front.png (this point
    marked) next to the weights (evomerge/model_card.py)."""
    from evomerge.errors import MergeError
    from evomerge.model_card import front_plot, write_card

    try:
        mergekit_text = recipe.to_mergekit_yaml(base=base, experts=list(experts.values()), dtype=dtype)
    except MergeError:
        mergekit_text = None
    write_card(target, run, record, recipe, base, experts, mergekit_text, front_plot(run, record.id, target))


class VerifyDiffers(EvomergeError):
    """``verify=true`` found weights that differ from mergekit's (exit code 1, not 2)."""

    exit_code = 1


def _chosen_points(run: Path) -> dict[str, int]:
    """``knee`` / ``best_<objective>`` -> archive id, from the run's summary.json (if any)."""
    try:
        chosen = json.loads((run / "summary.json").read_text()).get("chosen") or {}
        return {str(k): int(v) for k, v in chosen.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
