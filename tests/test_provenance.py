"""Provenance: weight digests, the zoo's record, environment.json (first start kept, a
differing resume appended), the environment line of report and compare, a fast --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge import provenance
from evomerge.provenance import environment_line, pool_digest, record_run_environment, weights_digest


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=gen), "b.bias": torch.randn(5, generator=gen), "c": torch.randn(2, 2, generator=gen).to(torch.bfloat16)}


def test_weights_digest_depends_on_the_weights_not_the_file_layout(tmp_path):
    tensors = _tensors()
    one = tmp_path / "one"
    one.mkdir()
    save_file(tensors, one / "model.safetensors", metadata={"format": "pt"})
    sharded = tmp_path / "sharded"  # other order, two shards, other metadata: same weights
    sharded.mkdir()
    save_file({"c": tensors["c"], "b.bias": tensors["b.bias"]}, sharded / "model-00001-of-00002.safetensors")
    save_file({"a.weight": tensors["a.weight"]}, sharded / "model-00002-of-00002.safetensors", metadata={"x": "y"})
    assert weights_digest(one) == weights_digest(sharded) is not None

    changed = dict(tensors)
    changed["a.weight"] = tensors["a.weight"].clone()
    changed["a.weight"][1, 2] = torch.nextafter(changed["a.weight"][1, 2], torch.tensor(10.0))  # one ulp
    other = tmp_path / "other"
    other.mkdir()
    save_file(changed, other / "model.safetensors")
    assert weights_digest(other) != weights_digest(one)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file({("z" if k == "c" else k): v for k, v in tensors.items()}, renamed / "model.safetensors")
    assert weights_digest(renamed) != weights_digest(one)  # names count
    assert weights_digest(tmp_path / "nothing_here") is None


def test_pool_digest_needs_every_model():
    assert pool_digest({"base": "1", "expert:a": "2"}) == pool_digest({"expert:a": "2", "base": "1"})
    assert pool_digest({"base": "1", "expert:a": "2"}) != pool_digest({"base": "1", "expert:a": "3"})
    assert pool_digest({"base": "1", "expert:a": None}) is None


@pytest.mark.slow
def test_tiny_zoo_is_rebuilt_with_identical_weights_and_recorded(tmp_path):
    """Same machine, same versions: the zoo is bit-for-bit reproducible, and zoo.json says so."""
    from evomerge.zoo.build import TINY, build_zoo

    first, second = build_zoo(tmp_path / "a", TINY), build_zoo(tmp_path / "b", TINY)
    rec_a, rec_b = (json.loads((z.root / "zoo.json").read_text()) for z in (first, second))
    for folder_a, folder_b in [(first.base, second.base), *((first.experts[k], second.experts[k]) for k in first.experts)]:
        wa, wb = load_file(str(folder_a / "model.safetensors")), load_file(str(folder_b / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rec_a["digest"] == rec_b["digest"] is not None
    assert rec_a["weights_digest"]["base"] == weights_digest(first.base)
    assert set(rec_a["weights_digest"]) == {"base", *(f"expert:{k}" for k in first.experts)}
    assert rec_a["built_with"]["torch"] == torch.__version__ and rec_a["built_with"]["evomerge"]
    assert rec_a["base_built_with"] == rec_a["built_with"]
    # the digests differ between the base and an expert (a digest that ignored the weights could not)
    assert rec_a["weights_digest"]["base"] != rec_a["weights_digest"]["expert:math"]


def _env(**changes):
    env = {"recorded_at": "t0", "versions": {"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6", "python": "3.11.7", "evomerge": "0.1.0"},
           "git": {"commit": "0123456789abcdef", "dirty": False}, "device": "cpu", "cpu_capability": "AVX2", "dtype": "float32",
           "threads": {"torch_threads": 2}, "models": {"pool_digest": "feedbeef" * 8}, "zoo": {"digest": "abcdef012345" + "0" * 52}}
    env.update(changes)
    return env


def test_environment_json_keeps_the_first_start_and_adds_a_differing_resume(tmp_path):
    record_run_environment(tmp_path, _env())
    record_run_environment(tmp_path, _env(recorded_at="t1", argv=["resume=x"]))  # same environment: nothing added
    data = json.loads((tmp_path / "environment.json").read_text())
    assert data["recorded_at"] == "t0" and "resumes" not in data
    newer = _env(recorded_at="t2", versions={**_env()["versions"], "transformers": "5.26.0"})
    record_run_environment(tmp_path, newer)
    record_run_environment(tmp_path, {**newer, "recorded_at": "t3"})  # same as the latest: not repeated
    data = json.loads((tmp_path / "environment.json").read_text())
    assert data["recorded_at"] == "t0" and data["versions"]["transformers"] == "5.25.0"  # the first start is kept
    assert [r["recorded_at"] for r in data["resumes"]] == ["t2"]
    assert "resumed 1x in a different environment" in environment_line(data)


def test_environment_line():
    line = environment_line(_env())
    assert line == ("torch 2.13.0+cpu, transformers 5.25.0, numpy 2.4.6, python 3.11.7, evomerge 0.1.0; git 0123456789; "
                    "cpu (AVX2) float32, 2 threads; zoo digest abcdef012345")
    assert environment_line(_env(zoo=None)).endswith("models digest feedbeeffeed")
    assert "not recorded" in environment_line(None)


def test_run_environment_of_real_models(tiny_models):
    models = {"base": tiny_models["base"], "expert:a": tiny_models["a"]}
    env = provenance.run_environment(models, "cpu", "float32")
    assert env["versions"]["torch"] == torch.__version__
    assert env["models"]["weights_digest"]["base"] == weights_digest(tiny_models["base"])
    assert env["models"]["pool_digest"] == pool_digest(env["models"]["weights_digest"])
    assert env["threads"]["torch_threads"] == torch.get_num_threads()
    assert "zoo" not in env  # not the toy zoo
    skipped = provenance.models_provenance(models, limit=0)  # too big to hash at run start: null, not a wrong value
    assert skipped == {"weights_digest": {"base": None, "expert:a": None}, "pool_digest": None}


def test_report_and_compare_show_the_environment(tmp_path):
    from test_report import make_run  # the hand-built run of the report tests

    from evomerge.report import build_report
    from evomerge.report.compare import compare_runs
    from evomerge.report.data import load_run

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    record_run_environment(a, _env())
    html, data = build_report(load_run(a))
    assert "environment: torch 2.13.0+cpu, transformers 5.25.0" in html and data["environment"]["dtype"] == "float32"
    compare_runs([str(a)], out=tmp_path / "one")
    md = (tmp_path / "one" / "compare.md").read_text()
    assert "environment: torch 2.13.0+cpu" in md and "zoo digest abcdef012345" in md
    assert "zoo digest abcdef012345" in (tmp_path / "one" / "compare.html").read_text()
    compare_runs([str(a), str(b)], out=tmp_path / "two")
    md = (tmp_path / "two" / "compare.md").read_text()
    assert "environments differ" in md and "not recorded" in md


def test_help_names_the_commands_and_imports_no_heavy_library(tmp_path):
    code = (
        "import sys, time\n"
        "sys.argv = ['evomerge', '--help']\n"
        "from evomerge.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib') if m in sys.modules))\n"
    )
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "HEAVY []" in out  # what keeps it under a second or two: nothing heavy imported
    assert out.startswith("evomerge: ") and "powered by Hydra" not in out
    for text in ("usage:", "evomerge export run=", "evomerge report run=", "evomerge compare runs=", "resume=", "algorithm: "):
        assert text in out, text
    print(f"evomerge --help took {elapsed:.2f} s")


def test_subcommand_help(capsys):
    from evomerge.cli import compare_main, export_main

    for command in (export_main, compare_main):
        with pytest.raises(SystemExit) as exc:
            command(["--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: evomerge export run=" in out and "usage: evomerge compare runs=" in out


def test_the_zoo_build_and_plots_print_no_warnings(tmp_path):
    """The zoo's own float(loss) UserWarning and matplotlib's font-cache / findfont lines stay quiet."""
    code = (
        "import logging\n"
        "from evomerge.zoo.build import ZooConfig, build_zoo\n"
        f"build_zoo({str(tmp_path / 'zoo')!r}, ZooConfig(hidden_size=16, intermediate_size=16, num_layers=1, num_heads=1, pretrain_steps=2, finetune_steps=2, batch_size=4, lora_rank=2))\n"
        "from evomerge.plotting import pyplot\n"
        "plt = pyplot()\n"
        "logging.getLogger('matplotlib.font_manager').warning('Matplotlib is building the font cache; this may take a moment.')\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert "font cache" not in proc.stderr and "requires_grad" not in proc.stderr and "zoo/build.py" not in proc.stderr, proc.stderr
