"""``evomerge reproduce``: a recorded run is run again and compared record by record."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.reproduce import compare_environments, compare_records, reproduce

pytestmark = pytest.mark.slow

FITNESS = Path(__file__).resolve().parents[1] / "fitness"


def tiny_search(run: Path, *extra: str) -> None:
    """A few candidates of a random search on a tiny pool (seconds), in this process."""
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search

    overrides = [
        "search.max_evals=4", "algorithm=random", "algorithm.pop_size=2", "genome=modelwise_ta", "genome.layer_groups=1",
        "fitness.subset_size=8", "fitness.extra=[]", "fitness.test_rescore=false", "report.html=false", "report.plots=false",
        "search.progress=false", "device=cpu", *extra,
    ]
    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_search(cfg, run, overrides=[])


def copy_pool(zoo, folder: Path) -> list[str]:
    """The zoo's models copied (so a test may change them), as pool overrides."""
    models = {"base": zoo.base, **zoo.experts}
    for name, src in models.items():
        shutil.copytree(src, folder / name)
    return ["modelpool=paths", "fitness=toy", f"modelpool.base={folder / 'base'}", *(f"+modelpool.experts.{k}={folder / k}" for k in zoo.experts)]


def test_a_tiny_run_reproduces_identically(tmp_path):
    run = tmp_path / "run"
    tiny_search(run, "modelpool.size=tiny")
    result = reproduce(run, out=tmp_path / "again")
    assert result.identical, result.lines()
    assert result.compared == len((run / "archive.jsonl").read_text().splitlines())
    assert result.environment == []
    assert result.lines()[0].startswith("identical")


def test_cli_exit_codes_and_a_faked_library_version(tmp_path):
    run = tmp_path / "run"
    tiny_search(run, "modelpool.size=tiny", "search.max_evals=2")
    env = json.loads((run / "environment.json").read_text())
    env["versions"]["torch"] = "0.0.1-faked"
    (run / "environment.json").write_text(json.dumps(env))
    proc = subprocess.run([sys.executable, "-m", "evomerge", "reproduce", f"run={run}", f"out={tmp_path / 'again'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("identical") for line in lines)
    torch_lines = [line for line in lines if "torch 0.0.1-faked in the original" in line]
    assert len(torch_lines) == 1
    # user mistakes: one line, exit 2
    bad = subprocess.run([sys.executable, "-m", "evomerge", "reproduce", f"run={tmp_path / 'nope'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not an evomerge run directory" in bad.stderr
    more = subprocess.run([sys.executable, "-m", "evomerge", "reproduce", f"run={run}", "max_evals=50"], capture_output=True, text=True, timeout=120)
    assert more.returncode == 2 and "evaluated only 2 search candidates" in more.stderr


def test_a_changed_expert_file_is_named_and_the_records_differ(test_zoo, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    pool = copy_pool(test_zoo, tmp_path / "pool")
    run = tmp_path / "run"
    tiny_search(run, *pool)
    weights = tmp_path / "pool" / "math" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if "layers.0.mlp" in k)
    tensors[name] = tensors[name] + 0.5 * torch.ones_like(tensors[name])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    result = reproduce(run, out=tmp_path / "again")
    assert not result.identical
    assert "record" in result.first_difference and "scores" in result.first_difference or "genome" in result.first_difference
    changed = [line for line in result.environment if "expert:math weights digest" in line]
    assert len(changed) == 1 and len(result.environment) == 1, result.environment


def test_a_changed_task_file_is_named(test_zoo, tmp_path):
    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    text = (FITNESS / "toy_lang.yaml").read_text().replace("task: toy_lang", "task: my_lang")
    (tasks / "my_lang.yaml").write_text(text)
    for split in ("train", "validation", "test"):
        shutil.copy(FITNESS / "data" / f"toy_lang_{split}.jsonl", tasks / "data" / f"toy_lang_{split}.jsonl")
    objectives = "fitness.objectives=[{name: math, task: toy_math, metric: 'exact_match,first-number'}, {name: lang, task: my_lang, metric: 'acc,none'}]"
    run = tmp_path / "run"
    tiny_search(run, "modelpool.size=tiny", f"fitness.include_paths=[{tasks}]", objectives)
    # change every answer's text of the validation split: the task's file is no longer the run's
    path = tasks / "data" / "toy_lang_validation.jsonl"
    path.write_text(path.read_text().replace('"', '"', 1) + "\n")
    result = reproduce(run, out=tmp_path / "again")
    changed = [line for line in result.environment if "my_lang" in line]
    assert len(changed) == 1 and "toy_lang_validation.jsonl" in changed[0], result.environment


def test_compare_records_names_the_first_difference_and_by_how_much():
    a = [{"id": 0, "kind": "reference", "label": "base", "genome": None, "recipe": {"k": 1}, "scores": {"m": 0.5}, "error": None},
         {"id": 1, "kind": "search", "label": None, "genome": [0.1, 0.2], "recipe": {"k": 2}, "scores": {"m": 0.6}, "error": None}]
    same = json.loads(json.dumps(a))
    assert compare_records(a, same) == (2, None)
    b = json.loads(json.dumps(a))
    b[1]["scores"]["m"] = 0.65
    n, text = compare_records(a, b)
    assert n == 1 and "archive id 1" in text and "up to 0.05" in text
    c = json.loads(json.dumps(a))
    c[1]["genome"] = [0.1, 0.25]
    assert "genomes differ by up to 0.05" in compare_records(a, c)[1]


def test_compare_environments_one_line_per_difference():
    env = {"versions": {"torch": "2.13.0"}, "models": {"weights_digest": {"base": "a" * 64}, "pool_digest": "p" * 64},
           "device": "cpu", "dtype": "float32", "cpu_capability": "AVX2", "threads": {"torch_threads": 2}}
    other = json.loads(json.dumps(env))
    assert compare_environments(env, other) == []
    other.update(dtype="bfloat16", cpu_capability="AVX512", threads={"torch_threads": 1})
    other["models"]["weights_digest"]["base"] = "b" * 64
    lines = compare_environments(env, other)
    assert len(lines) == 4 and any("base weights digest aaaaaaaaaaaa" in line for line in lines)
    assert compare_environments(None, other)[0].startswith("the original run has no readable environment.json")
