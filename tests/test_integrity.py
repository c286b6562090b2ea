"""Run-directory integrity (issue 11): locks, torn/damaged archives, checkpoints that no
longer match the archive, budgets, fingerprints, resume overrides, up-front checks."""

from __future__ import annotations

import errno
import json
import re
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from evomerge.checks import check_config, check_tasks
from evomerge.errors import ConfigError
from evomerge.rundir import (
    RunDirError,
    RunLock,
    apply_resume_overrides,
    check_export_target,
    check_fingerprints,
    compare_fingerprints,
    claim_fresh,
    fingerprints,
    load_subset,
)
from evomerge.search.algorithms import GridStrategy, cmaes, nsga2, random_search
from evomerge.search.archive import Archive, ArchiveWriteError, Record, genome_key
from evomerge.search.genome import GenomeSpace
from evomerge.search.loop import SearchLoop


def space():
    return GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic",), separate_embed_head=False)


class Counting:
    """Two conflicting objectives of the TA weights (deterministic), counting calls."""

    def __init__(self, fail_keys: set[str] | None = None):
        self.calls = 0
        self.fail_keys = fail_keys

    def __call__(self, recipe):
        self.calls += 1
        w0, w1 = recipe.groups[0].params["weight"]
        if w0 > 0.9 and w1 > 0.9:
            raise RuntimeError("CUDA out of memory (simulated)")
        return {"a": w0 * (1 - 0.5 * w1), "b": w1 * (1 - 0.5 * w0)}, 0.0, 0.0


def loop(run_dir: Path, max_evals=30, strategy=None, **kw) -> SearchLoop:
    run_dir.mkdir(parents=True, exist_ok=True)
    return SearchLoop(space(), strategy or nsga2(pop_size=6), ["a", "b"], run_dir, max_evals=max_evals, seed=3, progress=False, **kw)


def result(run_dir: Path) -> list[tuple[str, tuple]]:
    """The archive's search candidates, order-free (a repaired archive appends re-evaluations)."""
    return sorted((r.key, tuple(r.losses)) for r in Archive(run_dir / "archive.jsonl").search_records())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("full")
    loop(d).run(Counting())
    return d


def rec(i: int, x: float) -> Record:
    return Record(i, "search", genome_key([x]), [x], {}, {"a": x}, [1 - x])


# ---------------------------------------------------------------- archive


def test_torn_tail_is_truncated_before_appending(tmp_path):
    path = tmp_path / "archive.jsonl"
    a = Archive(path)
    a.append(rec(0, 0.1))
    with path.open("ab") as f:
        f.write(b'{"id": 1, "kind": "sea')  # a write cut short (kill, full disk)
    b = Archive(path)
    assert b.torn_at is not None and [r.id for r in b.records] == [0]
    b.append(rec(1, 0.2))
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 3 and lines[2] == b""  # two whole lines, nothing glued
    assert [r.id for r in Archive(path).records] == [0, 1]
    assert not Archive(path).damaged


def test_binary_garbage_bad_json_and_checksum_mismatch_are_named(tmp_path):
    path = tmp_path / "archive.jsonl"
    a = Archive(path)
    for i in range(4):
        a.append(rec(i, i / 10))
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b"\x00\xff\xfe garbage\n"
    lines[2] = lines[2].replace(b'"a": 0.2', b'"a": 0.9')  # valid JSON, wrong checksum
    lines.insert(3, b'{"id": 7, oops\n')
    path.write_bytes(b"".join(lines))
    b = Archive(path)
    assert [r.id for r in b.records] == [0, 3]
    assert [(d.line, d.reason) for d in b.damaged] == [(2, "not UTF-8 text"), (3, "checksum mismatch"), (4, "not JSON")]
    assert "3 damaged line(s): 2 (not UTF-8 text), 3 (checksum mismatch), 4 (not JSON)" in b.describe_damage()
    aside = b.quarantine_damaged()
    assert aside is not None and aside.read_bytes().count(b"\n") == 3
    assert [r.id for r in Archive(path).records] == [0, 3] and not Archive(path).damaged


