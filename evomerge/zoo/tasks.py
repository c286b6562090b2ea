"""Synthetic skills of the toy zoo, generated deterministically from a seed.

- ``math`` (skill A): two-number addition written in digits, ``M:12+35= 47``.
- ``lang`` (skill B): the toy "second language" writes digits as letters (0=a ... 9=j);
  the skill is reading it, ``L:eh= 47``.
- ``target`` (needs both at once, the miniature of "Japanese + math"): an addition
  question written in the second language with a digit answer, ``M:bc+df= 47``.
  No model is trained on it.
- ``rev`` (skill C, the third expert of the 3-expert zoo, evomerge/zoo/k3.py): writing a
  3-4 digit string backwards, ``R:4721= 1274``. The base never sees it in pre-training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LETTERS = "abcdefghij"
MAX_OPERAND = 49


def to_lang(n: int) -> str:
    return "".join(LETTERS[int(c)] for c in str(n))


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


def math_example(rng: random.Random) -> Example:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return Example(f"M:{a}+{b}=", str(a + b))


def lang_example(rng: random.Random) -> Example:
    n = rng.randint(0, 999)
    return Example(f"L:{to_lang(n)}=", str(n))


def target_example(rng: random.Random) -> Example:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return Example(f"M:{to_lang(a)}+{to_lang(b)}=", str(a + b))


def rev_example(rng: random.Random) -> Example:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 4)))
    return Example(f"R:{digits}=", digits[::-1])


def noise_text(rng: random.Random) -> str:
    """Generic "pre-training" text: counting runs and letter/digit words."""
    if rng.random() < 0.5:
        start = rng.randint(0, 90)
        return " ".join(str(start + i) for i in range(rng.randint(3, 6))) + "\n"
    words = ["".join(rng.choice(LETTERS + "klmnopqrstuvwxyz") for _ in range(rng.randint(2, 5))) for _ in range(3)]
    return " ".join(words) + "\n"


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "math": math_example,
    "lang": lang_example,
    "target": target_example,
    # appended last: the other skills' data files and training streams do not depend on it
    "rev": rev_example,
}


def examples(skill: str, seed: int) -> Iterator[Example]:
    rng = random.Random(f"{skill}:{seed}")
    while True:
        yield SKILLS[skill](rng)


def lang_choices(answer: str, rng: random.Random) -> tuple[list[str], int]:
    """Four candidate readings: the right one and three near misses."""
    n = int(answer)
    options = {answer}
    candidates = [str(n + d) for d in (-10, -2, -1, 1, 2, 10, 11) if n + d >= 0]
    if len(set(answer)) > 1 and answer[-1] != "0":
        candidates.append(answer[::-1])
    rng.shuffle(candidates)
    for c in candidates:
        if len(options) == 4:
            break
        options.add(c)
    ordered = sorted(options, key=lambda s: (len(s), s))
    return ordered, ordered.index(answer)


# ---------------------------------------------------------------- fitness data files

SPLITS = {"train": 32, "validation": 200, "test": 200}


def fitness_records(skill: str, split: str, seed: int = 0) -> list[dict]:
    """Distinct examples per split; splits never share a prompt."""
    rng = random.Random(f"fitness:{skill}:{seed}")
    seen: set[str] = set()
    ordered: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for name, size in SPLITS.items():
        while len(ordered[name]) < size:
            ex = SKILLS[skill](rng)
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
            rec: dict = {"id": len(ordered[name]), "question": ex.prompt, "answer": ex.answer}
            if skill == "lang":
                rec["choices"], rec["label"] = lang_choices(ex.answer, rng)
            ordered[name].append(rec)
    return ordered[split]


def held_out_prompts(seed: int = 0) -> set[str]:
    """Every validation/test prompt, so training data can exclude them."""
    return {r["question"] for skill in SKILLS for split in ("validation", "test") for r in fitness_records(skill, split, seed)}


def write_fitness_data(folder: Path, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for skill in SKILLS:
        for split in SPLITS:
            path = folder / f"toy_{skill}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in fitness_records(skill, split, seed)))
            written.append(path)
    return written
