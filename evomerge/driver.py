"""Driving a search: the executor, and the stages of a run (one by default) over one archive."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evomerge.progress import say
from evomerge.errors import ConfigError
from evomerge.merge.recipe import reference_recipes
from evomerge.report import refresh_report
from evomerge.search.archive import genome_key
from evomerge.search.loop import SearchLoop
from evomerge.search.stages import Stage, carry_front
from evomerge.session import Session, build_space, build_strategy


def check_async(cfg: DictConfig, session: Session, stages: list[Stage]) -> None:
    """``executor.mode=async`` with an algorithm that needs whole generations is refused
    before any worker starts (``executor=local`` ignores the mode)."""
    from evomerge.search.algorithms import require_async

    target = str(OmegaConf.select(cfg, "executor._target_") or "")
    if OmegaConf.select(cfg, "executor.mode") != "async" or target.endswith("local_executor"):
        return
    for stage in stages:
        require_async(build_strategy(cfg, build_space(cfg, session.merger, list(session.experts), stage.genome), stage.algorithm))


def build_executor(cfg: DictConfig, session: Session, run_dir: Path):
    """The run's ``executor`` group (``local`` when the config has none, e.g. older runs)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from evomerge.executors import local_executor

    node = OmegaConf.select(cfg, "executor")
    if node is None:
        return local_executor(session)
    try:
        factory = instantiate(node)
        return factory(session=session, cfg=cfg, run_dir=run_dir)
    except InstantiationException as exc:
        raise ConfigError(f"invalid executor config: {str(exc).splitlines()[0]}") from None
    except TypeError as exc:
        raise ConfigError(f"invalid executor option: {exc}") from None


def generation_hook(run_dir: Path, html: bool, tracker: Any, objectives: list[str]) -> Callable[[SearchLoop], None] | None:
    """After each generation: the live report and the tracker's new points (either may be off)."""
    if not html and tracker is None:
        return None

    def hook(loop: SearchLoop) -> None:
        if html:
            refresh_report(run_dir, live=True)
        if tracker is not None:
            from evomerge.trackers import round_entry

            tracker.log_candidates(loop.archive.search_records(), objectives)
            tracker.log_generation(round_entry(loop))

    return hook


def record_blocks(cfg: DictConfig, run_dir: Path, session: Session) -> None:
    """The adaptive blocks of a run's genome (and how many were chosen, for ``n_blocks: auto``)
    go into its config.yaml at the first start, so a resume decodes genomes on the same blocks."""
    from evomerge import rundir
    from evomerge.session import RESOLVED_BLOCKS

    resolved = getattr(session.merger, "resolved_blocks", None)
    if resolved is None or OmegaConf.select(cfg, RESOLVED_BLOCKS) is not None:
        return
    OmegaConf.update(cfg, RESOLVED_BLOCKS, resolved, force_add=True)
    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        saved = OmegaConf.load(path)
        OmegaConf.update(saved, RESOLVED_BLOCKS, resolved, force_add=True)
        rundir.write_atomic(path, OmegaConf.to_yaml(saved))


def run_stages(
    cfg: DictConfig, run_dir: Path, session: Session, executor: Any, stages: list[Stage], seed: int, ref_point: Any,
    on_ready: Callable[[], None] | None = None, tracker: Any = None,
) -> SearchLoop:
    """``on_ready``: called once the first stage's loop accepted the run's state (budget,
    checkpoint), before anything is evaluated (a resume writes its config changes then)."""
    history: list[dict[str, Any]] = []
    html = OmegaConf.select(cfg, "report.html") is not False
    loop: SearchLoop | None = None
    for i, stage in enumerate(stages):
        space = build_space(cfg, session.merger, list(session.experts), stage.genome)
        if i == 0:
            record_blocks(cfg, run_dir, session)
        strategy = build_strategy(cfg, space, stage.algorithm)
        initial, labels, aliases = None, [], {}
        if loop is not None:  # later stages start from the front found so far (hand-made merges included)
            initial = carry_front(loop.archive.records, space)
            say(f"stage {stage.name}: starting from {len(initial)} front points of the earlier stages")
        elif OmegaConf.select(cfg, "search.seed_with_references"):
            hand_made = space.hand_made_genomes()
            labels = list(hand_made)
            initial = np.array(list(hand_made.values())) if hand_made else None
            # the base and the experts are the reference records: served from the archive, never evaluated twice
            aliases = {genome_key(x): f"ref:{label}" for label, x in hand_made.items() if label == "base" or label.startswith("expert:")}
        loop = SearchLoop(
            space,
            strategy,
            session.objectives,
            run_dir,
            max_evals=stage.evals,
            seed=seed + i,
            ref_point=None if ref_point is None else list(ref_point),
            progress=bool(OmegaConf.select(cfg, "search.progress")),
            initial=initial,
            checkpoint_name=stage.checkpoint,
            retry_failed=bool(OmegaConf.select(cfg, "search.retry_failed")),
            aliases=aliases,
        )
        if i == 0 and on_ready is not None:
            on_ready()
        used = int(getattr(loop.state.strategy, "initial_used", len(labels))) if labels else 0
        if used:  # an algorithm that takes no warm start (hand_made: only its named points) gets no line
            note = "" if used >= len(labels) else f" ({used} of {len(labels)} hand-made merges: the first population holds {used}; left out: {', '.join(labels[used:])})"
            say(f"warm start: {', '.join(labels[:used])}{note}; base and experts served from the references")
        if hasattr(session.fitness, "attach"):  # multi-fidelity promotion reads the live front
            session.fitness.attach(loop.archive)
        label = f"stage {stage.name}: " if len(stages) > 1 else "search: "
        say(
            f"{label}{strategy.name} over {space.n_var} genes ({len(space.slots)} groups, methods {', '.join(space.methods)}), "
            f"{stage.evals} evaluations, objectives {', '.join(session.objectives)}; run dir {run_dir}",
        )
        if i == 0:
            refs = reference_recipes(session.merger.n_experts, list(session.experts), session.merger.n_layers)
            todo = [label for label in refs if loop.archive.by_key.get(f"ref:{label}") is None or loop.archive.by_key[f"ref:{label}"].error]
            if todo:
                say(f"references: scoring {', '.join(todo)} (not counted in the budget) ...")
            for label, rec in loop.evaluate_references(refs, executor).items():
                if rec.error:  # the references are plain merges: if they fail, every candidate would
                    raise ConfigError(f"reference {label} failed, so every candidate would: {rec.error}")
                say(f"reference {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in rec.scores.items()))
        loop.run(executor, on_generation=generation_hook(run_dir, html, tracker, session.objectives))
        history += loop.state.history
    assert loop is not None, "plan_stages returns at least one stage"
    loop.state.history = history
    return loop


@contextmanager
def proposal_core_reserved(cfg: DictConfig) -> Iterator[None]:
    """Scoring in this process on a CPU while BO proposes in its worker: one core fewer for
    scoring during the run (entered before the session records its threads in environment.json)."""
    import torch

    from evomerge.search.proposals import scoring_threads

    device = str(OmegaConf.select(cfg, "device") or "auto")
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    local = str(OmegaConf.select(cfg, "executor._target_") or "").endswith("local_executor")
    overlapping = str(OmegaConf.select(cfg, "algorithm._target_") or "").endswith(".bo") and OmegaConf.select(cfg, "algorithm.overlap") is True
    before = torch.get_num_threads()
    threads = scoring_threads(before, on_cpu and local, overlapping)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