def test_records_with_unknown_fields_still_verify(tmp_path):
    """Fields added to Record later (e.g. stderr, fidelity) keep their checksum valid."""
    from evomerge.search.archive import record_crc

    path = tmp_path / "archive.jsonl"
    data = {**Record(0, "search", "k", [0.5], {}, {"a": 0.5}, [0.5]).__dict__, "fidelity": 2, "stderr": {"a": 0.01}}
    data["_crc"] = record_crc(data)
    path.write_text(json.dumps(data) + "\n")
    a = Archive(path)
    assert [r.id for r in a.records] == [0] and not a.damaged


def test_full_disk_leaves_no_partial_line_and_resumes_exactly(tmp_path, full_run, monkeypatch):
    run = tmp_path / "run"
    counting = Counting()
    n = {"appends": 0}
    real_fsync = os.fsync

    def fsync(fd):  # the 13th record's write hits a full disk after the bytes reached the file
        n["appends"] += os.readlink(f"/proc/self/fd/{fd}").endswith("archive.jsonl")
        if n["appends"] == 13:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr("evomerge.search.archive.os.fsync", fsync)
    with pytest.raises(ArchiveWriteError, match=r"archive.jsonl: the disk is full; nothing was lost -- free space and resume"):
        loop(run).run(counting)
    monkeypatch.undo()
    a = Archive(run / "archive.jsonl")
    assert len(a.records) == 12 and a.torn_at is None and not a.damaged
    loop(run).run(counting)
    assert result(run) == result(full_run)


# ---------------------------------------------------------------- checkpoint vs archive


def _stopped_run(run: Path, generations: int) -> None:
    class Stop(Exception):
        pass

    def stop(lp):
        if lp.state.generation == generations:
            raise Stop

    with pytest.raises(Stop):
        loop(run).run(Counting(), on_generation=stop)


def test_mid_archive_damage_is_reported_and_reevaluated(tmp_path, full_run, capsys):
    run = tmp_path / "run"
    _stopped_run(run, 3)  # checkpoint after generation 3 (18 records)
    path = run / "archive.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[4] = b"\x00\x01garbage\n"  # a generation-0 candidate, long since told to the algorithm
    path.write_bytes(b"".join(lines))
    counting = Counting()
    resumed = loop(run)
    err = capsys.readouterr().err
    assert "1 damaged line(s): 5 (not JSON)" in err and "moved to" in err
    assert "the archive does not hold the 18 records the checkpoint was written after (it has 17)" in err
    assert resumed.state.generation == 0  # replayed from the archive
    resumed.run(counting)
    assert result(run) == result(full_run)  # the lost candidate is back, nothing duplicated
    assert len(Archive(path).search_records()) == 30
    assert counting.calls == 1 + 12  # the lost one + the two generations never run
    assert (run / "archive.jsonl.damaged").read_bytes() == b"\x00\x01garbage\n"


def test_archive_shorter_than_checkpoint_is_detected_and_refilled(tmp_path, full_run, capsys):
    run = tmp_path / "run"
    _stopped_run(run, 3)
    path = run / "archive.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-5]))  # lose the last 5 records (e.g. a restored backup)
    counting = Counting()
    resumed = loop(run)
    assert "the archive does not hold the 18 records the checkpoint was written after (it has 13)" in capsys.readouterr().err
    resumed.run(counting)
    assert result(run) == result(full_run)
    assert counting.calls == 5 + 12


@pytest.mark.parametrize("damage", [b"not a pickle", b"", None])
def test_damaged_or_missing_checkpoint_resumes_exactly_from_the_archive(tmp_path, full_run, damage, capsys):
    run = tmp_path / "run"
    _stopped_run(run, 2)
    if damage is None:
        (run / "checkpoint.pkl").unlink()
    else:
        (run / "checkpoint.pkl").write_bytes(damage)
    counting = Counting()
    resumed = loop(run)
    if damage is not None:
        assert "checkpoint.pkl is damaged" in capsys.readouterr().err
        assert (run / "checkpoint.pkl.damaged").exists()
    resumed.run(counting)
    assert result(run) == result(full_run)
    assert counting.calls == 18  # only the three generations never evaluated


