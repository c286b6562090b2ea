"""Executors: duplicates never dispatched, archive order, local vs Ray (2 workers) give the
same archive, a killed worker loses and repeats nothing, driver kill + resume, multirun dirs;
the asynchronous steady-state mode (fake executor for the bookkeeping, Ray once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.executors import LocalExecutor, Outcome, evaluate_outcome
from evomerge.search.algorithms import GridStrategy, RandomStrategy, nsga2
from evomerge.search.archive import Archive, genome_key
from evomerge.search.genome import GenomeSpace
from evomerge.search.loop import SearchLoop
from test_cli import pool_args  # the same tiny-zoo pool overrides as the CLI tests
from conftest import kill_when_searched

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ---------------------------------------------------------------- no Ray needed


def _space():
    return GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic",), separate_embed_head=False)


def _score(recipe):
    w0, w1 = recipe.groups[1].params["weight"]
    return {"a": w0, "b": w1}, 0.0, 0.0


class ReversedExecutor(LocalExecutor):
    """Completes jobs in reverse order and remembers what was dispatched."""

    def __init__(self, evaluate):
        super().__init__(evaluate)
        self.dispatched: list[str] = []

    def map(self, jobs):
        self.dispatched += [k for k, _ in jobs]
        return reversed(list(super().map(jobs)))


def test_duplicates_are_never_dispatched_and_records_follow_ask_order(tmp_path):
    loop = SearchLoop(_space(), GridStrategy(pop_size=4), ["a", "b"], tmp_path, max_evals=8, seed=0, progress=False)
    executor = ReversedExecutor(_score)
    archived = loop.evaluate_genome(np.array([0.1, 0.2]), executor)
    assert executor.dispatched == ["0"]
    X = [np.array([0.3, 0.4]), np.array([0.1, 0.2]), np.array([0.5, 0.6]), np.array([0.3, 0.4]) + 1e-12]
    executor.dispatched.clear()
    records = loop.evaluate_genomes(X, executor)
    assert executor.dispatched == ["0", "1"]  # [0.1, 0.2] is archived, the last repeats the first
    assert records[1] is archived and records[3] is records[0]
    # completed in reverse, archived in the order asked: ids 1 then 2
    assert [r.id for r in records] == [1, 0, 2, 1]
    assert [r.genome for r in Archive(tmp_path / "archive.jsonl").records] == [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    assert loop.reused == 2


def test_failed_outcome_is_recorded_worst(tmp_path):
    class Failing(LocalExecutor):
        def map(self, jobs):
            for key, _ in jobs:
                yield key, Outcome.failed("WorkerDied: the candidate's evaluation killed 2 Ray workers")

    loop = SearchLoop(_space(), GridStrategy(pop_size=4), ["a", "b"], tmp_path, max_evals=8, seed=0, progress=False)
    rec = loop.evaluate_genome(np.array([0.3, 0.4]), Failing(_score))
    assert rec.error.startswith("WorkerDied") and rec.losses == [1.0, 1.0]


def test_resume_takes_the_executor_of_its_own_command_line(tmp_path):
    from omegaconf import OmegaConf

    from evomerge.rundir import open_run_dir

    run = tmp_path / "run"
    first = OmegaConf.create({"seed": 0, "resume": None, "executor": {"_target_": "evomerge.executors.local_executor", "_partial_": True}})
    open_run_dir(first, run, ["seed=0"])[2].release()
    again = OmegaConf.create({"seed": 0, "resume": str(run), "force": False, "executor": {"_target_": "x.ray", "workers": 3}})
    cfg, _, lock = open_run_dir(again, run, [f"resume={run}", "executor=ray", "executor.workers=3"])
    lock.release()
    assert cfg.executor == {"_target_": "x.ray", "workers": 3} and cfg.seed == 0


# ---------------------------------------------------------------- async (steady-state) mode, no Ray


@pytest.fixture(autouse=True)
def _no_gc_per_failure(monkeypatch):
    # a failed candidate runs gc.collect() (seconds with torch loaded on a busy machine)
    monkeypatch.setattr("evomerge.executors.base.free_accelerator_memory", lambda: None)


def _score_or_fail(recipe):
    w0, w1 = recipe.groups[1].params["weight"]
    if w0 >= 0.999:
        raise ValueError("this recipe always fails")
    return {"a": w0, "b": w1}, 0.0, 0.0


class StreamingFake:
    """An async executor without Ray: ``workers`` slots behind a queue (as RayExecutor); of the
    running jobs the newest completes first (so completion order is not ask order). Records
    what was dispatched and how many workers were busy whenever the loop waited;
    ``interrupt_at``: the n-th wait raises KeyboardInterrupt."""

    mode = "async"

    def __init__(self, evaluate, workers: int = 2, interrupt_at: int | None = None):
        self.evaluate, self.workers, self.interrupt_at = evaluate, workers, interrupt_at
        self.running: list[tuple[str, object]] = []  # submitted and not returned; the first `workers` run, the rest queue
        self.dispatched: list[str] = []
        self.busy: list[int] = []

    def submit(self, key, recipe):
        assert len(self.running) < self.workers + 1, "more than one job queued beyond the workers"
        self.running.append((key, recipe))
        self.dispatched.append(key)

    def idle(self):
        return self.workers - len(self.running)

    def next_completed(self):
        if len(self.busy) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.busy.append(min(len(self.running), self.workers))
        key, recipe = self.running.pop(min(len(self.running), self.workers) - 1)
        return key, evaluate_outcome(self.evaluate, recipe)

    def map(self, jobs):
        return LocalExecutor(self.evaluate).map(jobs)

    def close(self):
        pass


A, B, F1, F2 = [0.1, 0.2], [0.3, 0.4], [1.0, 0.7], [1.4, 0.7]  # F2 decodes to F1's (failing) recipe


def _async_loop(run_dir, max_evals=8):
    run_dir.mkdir(exist_ok=True)
    # asks: A (archived before the run), B, B again (while B runs), F1, F2, then 3 random genomes
    loop = SearchLoop(_space(), RandomStrategy(pop_size=4), ["a", "b"], run_dir, max_evals=max_evals, seed=0, progress=False, initial=np.array([A, B, B, F1, F2]))
    if not loop.archive.records:
        loop.evaluate_genome(np.array(A), LocalExecutor(_score_or_fail))
    return loop


def _search_set(run_dir):
    return sorted((r.key, r.genome, r.scores, r.error, r.generation) for r in Archive(run_dir / "archive.jsonl").search_records())


def test_async_keeps_workers_busy_serves_duplicates_and_honours_the_budget(tmp_path):
    loop = _async_loop(tmp_path / "async")
    fake = StreamingFake(_score_or_fail)
    state = loop.run(fake)
    keys = lambda *gs: [genome_key(g) for g in gs]  # noqa: E731
    # A archived (it spent 1 of the budget); the second B waits for the first and is served;
    # F2 waits for F1 (same recipe), which fails, so F2 is dispatched; one job queued beyond
    # the 2 workers (R1); budget 8 evaluations = A + 7 dispatched (2 repeats served, free)
    assert len(fake.dispatched) == len(set(fake.dispatched)) == 7
    assert fake.dispatched[:2] == keys(B, F1) and fake.dispatched[3] == keys(F2)[0]
    assert fake.busy == [2, 2, 2, 2, 2, 2, 1]  # both workers busy until nothing is left to ask
    assert loop.n_counted == 8 and state.n_asked == 9 and loop.reused == 2 and state.served == 2 and state.in_flight == [] and state.finished
    records = loop.archive.search_records()
    assert [r.key for r in records][:4] == keys(A, F1) + [fake.dispatched[2]] + keys(F2)  # completion order
    assert records[-1].key == keys(B)[0]  # B ran longest (newest first), archived last
    assert [r.error is not None for r in records] == [False, True, False, True, False, False, False, False]
    assert state.generation == 3 and state.history[-1]["n_evals"] == 8  # blocks of pop_size=4
    # the same candidates, scores and generation labels as the generational loop
    gen = _async_loop(tmp_path / "gen")
    gen.run(LocalExecutor(_score_or_fail))
    assert _search_set(tmp_path / "async") == _search_set(tmp_path / "gen")
    assert gen.state.generation == 3


@pytest.mark.parametrize(("kill", "at", "resume"), [("waiting", 3, "async"), ("archived", 3, "async"), ("waiting", 4, "generational")])
def test_async_driver_killed_and_resumed_loses_and_repeats_nothing(tmp_path, kill, at, resume):
    reference = tmp_path / "reference"
    whole = StreamingFake(_score_or_fail)
    _async_loop(reference).run(whole)
    run = tmp_path / "run"
    loop = _async_loop(run)
    first = StreamingFake(_score_or_fail, interrupt_at=at if kill == "waiting" else None)
    if kill == "archived":  # killed after a result reached the archive, before the next checkpoint
        original, count = loop._archive_outcome, []

        def archive_then_die(job, outcome):
            record = original(job, outcome)
            count.append(job.key)
            if len(count) == at:
                raise KeyboardInterrupt
            return record

        loop._archive_outcome = archive_then_die
    with pytest.raises(KeyboardInterrupt):
        loop.run(first)
    archived = {r.key for r in Archive(run / "archive.jsonl").records}
    lost = {k for k, _ in first.running} - archived  # dispatched, never archived
    assert lost and (kill == "waiting" or count[-1] in archived)
    again = _async_loop(run)  # the strategy comes from the checkpoint
    second = StreamingFake(_score_or_fail) if resume == "async" else ReversedExecutor(_score_or_fail)
    again.run(second)
    if resume == "async":
        assert _search_set(run) == _search_set(reference)  # nothing lost, same scores and generations
    else:  # nothing lost, same scores; a generational resume labels what it asks by its own generations
        assert [r[:4] for r in _search_set(run)] == [r[:4] for r in _search_set(reference)]
    keys = [r.key for r in Archive(run / "archive.jsonl").records]
    assert len(keys) == len(set(keys))  # nothing archived twice
    assert again.n_counted == 8 and again.state.in_flight == [] and again.state.finished
    if resume == "async":  # re-dispatched: exactly what was running and not archived
        assert len(second.dispatched) == len(set(second.dispatched))
        assert set(second.dispatched) & set(first.dispatched) == lost
        assert set(second.dispatched) | set(first.dispatched) == set(whole.dispatched)
        assert len(first.dispatched) + len(second.dispatched) == len(whole.dispatched) + len(lost)


def test_async_strategies_ask_one_by_one_what_they_ask_by_generation():
    # the loop, not the strategy, counts the budget: random never runs out, so take 9
    def one_by_one(strategy, budget=9):
        out = []
        while strategy.has_next() and len(out) < budget:
            out.append(strategy.ask_one())
        return np.array(out)

    def by_generation(strategy, budget=9):
        out = []
        while strategy.has_next() and len(out) < budget:
            X = strategy.ask()
            strategy.tell(X, np.zeros((len(X), 2)))
            out += list(X)
        return np.array(out[:budget])

    for make in (lambda: GridStrategy(pop_size=4), lambda: RandomStrategy(pop_size=4)):
        a, b = make(), make()
        for s in (a, b):
            s.setup(2, 2, 9, seed=3, initial=np.array([A, B]))
        X = one_by_one(a)
        assert X.shape == (9, 2) and np.array_equal(X, by_generation(b))
    assert X[:2].tolist() == [A, B]  # random: the seeds first
    grid = GridStrategy(pop_size=4)
    grid.setup(2, 2, 9, seed=0)
    assert one_by_one(grid)[[0, 1, 8]].tolist() == [[0.0, 0.0], [0.0, 0.5], [1.0, 1.0]]  # 3 x 3 grid


def test_async_refuses_generational_algorithms_and_unknown_modes(tmp_path, capsys):
    from evomerge.executors import local_executor
    from evomerge.executors.base import check_mode

    loop = SearchLoop(_space(), nsga2(pop_size=4), ["a", "b"], tmp_path, max_evals=8, seed=0, progress=False)
    with pytest.raises(ConfigError) as err:
        loop.run(StreamingFake(_score_or_fail))
    assert str(err.value) == (
        "executor.mode=async: algorithm nsga2 is generational only (its selection needs whole generations); "
        "use executor.mode=generational, or an algorithm that supports async: bo, grid, hand_made, random, sobol"
    )
    with pytest.raises(ConfigError, match="executor.mode must be one of generational, async, got 'steady'"):
        check_mode("steady")

    class Session:
        evaluate = staticmethod(_score)

    assert local_executor(Session(), mode="async").mode == "generational"
    assert "executor.mode=async has no effect with executor=local" in capsys.readouterr().err


# ---------------------------------------------------------------- local vs Ray on the test zoo

try:
    import ray
except ImportError:  # the tests above still run; these need the extra (pip install 'evomerge[ray]')
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'evomerge[ray]')")


def _pool_args(zoo) -> list[str]:
    return [*pool_args(zoo), "fitness.test_rescore=false", "report.plots=false", "report.html=false", "algorithm.pop_size=8"]


# the worker-death tests count generations of a generational algorithm: NSGA-II, not the default (bo)
NSGA2 = ["algorithm=nsga2", "genome=layerwise_mixed"]


def _run(overrides: list[str], run_dir: Path) -> list[tuple]:
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_search(cfg, run_dir, overrides=[])
    return _archive(run_dir)


def _archive(run_dir: Path) -> list[tuple]:
    return [(r.kind, r.key, r.label, r.genome, r.scores, r.losses, r.error) for r in Archive(run_dir / "archive.jsonl").records]


def init_ray(attempts: int = 3) -> None:
    """``ray.init`` gives the raylet 30 s to register; on a loaded machine that can be missed."""
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
            return
        except Exception:  # noqa: BLE001 -- "The current node timed out during startup"
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def local_ray():
    before = signal.getsignal(signal.SIGTERM)
    init_ray()
    yield
    ray.shutdown()
    signal.signal(signal.SIGTERM, before)  # ray.init installs its own; shutdown leaves it


@pytest.fixture(scope="module")
def local_archive(test_zoo, tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    return _run([*_pool_args(test_zoo), *NSGA2, "search.max_evals=16", "search.progress=false"], run)


@needs_ray
@pytest.mark.slow
def test_ray_gives_the_local_archive_and_survives_killed_workers(test_zoo, local_archive, local_ray, tmp_path, monkeypatch):
    from evomerge.executors.ray_executor import RayExecutor

    seen = {"batch": 0, "killed": []}

    def kill_some(executor, slot, key):
        # batches: 1 references, 2 generation 0, 3 generation 1 (the last: told, never asked from)
        seen["batch"] += key == "0"
        first_kill = seen["batch"] == 2 and key == "2" and not seen["killed"]
        doomed = seen["batch"] == 3 and key == "5" and len(seen["killed"]) < 3
        if first_kill or doomed:
            if executor.pids[slot]:
                os.kill(executor.pids[slot], signal.SIGKILL)  # the worker process dies mid-evaluation
            else:  # a replacement worker (pid not asked: that call would wait for the evaluation)
                ray.kill(executor.actors[slot])
            seen["killed"].append((seen["batch"], key))

    monkeypatch.setattr(RayExecutor, "on_submit", staticmethod(kill_some))
    got = _run([*_pool_args(test_zoo), *NSGA2, "search.max_evals=16", "search.progress=false", "executor=ray", "executor.workers=2"], tmp_path / "ray")
    assert seen["killed"] == [(2, "2"), (3, "5"), (3, "5")]
    assert len(got) == len(local_archive) == 3 + 16
    keys = [k for _, k, *_ in got]
    assert len(set(keys)) == len(keys)  # nothing repeated
    failed = [i for i, rec in enumerate(got) if rec[6]]
    assert len(failed) == 1 and failed[0] >= 3 + 8  # the doomed candidate of generation 1, and only it
    # identical up to the end of generation 1 (3 references + 5 new of generation 0, whose base
    # and experts are served + 8): the next generation is selected on the doomed candidate's
    # failure in one run and its score in the other, so it may differ, as it should
    for i, (a, b) in enumerate(zip(got[:16], local_archive[:16])):
        if i in failed:
            assert a[:4] == b[:4] and a[5] == [1.0, 1.0] and a[6].startswith("WorkerDied")
        else:
            assert a == b, i  # same genomes, same scores as in process


@needs_ray
@pytest.mark.slow
def test_killed_ray_driver_resumes_to_the_same_archive(test_zoo, local_archive, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "evomerge", *_pool_args(test_zoo), *NSGA2, "search.max_evals=16", "executor=ray", "executor.workers=2"]
    proc = subprocess.Popen([*args, f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when_searched(proc, run, 5, 400)
    out = proc.communicate()[0]
    before = _archive(run)
    assert 3 + 5 <= len(before) < 3 + 16, out
    resumed = subprocess.run([sys.executable, "-m", "evomerge", f"resume={run}", "executor=ray", "executor.workers=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "done: 16 candidates" in resumed.stdout
    assert _archive(run) == local_archive  # nothing lost, nothing repeated, same scores


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_dir(test_zoo, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "-m", "seed=0,1", *_pool_args(test_zoo), "search.max_evals=4", "algorithm.pop_size=4", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job, seed in (("0", 0), ("1", 1)):
        run = sweep / job
        assert json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))["seed"] == seed
        assert len(Archive(run / "archive.jsonl").search_records()) == 4


# ---------------------------------------------------------------- async mode on Ray


def test_async_with_a_generational_algorithm_is_refused_before_ray_starts(test_zoo, tmp_path, monkeypatch):
    from evomerge.executors import ray_executor

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started before the refusal")

    monkeypatch.setattr(ray_executor, "RayExecutor", no_ray)
    with pytest.raises(ConfigError, match=r"^executor.mode=async: algorithm nsga2 is generational only .* bo, grid, hand_made, random, sobol$"):
        _run([*_pool_args(test_zoo), *NSGA2, "search.max_evals=8", "search.progress=false", "executor=ray", "executor.mode=async"], tmp_path / "run")


ASYNC_EVALS = 12


@needs_ray
@pytest.mark.slow
def test_ray_async_budget_ctrl_c_and_resume(test_zoo, local_ray, tmp_path, monkeypatch):
    """One async run on 2 Ray workers, interrupted (Ctrl-C) at its 5th search dispatch, then
    resumed: exactly the budget, nothing dispatched twice but the interrupted in-flight ones,
    workers stopped, and the candidates and scores of the local generational run."""
    from evomerge.executors.ray_executor import RayExecutor

    args = [*_pool_args(test_zoo), "algorithm=random", f"search.max_evals={ASYNC_EVALS}", "search.progress=false"]
    local = _run(args, tmp_path / "local")
    dispatched: list[str] = []
    seen: dict = {}

    def interrupt(executor, slot, key):
        if len(key) == 16:  # a genome key (the references go out as "0", "1", ...)
            dispatched.append(key)
            seen["pids"] = [p for p in executor.pids if p]
            if len(dispatched) == 5 and "interrupted" not in seen:
                seen["interrupted"] = list(dispatched)
                raise KeyboardInterrupt

    monkeypatch.setattr(RayExecutor, "on_submit", staticmethod(interrupt))
    run = tmp_path / "async"
    ray_args = [*args, "executor=ray", "executor.workers=2", "executor.mode=async"]
    with pytest.raises(KeyboardInterrupt):
        _run(ray_args, run)
    deadline = time.time() + 60  # Ctrl-C stops the workers (their processes exit)
    while time.time() < deadline and any(_alive(p) for p in seen["pids"]):
        time.sleep(0.5)
    assert seen["pids"] and not any(_alive(p) for p in seen["pids"])
    before = {key for _, key, *_ in _archive(run)}
    got = _run([*ray_args, f"resume={run}"], run)
    keys = [k for _, k, *_ in got]
    assert len(keys) == len(set(keys)) == 3 + ASYNC_EVALS  # the budget exactly, nothing archived twice
    repeated = {k for k in dispatched if dispatched.count(k) > 1}
    assert repeated and repeated <= set(seen["interrupted"]) - before  # only the interrupted in-flight ones, once more
    assert all(dispatched.count(k) == 2 for k in repeated)
    assert sorted(got, key=str) == sorted(local, key=str)  # same candidates and scores as local generational


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


ASYNC_BO = ["algorithm=bo", "algorithm.pop_size=2", "algorithm.n_init=4", "executor=ray", "executor.workers=2", "executor.mode=async"]


@needs_ray
@pytest.mark.slow
def test_ray_async_bo_survives_a_killed_worker(test_zoo, local_ray, tmp_path, monkeypatch):
    """Issue 35, item 7: the default algorithm on the steady-state Ray path. A worker killed
    mid-evaluation is replaced and its candidate re-queued: the budget is met exactly, the
    killed candidate is archived once, with scores, and nothing is archived twice."""
    from evomerge.executors.ray_executor import RayExecutor

    killed: list[str] = []
    searched: list[str] = []

    def kill_third(executor, slot, key):
        if len(key) == 16 and not killed:  # a genome key (the references go out as "0", "1", ...)
            searched.append(key)
            if len(searched) == 3 and executor.pids[slot]:
                os.kill(executor.pids[slot], signal.SIGKILL)  # the worker dies mid-evaluation
                killed.append(key)

    monkeypatch.setattr(RayExecutor, "on_submit", staticmethod(kill_third))
    got = _run([*_pool_args(test_zoo), *ASYNC_BO, "search.max_evals=10", "search.progress=false"], tmp_path / "run")
    assert len(killed) == 1
    keys = [k for _, k, *_ in got]
    assert len(keys) == len(set(keys)) == 3 + 10
    assert not any(rec[6] for rec in got)  # no failure recorded
    (redone,) = [rec for rec in got if rec[1] == killed[0]]
    assert redone[4] and searched.count(killed[0]) == 1  # scored; counted once in what was sent before the kill


@needs_ray
@pytest.mark.slow
def test_killed_async_bo_driver_resumes_to_the_budget(test_zoo, tmp_path):
    """The driver of an async BO run killed (SIGKILL) after 4 search records, then resumed:
    the run ends at exactly its budget, every candidate archived once, a done summary."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "evomerge", *_pool_args(test_zoo), *ASYNC_BO, "search.max_evals=10"]
    proc = subprocess.Popen([*args, f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when_searched(proc, run, 4, 400)
    out = proc.communicate()[0]
    before = _archive(run)
    assert 3 + 4 <= len(before) < 3 + 10, out
    resumed = subprocess.run([sys.executable, "-m", "evomerge", f"resume={run}", *ASYNC_BO[3:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "done: 10 candidates" in resumed.stdout
    after = _archive(run)
    assert after[: len(before)] == before  # nothing rewritten
    keys = [k for _, k, *_ in after]
    assert len(keys) == len(set(keys)) == 3 + 10 and not any(rec[6] for rec in after)
