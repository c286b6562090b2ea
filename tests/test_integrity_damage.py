"""Run-directory integrity, round two (issue 24): the score cache, the archive reader under
random damage, failed report writes, report/compare on damaged runs, up-front checks of
numeric options, resume writing nothing before its checks, the Ray executor's exit paths."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from evomerge.checks import check_config
from evomerge.errors import ConfigError
from evomerge.score_cache import ENV_VAR, ScoreCache
from evomerge.search.archive import Archive

sys.path.insert(0, str(Path(__file__).parent))
from test_integrity import Counting, cfg_with, loop, rec, result  # noqa: E402
from test_report import DONE, FAKE_RECORDS, _simple, config, make_run  # noqa: E402

# ---------------------------------------------------------------- score cache

FINGERPRINTS = {"models": {"base": {"path": "/a", "files": {"model.safetensors": {"size": 10, "mtime_ns": 1, "sha1": "aa"}}}}}
RECIPE = {"evomerge_recipe": 1, "groups": [{"name": "layers", "method": "task_arithmetic", "params": {"weight": [0.5, 0.5]}}], "metadata": {}}
OTHER = {"evomerge_recipe": 1, "groups": [{"name": "layers", "method": "task_arithmetic", "params": {"weight": [0.2, 0.9]}}], "metadata": {}}


def test_cache_entry_with_altered_scores_is_ignored_with_one_warning(tmp_path, capsys):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {"split": "test"})
    cache.put(RECIPE, {"math": 0.0, "lang": 0.19})
    assert cache.get(RECIPE) == {"math": 0.0, "lang": 0.19}
    path = cache.path(RECIPE)
    entry = json.loads(path.read_text())
    entry["scores"] = {"math": 0.999, "lang": 0.999}  # valid JSON, wrong scores
    path.write_text(json.dumps(entry))
    assert cache.get(RECIPE) is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"score cache entry {path} ignored (checksum mismatch" in err


@pytest.mark.parametrize(
    "content, reason",
    [
        ("[1, 2, 3]", "not a score cache entry"),  # JSON, not a mapping
        ('{"scores": {"math": 0.5}}', "no checksum"),  # an entry of the first format
        ('{"scor', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
    ],
)
def test_malformed_cache_entries_are_scored_again(tmp_path, capsys, content, reason):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {})
    path = cache.path(RECIPE)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cache.get(RECIPE) is None
    assert reason in capsys.readouterr().err
    cache.put(RECIPE, {"math": 0.25})  # re-scored and replaced
    assert cache.get(RECIPE) == {"math": 0.25}


def test_cache_entry_filed_under_another_key_is_ignored(tmp_path, capsys):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {})
    cache.put(OTHER, {"math": 0.9})
    shutil.copy(cache.path(OTHER), cache.path(RECIPE))  # a well-formed entry, but of another recipe
    assert cache.get(RECIPE) is None
    assert "its inputs differ from this key's" in capsys.readouterr().err
    assert cache.get(OTHER) == {"math": 0.9}


def test_cache_path_that_is_a_file_is_a_one_line_error_at_start_up(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"EVOMERGE_SCORE_CACHE=.*/cache is not a folder"):
        check_config(cfg_with())
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "new"))
    check_config(cfg_with())
    assert (tmp_path / "new").is_dir()


def test_unwritable_cache_never_stops_the_run(tmp_path, capsys, monkeypatch):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("evomerge.score_cache.os.replace", full)
    cache.put(RECIPE, {"math": 0.5})
    cache.put(OTHER, {"math": 0.5})
    assert capsys.readouterr().err.count("score cache") == 1
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# ---------------------------------------------------------------- archive reader


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("full")
    loop(d).run(Counting())
    return d


def test_a_carriage_return_inside_a_record_loses_only_that_record(tmp_path):
    path = tmp_path / "archive.jsonl"
    a = Archive(path)
    for i in range(30):
        a.append(rec(i, i / 100))
    lines = path.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"search"', b'"sea\rrch"', 1)  # one \r inside a string of record 4
    path.write_bytes(b"\n".join(lines))
    b = Archive(path)
    assert [r.id for r in b.records] == [i for i in range(30) if i != 4]  # the 25 after it are kept
    assert b.torn_at is None and [(d.line, d.reason) for d in b.damaged] == [(5, "not JSON")]
    aside = b.quarantine_damaged()
    assert aside is not None and aside.read_bytes() == lines[4] + b"\n"
    assert [r.id for r in Archive(path).records] == [i for i in range(30) if i != 4]
    assert path.read_bytes() == b"\n".join(lines[:4] + lines[5:])  # the intact lines byte for byte


def test_a_rewrite_keeps_fields_of_newer_versions(tmp_path):
    from evomerge.search.archive import record_crc

    path = tmp_path / "archive.jsonl"
    data = {**rec(0, 0.5).__dict__, "time": 1733350000.5}
    data["_crc"] = record_crc(data)
    path.write_text(json.dumps(data) + "\n{oops\n")
    a = Archive(path)
    a.quarantine_damaged()
    assert json.loads(path.read_text())["time"] == 1733350000.5


def test_a_record_whose_checksum_key_was_hit_is_damaged(tmp_path):
    path = tmp_path / "archive.jsonl"
    a = Archive(path)
    for i in range(3):
        a.append(rec(i, i / 10))
    path.write_bytes(path.read_bytes().replace(b'"_crc"', b'"_crd"', 1))
    b = Archive(path)
    assert [r.id for r in b.records] == [1, 2] and [(d.line, d.reason) for d in b.damaged] == [(1, "no checksum")]


DAMAGE = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        st.tuples(
            st.just("insert"),
            st.floats(0, 1),
            st.sampled_from([b"\r", b"\0", b"\r\n", b"\n", b"\x1b[0m", b"\xff\xfe garbage", b'{"id": 99}\n', b"\n{}\n", b"}{", b"\x85", "\u2028".encode()]),
        ),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=DAMAGE)
def test_random_damage_never_loses_an_intact_record_and_resume_is_exact(full_run, edits):
    original = (full_run / "archive.jsonl").read_bytes()
    data = bytearray(original)
    for kind, where, what in edits:
        at = int(where * len(data))
        if kind == "flip":
            data[min(at, len(data) - 1)] ^= what
        else:
            data[at:at] = what
    damaged = bytes(data)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        shutil.copy(full_run / "checkpoint.pkl", run / "checkpoint.pkl")
        (run / "archive.jsonl").write_bytes(damaged)
        # a line of the original that is still a whole line (ends in \n) is intact and must be read
        whole = set(damaged.split(b"\n")[:-1])
        intact = {json.loads(line)["id"] for line in original.split(b"\n")[:-1] if line in whole}
        archive = Archive(run / "archive.jsonl")
        assert intact <= {r.id for r in archive.records}
        counting = Counting()
        loop(run).run(counting)  # resume: damaged lines moved aside, lost candidates evaluated again
        assert result(run) == result(full_run)
        assert intact <= {r.id for r in Archive(run / "archive.jsonl").records}
        assert counting.calls <= 30 - len(intact)


# ---------------------------------------------------------------- atomic writes, full disk


def test_failed_atomic_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    from evomerge.report.page import write_atomic as page_write
    from evomerge.rundir import write_atomic as run_write

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.replace", full)
    for write in (page_write, run_write):
        with pytest.raises(OSError):
            write(tmp_path / "report.html", "x" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_a_report_that_cannot_be_written_is_skipped_and_keeps_no_space(tmp_path, capsys, monkeypatch):
    from evomerge.report import refresh_report

    run = make_run(tmp_path / "r")

    def full(fd):  # the temporary file holds what was written; the disk fills up on the flush to it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    for _ in range(3):  # every generation tries again
        assert refresh_report(run, live=True) is None
    err = capsys.readouterr().err
    assert err.count("warning: report.html not written (") == 1 and "No space left on device" in err
    assert sorted(p.name for p in run.iterdir()) == ["archive.jsonl", "config.yaml", "summary.json"]


# ---------------------------------------------------------------- report and compare on damaged runs


def _garbage(run: Path, line: int = 4, raw: bytes = b"\x00\xff\xfe binary garbage\r\n") -> None:
    lines = (run / "archive.jsonl").read_bytes().split(b"\n")
    lines.insert(line, raw)
    (run / "archive.jsonl").write_bytes(b"\n".join(lines))


def cli_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    from evomerge import cli

    monkeypatch.setattr(sys, "argv", ["evomerge", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_and_compare_read_a_damaged_archive_and_name_the_lines(tmp_path, monkeypatch, capsys):
    from evomerge.report import write_run_report
    from evomerge.report.data import load_run

    run = make_run(tmp_path / "r")
    _garbage(run)
    assert len(load_run(run).points) == len(FAKE_RECORDS)
    assert "1 damaged line(s): 5 (not UTF-8 text)" in load_run(run).damage
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_main(monkeypatch, capsys, "report", "run=r")
    assert code == 0 and "report written to" in out
    assert "warning: r/archive.jsonl: 1 damaged line(s): 5 (not UTF-8 text); reporting the intact records" in err
    assert "skipped in the archive: r/archive.jsonl: 1 damaged line(s)" in (run / "report.html").read_text()
    code, out, err = cli_main(monkeypatch, capsys, "compare", "runs=[r]", "out=cmp")
    assert code == 0 and "1 damaged line(s): 5 (not UTF-8 text); compared on the intact records" in err
    assert (run / "archive.jsonl").read_bytes().count(b"binary garbage") == 1  # readers never rewrite the archive
    write_run_report(run, live=True)  # the live report keeps updating


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "config.yaml").unlink(), "config.yaml is missing: the report needs the run's config"),
        (lambda run: (run / "config.yaml").write_text("seed: [0\nfitness: {"), "config.yaml is damaged (line"),
        (lambda run: (run / "config.yaml").write_bytes(b"\xff\xfe\x00"), "config.yaml is damaged ("),
        (lambda run: (run / "config.yaml").write_text("- just\n- a list\n"), "config.yaml is damaged (not a mapping"),
    ],
)
def test_missing_or_broken_config_is_one_line(tmp_path, monkeypatch, capsys, damage, message):
    run = make_run(tmp_path / "r")
    damage(run)
    monkeypatch.chdir(tmp_path)
    for argv in (["report", "run=r"], ["compare", "runs=[r]", "out=cmp"]):
        code, _, err = cli_main(monkeypatch, capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_report_out_in_a_missing_folder_is_one_line(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "r")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(monkeypatch, capsys, "report", "run=r", "out=nowhere/report.html")
    assert code == 2 and err.strip() == "evomerge: error: out=nowhere/report.html: the folder nowhere does not exist; create it first"
    (tmp_path / "pages").mkdir()
    code, out, _ = cli_main(monkeypatch, capsys, "report", "run=r", "out=pages")  # a folder: report.html inside it
    assert code == 0 and (tmp_path / "pages" / "report.html").is_file()
    (tmp_path / "afile").write_text("x")
    code, _, err = cli_main(monkeypatch, capsys, "compare", "runs=[r]", "out=afile")
    assert code == 2 and "out=afile is a file" in err


def test_compare_leaves_out_empty_runs_marks_unfinished_and_warns_on_duplicate_seeds(tmp_path, capsys):
    from evomerge.report.compare import compare_runs

    runs = tmp_path / "runs"
    make_run(runs / "a-s0", _simple([(0.8, 0.2, 0), (0.5, 0.6, 1)]), DONE, config(0))
    make_run(runs / "a-s1", _simple([(0.5, 0.5, 0)]), None, config(1))  # killed: no summary.json
    make_run(runs / "a-s1-again", _simple([(0.4, 0.4, 0)]), DONE, config(1))  # the same seed again
    make_run(runs / "a-s2", [], None, config(2))  # started, nothing archived yet
    data = compare_runs(str(runs / "*"), out=tmp_path / "cmp")
    err = capsys.readouterr().err
    assert [[r["seed"] for r in g["runs"]] for g in data["groups"]] == [[0, 1, 1]]  # the empty run is left out
    assert "runs/a-s2 left out: no evaluated search candidate" in err
    assert "share seed 1; they are repeats of one run, not independent seeds" in err
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| 3 (0, 1*, 1) |" in md and "* unfinished run (no summary.json" in md and "left out: no evaluated search candidate" in md
    assert [r["finished"] for r in data["groups"][0]["runs"]] == [True, False, True]
    with pytest.raises(ConfigError, match="no run to compare: none has an evaluated search candidate"):
        compare_runs([str(runs / "a-s2")], out=tmp_path / "cmp2")


# ---------------------------------------------------------------- up-front checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fitness__subset_size": 1.5}, "fitness.subset_size must be an integer, got 1.5"),
        ({"fitness__batch_size": 0}, "fitness.batch_size must be at least 1, got 0"),
        ({"fitness__subset_seed": -3}, "fitness.subset_seed must be at least 0, got -3"),
        ({"seed": -1}, "seed must be at least 0, got -1"),
        ({"seed": 99999999999}, "seed must be at most 4294967295, got 99999999999"),
        ({"seed": "one"}, "seed must be an integer, got 'one'"),
        ({"search__max_evals": 2.5}, "search.max_evals must be an integer, got 2.5"),
        ({"algorithm__pop_size": 100000, "search__max_evals": 48}, "algorithm.pop_size=100000 is too large (at most 10000"),
        ({"device": "meta"}, "device must be auto, cpu, cuda or cuda:<index>, got 'meta'"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:<index>, got 'gpu'"),
        ({"search__ref_point": [1.0, "x"]}, "search.ref_point must be a list of finite numbers"),
    ],
)
def test_numeric_options_and_device_are_checked_up_front(overrides, message):
    with pytest.raises(ConfigError) as exc:
        check_config(cfg_with(**overrides))
    assert message in str(exc.value)


def test_a_gpu_device_without_a_gpu_is_refused_up_front(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device=cuda:1: no GPU is available here"):
        check_config(cfg_with(device="cuda:1"))


def test_valid_numbers_pass_and_a_population_above_the_budget_is_noted(capsys):
    check_config(cfg_with(seed=2**32 - 1, fitness__subset_size=16, fitness__batch_size=8, device="cpu", search__max_evals=8.0))
    check_config(cfg_with(algorithm__pop_size=16, search__max_evals=8))
    assert "note: algorithm.pop_size=16 is larger than search.max_evals=8: only the first 8 candidates" in capsys.readouterr().err


def test_config_value_refuses_a_fractional_integer():
    from evomerge.session import config_value

    with pytest.raises(ConfigError, match="config value 'fitness.subset_size' must be int, got 1.5"):
        config_value(OmegaConf.create({"fitness": {"subset_size": 1.5}}), "fitness.subset_size", int, positive=True)
    assert config_value(OmegaConf.create({"n": 4.0}), "n", int) == 4


def test_an_expert_that_is_the_base_is_warned_about(tiny_models, capsys):
    from evomerge.checks import warn_zero_task_vectors
    from evomerge.merge.merger import Merger
    from evomerge.pool import ModelPool

    merger = Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "same": tiny_models["base"]}), device="cpu")
    assert warn_zero_task_vectors(merger) == ["same"]
    err = capsys.readouterr().err
    assert "warning: expert 'same' is (nearly) identical to the base" in err and "'a'" not in err


# ---------------------------------------------------------------- resume writes nothing before its checks


def test_resume_writes_config_changes_only_when_committed(tmp_path, capsys):
    from evomerge.rundir import commit_resume_changes, open_run_dir

    run = tmp_path / "run"
    first = OmegaConf.create({"seed": 0, "resume": None, "search": {"max_evals": 16}})
    open_run_dir(first, run, ["seed=0"])[2].release()
    before = (run / "config.yaml").read_text()
    again = OmegaConf.create({"seed": 0, "resume": str(run), "force": False, "search": {"max_evals": 24}})
    cfg, _, lock = open_run_dir(again, run, [f"resume={run}", "search.max_evals=24"])
    try:
        assert cfg.search.max_evals == 24
        assert (run / "config.yaml").read_text() == before  # a check after this may still refuse the resume
        assert "max_evals" not in capsys.readouterr().err
        commit_resume_changes(lock)
    finally:
        lock.release()
    assert OmegaConf.load(run / "config.yaml").search.max_evals == 24
    assert "resume: search.max_evals: 16 -> 24" in capsys.readouterr().err


# ---------------------------------------------------------------- Ray executor exit paths


def test_sigterm_unwinds_like_ctrl_c_while_an_executor_is_open():
    from evomerge.executors.ray_executor import _restore_sigterm, _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)  # pytest's or SIG_DFL, whatever ran before
    previous = _sigterm_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)  # the handler runs here
    finally:
        _restore_sigterm(previous)
    assert signal.getsignal(signal.SIGTERM) is before


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = {int(c) for c in children.read_text().split()}
            except OSError:
                continue
            todo += list(kids - out)
            out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_of_a_ray_driver_leaves_no_ray_processes(test_zoo, tmp_path):
    pytest.importorskip("ray")
    from test_executor import _pool_args

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    run = tmp_path / "run"
    args = [sys.executable, "-m", "evomerge", *_pool_args(test_zoo), "search.max_evals=16", "executor=ray", "executor.workers=1", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        seen |= _descendants(proc.pid)
        archive = run / "archive.jsonl"
        if archive.exists() and archive.read_text().count('"kind": "search"') >= 2:
            break
        time.sleep(0.2)
    seen |= _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted; resume with" in out, out[-2000:]
    assert seen, "no Ray processes were started"
    deadline = time.time() + 30  # well below the minute or two Ray takes to notice a lost driver
    while time.time() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.5)
    assert not [p for p in seen if _alive(p)], out[-2000:]


def test_ray_executor_leaves_sigterm_as_it_found_it(tmp_path, monkeypatch):
    """ray.init installs its own SIGTERM handler and ray.shutdown leaves it: an executor that
    started Ray puts back the handler from before ray.init when it closes (a fake Ray here)."""
    import types

    from omegaconf import OmegaConf

    from evomerge.executors.ray_executor import RayExecutor

    def rays_handler(signum, frame):  # what ray.init installs
        raise SystemExit(signum)

    state = {"up": False}

    def init(**kwargs):
        state["up"] = True
        signal.signal(signal.SIGTERM, rays_handler)

    class Actor:  # stands for an actor handle: ready() answers at once
        ready = types.SimpleNamespace(remote=lambda: os.getpid())

    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: state["up"]
    fake.init = init
    fake.shutdown = lambda: state.update(up=False)
    fake.cluster_resources = lambda: {"CPU": 2}
    fake.remote = lambda **options: (lambda cls: types.SimpleNamespace(remote=lambda *args: Actor()))
    fake.get = lambda refs: refs
    fake.kill = lambda *args, **kwargs: None
    fake.exceptions = types.ModuleType("ray.exceptions")
    fake.exceptions.RayTaskError = type("RayTaskError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.exceptions", fake.exceptions)
    before = signal.getsignal(signal.SIGTERM)
    executor = RayExecutor(OmegaConf.create({}), tmp_path, workers=1)
    try:
        assert signal.getsignal(signal.SIGTERM) not in (before, rays_handler)  # ours while open
    finally:
        executor.close()
    assert signal.getsignal(signal.SIGTERM) is before