def test_a_checkpoint_changed_by_a_bit_flip_is_named_and_the_run_still_ends_identical(tmp_path, full_run, capsys):
    """A flipped bit inside a pickled number still unpickles: only the checksum tells."""
    import dill

    from evomerge.search.loop import CHECKPOINT_MAGIC

    run = tmp_path / "run"
    _stopped_run(run, 2)
    data = bytearray((run / "checkpoint.pkl").read_bytes())
    assert data.startswith(CHECKPOINT_MAGIC)
    start = len(CHECKPOINT_MAGIC) + 32
    # flip the lowest bit of a byte of the pickle that still unpickles to a LoopState
    for i in range(len(data) - 40, start, -1):
        flipped = bytearray(data)
        flipped[i] ^= 1
        try:
            if type(dill.loads(bytes(flipped[start:]))).__name__ == "LoopState":
                break
        except Exception:  # noqa: BLE001 -- this byte does not unpickle: try another
            continue
    else:
        pytest.fail("no byte of the checkpoint unpickles when flipped")
    (run / "checkpoint.pkl").write_bytes(bytes(flipped))
    counting = Counting()
    resumed = loop(run)
    err = capsys.readouterr().err
    assert "checkpoint.pkl is damaged (its contents changed since it was written: checksum mismatch)" in err
    resumed.run(counting)
    assert result(run) == result(full_run)
    assert counting.calls == 18


# ---------------------------------------------------------------- budgets and failures


def test_budget_not_a_multiple_of_the_population_stops_at_the_budget(tmp_path, capsys):
    run = tmp_path / "run"
    loop(run, max_evals=20, strategy=nsga2(pop_size=8)).run(Counting())
    assert len(Archive(run / "archive.jsonl").search_records()) == 20
    assert re.search(r"stopping at search.max_evals=20: the last generation is cut to \d new of its 8 candidates", capsys.readouterr().err)
    counting = Counting()
    loop(run, max_evals=20, strategy=nsga2(pop_size=8)).run(counting)  # resuming a finished run: nothing to do
    assert counting.calls == 0 and len(Archive(run / "archive.jsonl").search_records()) == 20


@pytest.mark.parametrize("make", [lambda: nsga2(pop_size=6), lambda: random_search(pop_size=6), lambda: cmaes(pop_size=6)],
                         ids=["nsga2", "random", "cmaes"])
@pytest.mark.parametrize("first", [18, 20], ids=["whole-generations", "cut-generation"])
def test_budget_extension_on_resume_matches_a_longer_run(tmp_path, make, first):
    longer = tmp_path / "longer"
    loop(longer, max_evals=30, strategy=make()).run(Counting())
    assert len(Archive(longer / "archive.jsonl").search_records()) == 30
    run = tmp_path / "run"
    loop(run, max_evals=first, strategy=make()).run(Counting())
    assert len(Archive(run / "archive.jsonl").search_records()) == first
    counting = Counting()
    loop(run, max_evals=30, strategy=make()).run(counting)
    assert counting.calls == 30 - first
    assert result(run) == result(longer)


@pytest.mark.parametrize("name", ["nsga2", "nsga3", "smsemoa", "agemoea", "ga", "de", "cmaes", "mixed_ga", "random", "sobol", "map"])
def test_every_extendable_algorithm_config_extends_like_a_longer_run(tmp_path, name):
    """Each shipped algorithm (grid and hand_made cannot extend; bo: tests/test_bayes.py), built
    from its config, stopped inside a generation and extended: the same candidates and scores as
    one longer run (a strategy that loses state in its pickle fails here, as cmaes did)."""
    from test_configs_algorithms import composed

    from evomerge.session import build_strategy

    make = lambda: build_strategy(composed([f"algorithm={name}"]), space())  # noqa: E731
    longer = tmp_path / "longer"
    loop(longer, max_evals=40, strategy=make()).run(Counting())
    run = tmp_path / "run"
    loop(run, max_evals=19, strategy=make()).run(Counting())
    loop(run, max_evals=40, strategy=make()).run(Counting())
    assert len(result(longer)) == 40 and result(run) == result(longer)


