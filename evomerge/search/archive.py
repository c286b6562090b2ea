"""Append-only archive of every evaluated candidate (JSON Lines).

Each record is written with a single ``write`` of one line, flushed and fsync'ed, so
a hard kill loses at most the candidate in flight; a torn last line is ignored on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def genome_key(x: np.ndarray | list[float]) -> str:
    """Identity of a genome: equal up to 1e-9 means the same candidate."""
    rounded = np.round(np.asarray(x, dtype=float), 9) + 0.0  # +0.0 folds -0.0 into 0.0
    return hashlib.sha1(rounded.tobytes()).hexdigest()[:16]


@dataclass
class Record:
    id: int
    kind: str  # "search" or "reference" (base, experts)
    key: str
    genome: list[float] | None
    recipe: dict[str, Any]
    scores: dict[str, float]
    losses: list[float]  # the minimised objectives (1 - score), worst on error
    error: str | None = None
    label: str | None = None
    generation: int | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)  # standard error per score
    fidelity: dict[str, int] = field(default_factory=dict)  # items each score came from


class Archive:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[Record] = list(self._read()) if self.path.exists() else []
        self.by_key = {r.key: r for r in self.records}

    def _read(self) -> Iterator[Record]:
        with self.path.open() as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write from a kill: drop it, it will be re-evaluated
                try:
                    yield Record(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue

    def append(self, record: Record) -> None:
        line = json.dumps(asdict(record), allow_nan=False, default=float) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.by_key[record.key] = record

    def next_id(self) -> int:
        return 1 + max((r.id for r in self.records), default=-1)

    def search_records(self) -> list[Record]:
        return [r for r in self.records if r.kind == "search"]
