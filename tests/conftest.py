"""Shared fixtures: tiny models built in the test session (never downloaded)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The default zoo's shape, trained like the first release's zoo (full fine-tunes, no replay)
# with half its steps (~30 s on 2 cores): its experts differ clearly (math expert ~0.8 on
# math, lang expert ~1.0 on lang), which is what the pipeline tests need.
TEST_ZOO_SETTINGS = dict(
    pretrain_steps=300, finetune_steps=300, finetune_lr=2e-3, pretrain_skill_share=0.05, pretrain_skill_mix=None, lora_rank=0, finetune_replay=0.0
)


def make_llama(folder: Path, seed: int, intermediate_size: int = 48, perturb_from: Path | None = None, scale: float = 0.05):
    """A random 2-layer Llama saved with the character tokenizer; experts are the base
    plus a seeded perturbation, so their task vectors are known and small."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.build import build_tokenizer

    tok = build_tokenizer(folder)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(str(perturb_from))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    else:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": make_llama(root / "a", seed=1, perturb_from=base),
        "b": make_llama(root / "b", seed=2, perturb_from=base),
    }


# The test zoo is data (tests/data/test_zoo, made once by tests/data/make_test_zoo.py): a zoo
# trained in the test session differed by machine (threads, AVX2 vs AVX512), and so did every
# threshold a test drew from it.
TEST_ZOO_DIR = Path(__file__).resolve().parent / "data" / "test_zoo"


@pytest.fixture(scope="session")
def test_zoo():
    import json

    from evomerge.zoo.build import Zoo, ZooConfig
    from evomerge.zoo.shipped import check_model

    record = json.loads((TEST_ZOO_DIR / "zoo.json").read_text())
    if record["config_key"] != ZooConfig(**TEST_ZOO_SETTINGS).key():
        pytest.fail("tests/data/test_zoo was trained with other settings than TEST_ZOO_SETTINGS: run python tests/data/make_test_zoo.py")
    zoo = Zoo(TEST_ZOO_DIR, TEST_ZOO_DIR / "base", {n: TEST_ZOO_DIR / f"expert_{n}" for n in ("math", "lang")}, TEST_ZOO_DIR / "base")
    for role, folder in {"base": zoo.base, **{f"expert:{n}": p for n, p in zoo.experts.items()}}.items():
        check_model(folder, record["weights_digest"][role], role)
    return zoo


def kill_when_searched(proc: subprocess.Popen, run: Path, after: int, timeout: float = 400) -> None:
    """SIGKILL ``proc`` (a search writing ``run``) once ``after`` search candidates are in its
    archive, or when it ended or ``timeout`` seconds passed: a kill that lands mid-run."""
    deadline = time.time() + timeout
    archive = run / "archive.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if archive.exists() and sum('"kind": "search"' in line for line in archive.read_text().splitlines()) >= after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