def test_budget_cannot_shrink_and_grid_cannot_grow(tmp_path):
    run = tmp_path / "run"
    loop(run, max_evals=18).run(Counting())
    with pytest.raises(ConfigError, match="search.max_evals can only grow on resume"):
        loop(run, max_evals=12)
    grid = tmp_path / "grid"
    loop(grid, max_evals=9, strategy=GridStrategy(pop_size=3)).run(Counting())
    with pytest.raises(ConfigError, match="grid cannot extend its budget"):
        loop(grid, max_evals=16, strategy=GridStrategy(pop_size=3))


def test_failures_are_printed_and_retry_failed_replaces_them(tmp_path, capsys):
    run = tmp_path / "run"
    flaky = {"on": True}

    def evaluate(recipe):
        w0, _ = recipe.groups[0].params["weight"]
        if flaky["on"] and w0 < 0.5:
            raise RuntimeError("disk cache unavailable")
        return {"a": w0, "b": 1 - w0}, 0.0, 0.0

    loop(run, max_evals=12).run(evaluate)
    err = capsys.readouterr().err
    assert err.count("failed: RuntimeError: disk cache unavailable") == 1  # printed once per distinct error
    failed = [r for r in Archive(run / "archive.jsonl").search_records() if r.error]
    assert failed
    flaky["on"] = False
    loop(run, max_evals=12, retry_failed=True).run(evaluate)
    after = Archive(run / "archive.jsonl").search_records()
    assert len(after) == 12 and not [r for r in after if r.error]
    assert {r.key for r in failed} <= {r.key for r in after}


# ---------------------------------------------------------------- lock and run directories

HOLD = """
import sys, time
from evomerge.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_second_process_and_is_taken_over_after_its_death(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the owner died: its lock is stale
    assert lock.took_over["pid"] == holder.pid
    lock.release()
    again = RunLock(tmp_path).acquire()
    assert again.took_over is None  # released cleanly this time
    again.release()


def test_fresh_run_dirs_are_unique_and_claimed_exclusively(tmp_path):
    code = "from evomerge.rundir import run_suffix; print(run_suffix())"
    suffixes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() for _ in range(3)}
    assert len(suffixes) == 3 and all(len(s) == 8 for s in suffixes)
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "config.yaml")
    assert OmegaConf.to_container(cfg.hydra.run)["dir"].endswith("_${em_suffix:}}")
    claim_fresh(tmp_path, "seed: 0\n")
    with pytest.raises(RunDirError, match="already holds a run; pass resume="):
        claim_fresh(tmp_path, "seed: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "seed: 0\n"


def test_damaged_subset_json_is_one_line(tmp_path):
    (tmp_path / "subset.json").write_bytes(b'{"toy_math": [1, 2, \x00')
    with pytest.raises(RunDirError, match=r"subset.json is damaged .* delete it to recompute it from fitness.subset_seed"):
        load_subset(tmp_path)


# ---------------------------------------------------------------- resume overrides


SAVED = {"search": {"max_evals": 48, "progress": True}, "algorithm": {"pop_size": 8}, "fitness": {"subset_size": 24}, "report": {"plots": True}}


def test_resume_accepts_safe_overrides():
    cfg = OmegaConf.create(SAVED)
    changed = apply_resume_overrides(cfg, ["resume=runs/x", "search.max_evals=80", "search.progress=false", "report.plots=false", "+executor.workers=2"])
    assert cfg.search.max_evals == 80 and cfg.search.progress is False and cfg.report.plots is False and cfg.executor.workers == 2
    assert changed[0] == "search.max_evals: 48 -> 80"
    # the test re-score's second score of differing points: added to a config made before the key existed
    assert apply_resume_overrides(cfg, ["fitness.test_rescore_searched=false"]) == ["fitness.test_rescore_searched: None -> False"]
    assert cfg.fitness.test_rescore_searched is False
    # repeating the original command line (same values or the same override strings) is harmless
    assert apply_resume_overrides(cfg, ["algorithm.pop_size=8", "algorithm=nsga2"], original=["algorithm=nsga2"]) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.pop_size=4", "fitness.subset_size=10"], "cannot change algorithm.pop_size, fitness.subset_size when resuming"),
        (["algorithm=ga"], "cannot change algorithm when resuming"),
        (["search.max_evals=40"], "search.max_evals can only grow on resume (the run has 48), got 40"),
    ],
)
def test_resume_refuses_unsafe_overrides_by_name(overrides, message):
    with pytest.raises(ConfigError) as exc:
        apply_resume_overrides(OmegaConf.create(SAVED), overrides)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- fingerprints and export targets


@pytest.fixture()
def models(tiny_models, tmp_path) -> dict[str, Path]:
    out = {}
    for k, v in tiny_models.items():
        shutil.copytree(v, tmp_path / "pool" / k)
        out[k] = tmp_path / "pool" / k
    return out


def test_fingerprints_catch_replaced_weights_unless_forced(models, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    roles = {"base": models["base"], "expert:a": models["a"]}
    (run / "fingerprints.json").write_text(json.dumps(fingerprints(roles)))
    check_fingerprints(run, fingerprints(roles), force=False, action="export")  # unchanged: fine
    shutil.copy(models["b"] / "model.safetensors", models["a"] / "model.safetensors")  # same size, other weights
    with pytest.raises(RunDirError, match=r"cannot export: the inputs changed since the run started: model 'expert:a' file model.safetensors: content changed; .* pass force=true"):
        check_fingerprints(run, fingerprints(roles), force=False, action="export")
    check_fingerprints(run, fingerprints(roles), force=True, action="export")
    assert "continuing (force=true)" in capsys.readouterr().err


def test_truncated_safetensors_is_named(models):
    f = models["a"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(RunDirError, match=r"model.safetensors is truncated: its header needs \d+ bytes, the file has \d+"):
        fingerprints({"expert:a": models["a"]})


def test_export_target_rules(models, tmp_path):
    pool = [models["base"], models["a"]]
    check_export_target(tmp_path / "new", pool, force=False)
    (tmp_path / "empty").mkdir()
    check_export_target(tmp_path / "empty", pool, force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model-00001-of-00002.safetensors").write_text("x")
    with pytest.raises(RunDirError, match="is not empty"):
        check_export_target(tmp_path / "full", pool, force=False)
    check_export_target(tmp_path / "full", pool, force=True)
    for target in (models["base"], models["a"] / "sub"):
        with pytest.raises(RunDirError, match="pool model folder"):
            check_export_target(target, pool, force=True)  # never, even forced


# ---------------------------------------------------------------- up-front checks


def cfg_with(**kw):
    base = {"dtype": "float32", "algorithm": {"pop_size": 8}, "genome": {"methods": ["ties", "task_arithmetic"], "ranges": {}}}
    c = OmegaConf.create(base)
    for k, v in kw.items():
        OmegaConf.update(c, k.replace("__", "."), v, force_add=True)
    return c


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm__pop_size": 0}, "algorithm.pop_size must be an integer of at least 2 (a population smaller than 2 cannot evolve), got 0"),
        ({"algorithm__pop_size": 1}, "algorithm.pop_size must be an integer of at least 2"),
        # model-based searches: a round of one is valid, zero is not (and says why in their terms)
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__pop_size": 0},
         "algorithm.pop_size must be an integer of at least 1 (candidates per round of the model), got 0"),
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__n_init": "x"}, "algorithm.n_init must be an integer, got 'x'"),
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__n_init": 2.5}, "algorithm.n_init must be an integer, got 2.5"),
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__n_init": -1}, "algorithm.n_init must be at least 0, got -1"),
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__acquisition": "ei"}, "algorithm.acquisition must be one of qlognehvi, qlognparego, ehvi, ehvi_update, got 'ei'"),
        ({"algorithm___target_": "evomerge.search.bayes.bo", "algorithm__raw_samples": 0}, "algorithm.raw_samples must be at least 1, got 0"),
        ({"genome__n_blocks": "many"}, "genome.n_blocks must be auto or an integer, got 'many'"),
        ({"genome__n_blocks": 0}, "genome.n_blocks must be between 1 and the model's layer count, got 0"),
        ({"fitness__final_front": "best"}, "fitness.final_front must be confirmation, pooled or search_scores, got 'best'"),
        ({"fitness__confirm_max_points": 0}, "fitness.confirm_max_points must be a positive integer, got 0"),
        ({"dtype": "float8_e4m3fn"}, "dtype must be one of auto, float32, bfloat16, float16, got 'float8_e4m3fn'"),
        ({"fitness__test_rescore_searched": "no"}, "fitness.test_rescore_searched must be true or false, got 'no'"),
        ({"genome__ranges": {"density": [0.1, 1.5]}}, "genome.ranges.density=[0.1, 1.5] is outside what merge method 'ties' accepts ([0.0, 1.0])"),
        ({"setup": {"folder": "/nonexistent/evomerge-setup", "command": "python make.py", "key": "data_dir"}},
         "reads models and tasks from /nonexistent/evomerge-setup, which does not exist: make them first with `python make.py` (or data_dir=<folder> where they are)"),
    ],
)
def test_config_mistakes_are_caught_up_front(overrides, message):
    with pytest.raises(ConfigError) as exc:
        check_config(cfg_with(**overrides))
    assert message in str(exc.value)


def test_n_init_at_least_the_budget_is_said_not_silent(capsys):
    check_config(cfg_with(algorithm___target_="evomerge.search.bayes.bo", algorithm__n_init=50, search__max_evals=48))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "algorithm.n_init=50 is at least the budget (search.max_evals=48)" in err and "the model proposes none" in err


def test_a_model_based_round_of_one_is_accepted():
    check_config(cfg_with(algorithm___target_="evomerge.search.bayes.bo", algorithm__pop_size=1, algorithm__n_init=4, search__max_evals=8))


def _tasks_cfg(tmp_path, extra_metric="exact_match,first-number"):
    return OmegaConf.create(
        {
            "fitness": {
                "objectives": [{"name": "math", "task": "toy_math", "metric": "exact_match,first-number"}],
                "extra": [{"name": "target", "task": "toy_target", "metric": extra_metric}],
                "include_paths": [str(tmp_path)],
            }
        }
    )


def test_task_checks(tmp_path):
    files = check_tasks(_tasks_cfg(tmp_path))
    assert {p.name for p in files["toy_math"]} == {"toy_math.yaml", "toy_math_train.jsonl", "toy_math_validation.jsonl", "toy_math_test.jsonl"}
    with pytest.raises(ConfigError, match=r"fitness.extra: task 'toy_target' has no metric 'acc,none' \(entry 'target'\); available: exact_match,first-number"):
        check_tasks(_tasks_cfg(tmp_path, "acc,none"))
    (tmp_path / "mine.yaml").write_text("task: my_task\noutput_type: generate\ndataset_path: json\n")
    cfg = _tasks_cfg(tmp_path)
    cfg.fitness.objectives.append({"name": "mine", "task": "my_task", "metric": "acc,none"})
    with pytest.raises(ConfigError, match=r"fitness task 'my_task' \(.*mine.yaml\): output_type 'generate' is not one of"):
        check_tasks(cfg)
    (tmp_path / "mine.yaml").write_text("task: my_task\noutput_type: [generate_until\n")
    with pytest.raises(ConfigError, match=r"fitness task 'my_task' not found: .*/mine.yaml has a YAML syntax error \(line 3: expected ',' or ']'"):
        check_tasks(cfg)


def test_nan_expert_weights_are_named(models, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from evomerge.checks import check_weights_finite
    from evomerge.errors import PoolError
    from evomerge.merge.merger import Merger
    from evomerge.pool import ModelPool

    f = models["b"] / "model.safetensors"
    state = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][0, 3] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    merger = Merger(ModelPool(models["base"], {"a": models["a"], "b": models["b"]}), device="cpu")
    with pytest.raises(PoolError, match=rf"expert 'b' has non-finite weights \(NaN or inf\) in {name}"):
        check_weights_finite(merger)
    assert torch.isfinite(merger._units[0].group.base).all()


def test_disk_errors_are_one_line(capsys):
    from evomerge.run import raise_user_errors

    @raise_user_errors
    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/summary.json")

    with pytest.raises(SystemExit) as exc:
        write()
    assert exc.value.code == 1
    assert capsys.readouterr().err == "evomerge: error: cannot write runs/x/summary.json: No space left on device; free space, then resume with resume=<run dir>\n"


# ---------------------------------------------------------------- the CLI end to end


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "evomerge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("evomerge: error:")]) == 1


def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\nsearch: {max_evals: 48}\nalgorithm: {pop_size: 8}\n")
    return run


@pytest.mark.slow
def test_mistyped_resume_leaves_the_folder_untouched(tmp_path):
    one_line_error(cli("resume=typo/run", cwd=tmp_path), "cannot resume: typo/run/config.yaml not found")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "notes").mkdir()
    proc = cli(f"resume={tmp_path / 'notes'}", cwd=tmp_path)
    one_line_error(proc, f"cannot resume: {tmp_path / 'notes' / 'config.yaml'} not found")
    assert list((tmp_path / "notes").iterdir()) == []  # no .hydra/, no log


@pytest.mark.slow
def test_cli_resume_refuses_while_locked_and_refuses_unsafe_overrides(tmp_path):
    run = fake_run(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(cli(f"resume={run}", cwd=tmp_path), f"{run} is in use by pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    proc = cli(f"resume={run}", "algorithm.pop_size=4", "seed=1", cwd=tmp_path)
    one_line_error(proc, "cannot change algorithm.pop_size, seed when resuming")
    assert not (run / ".hydra").exists() and "pop_size" not in (run / "run.log").read_text()  # the refused override is recorded nowhere
    assert (run / "config.yaml").read_text() == "seed: 0\nsearch: {max_evals: 48}\nalgorithm: {pop_size: 8}\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.pop_size=0"], "algorithm.pop_size must be an integer of at least 1 (candidates per round of the model), got 0"),
        (["algorithm=nsga2", "algorithm.pop_size=1"], "algorithm.pop_size must be an integer of at least 2 (a population smaller than 2 cannot evolve)"),
        (["algorithm.n_init=x"], "algorithm.n_init must be an integer, got 'x'"),
        (["algorithm.n_init=2.5"], "algorithm.n_init must be an integer, got 2.5"),
        (["genome.n_blocks=9"], "genome.n_blocks must be between 1 and the model's 4 layers, got 9"),
        (["executor=ray", "executor.mode=async", "algorithm=nsga2"], "supports async: bo, grid, hand_made, random, sobol"),
        (["dtype=float8_e4m3fn"], "dtype must be one of auto, float32, bfloat16, float16"),
        (["genome=layerwise_ties", "genome.ranges.density=[0.1,1.5]"], "genome.ranges.density=[0.1, 1.5] is outside what merge method"),
        (['fitness.extra=[{name: t, task: toy_target, metric: "acc,none"}]'], "fitness.extra: task 'toy_target' has no metric 'acc,none'"),
        (["+experiment=smollm2_k3", "smollm2_dir=/nonexistent/smollm2"], "make them first with `python experiments/smollm2/prepare.py` (or smollm2_dir=<folder> where they are)"),
    ],
)
def test_cli_config_mistakes_are_one_line_errors(overrides, message, tmp_path):
    one_line_error(cli(*overrides, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, timeout=120), message)
    assert not (tmp_path / "r").exists()  # a mistake leaves no run folder behind


def _copy_zoo(zoo, dest: Path) -> dict[str, Path]:
    out = {"base": dest / "base"}
    shutil.copytree(zoo.base, out["base"])
    for k, v in zoo.experts.items():
        shutil.copytree(v, dest / k)
        out[k] = dest / k
    return out


def _pool_args(models: dict[str, Path]) -> list[str]:
    return [
        "modelpool=paths", "fitness=toy", f"modelpool.base={models['base']}",
        *(f"+modelpool.experts.{k}={v}" for k, v in models.items() if k != "base"),
        "device=cpu", "fitness.subset_size=16", "fitness.extra=[]", "fitness.test_rescore=false", "report.plots=false",
    ]


@pytest.mark.slow
def test_cli_budget_resume_override_fingerprints_and_export_safety(test_zoo, tmp_path):
    models = _copy_zoo(test_zoo, tmp_path / "pool")
    run = tmp_path / "run"
    proc = cli(*_pool_args(models), "search.max_evals=20", "algorithm.pop_size=8", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "done: 20 candidates" in proc.stdout  # 20 is not a multiple of 8: stopped at the budget
    assert (run / "fingerprints.json").is_file() and not (run / ".hydra").exists()

    # the original command plus resume= and a larger budget: safe, the run continues
    proc = cli(*_pool_args(models), f"resume={run}", "search.max_evals=24", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # 4 more proposals; one that decodes to an already archived recipe is served from the archive
    assert "resume: search.max_evals: 20 -> 24" in proc.stderr and re.search(r"done: 2[1-4] candidates", proc.stdout)
    assert OmegaConf.load(run / "config.yaml").search.max_evals == 24
    keys = [r.key for r in Archive(run / "archive.jsonl").search_records()]
    assert len(keys) == len(set(keys)) and 21 <= len(keys) <= 24 and f"done: {len(keys)} candidates" in proc.stdout

    # export safety: never into a pool model, never over a non-empty folder unless forced
    one_line_error(cli("export", f"run={run}", f"out={models['base']}", "force=true", cwd=tmp_path), "pool model folder")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    one_line_error(cli("export", f"run={run}", f"out={tmp_path / 'busy'}", cwd=tmp_path), "is not empty (pass force=true")

    # an expert replaced in place: resume and export refuse unless forced
    shutil.copy(models["lang"] / "model.safetensors", models["math"] / "model.safetensors")
    one_line_error(cli(f"resume={run}", cwd=tmp_path), "cannot resume: the inputs changed since the run started: model 'expert:math' file model.safetensors")
    # a refused resume changes nothing: its larger budget is not written into config.yaml
    config_before = (run / "config.yaml").read_bytes()
    proc = cli(f"resume={run}", "search.max_evals=28", cwd=tmp_path)
    one_line_error(proc, "cannot resume: the inputs changed")
    assert "search.max_evals: 24 -> 28" not in proc.stderr and (run / "config.yaml").read_bytes() == config_before
    one_line_error(cli("export", f"run={run}", f"out={tmp_path / 'x'}", cwd=tmp_path), "cannot export: the inputs changed")
    proc = cli("export", f"run={run}", f"out={tmp_path / 'x'}", "force=true", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "x" / "model.safetensors").is_file(), proc.stderr


@pytest.mark.slow
def test_cli_truncated_model_is_one_line(test_zoo, tmp_path):
    models = _copy_zoo(test_zoo, tmp_path / "pool")
    f = models["math"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    one_line_error(cli(*_pool_args(models), f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path), "model.safetensors is truncated")


@pytest.mark.slow
def test_failing_references_stop_the_run(test_zoo, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config resolvers
    from evomerge.estimators.lm_eval_fitness import LmEvalFitness
    from evomerge.run import run_search

    def broken(self):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(LmEvalFitness, "__call__", broken)
    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=_pool_args({"base": test_zoo.base, **test_zoo.experts}) + ["search.max_evals=8", "algorithm.pop_size=4"])
    with pytest.raises(ConfigError, match="reference base failed, so every candidate would: RuntimeError: scorer exploded"):
        run_search(cfg, tmp_path / "run")
    assert not Archive(tmp_path / "run" / "archive.jsonl").search_records()
    RunLock(tmp_path / "run").acquire().release()  # the lock was released on the way out


def test_task_files_that_only_moved_still_match(tmp_path):
    """A checkout moved between start and resume (same files, other folder) resumes; a changed one does not."""
    for folder in ("old", "new"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "task.yaml").write_text("task: t\n")
        (tmp_path / folder / "data.jsonl").write_text('{"q": 1}\n')
    files = lambda folder: {"t": [tmp_path / folder / "task.yaml", tmp_path / folder / "data.jsonl"]}  # noqa: E731
    saved = fingerprints({}, files("old"))
    assert compare_fingerprints(saved, fingerprints({}, files("new"))) == []
    (tmp_path / "new" / "data.jsonl").write_text('{"q": 2}\n')
    problems = compare_fingerprints(saved, fingerprints({}, files("new")))
    assert problems == [f"task 't' file {tmp_path / 'old' / 'data.jsonl'}: content changed"]
