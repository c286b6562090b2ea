"""Append-only archive of every evaluated candidate (JSON Lines).

Each record is written with a single ``write`` of one line, flushed and fsync'ed, so
a hard kill loses at most the candidate in flight. Every line carries ``_crc``, a
checksum of the record's JSON (all keys but ``_crc``, so records with fields added
later keep verifying). Loading (:func:`read_lines`, shared with the report) splits on
``\n`` only and sorts lines into good records, *damaged* lines (bad bytes, bad JSON,
checksum mismatch) and a *torn tail* (only ever the last piece, without newline, from a
kill or a full disk); a damaged line never hides the records after it. The writer
truncates the torn tail before its first append and can move damaged lines aside
(:meth:`Archive.quarantine_damaged`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError

CRC_KEY = "_crc"


class ArchiveWriteError(EvomergeError):
    """The archive (or checkpoint) could not be written, e.g. the disk is full."""


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


def record_crc(data: dict[str, Any]) -> str:
    """Checksum of a record's fields (``_crc`` itself excluded), independent of key order."""
    body = {k: v for k, v in data.items() if k != CRC_KEY}
    return hashlib.sha1(json.dumps(body, sort_keys=True, allow_nan=False, default=float).encode()).hexdigest()[:12]


def _record_from(data: dict[str, Any]) -> Record:
    known = {f.name for f in dataclasses.fields(Record)}
    return Record(**{k: v for k, v in data.items() if k in known})  # keys of newer versions are tolerated


@dataclass(frozen=True)
class Damaged:
    line: int  # 1-based line number in the file
    reason: str
    raw: bytes


@dataclass
class Lines:
    """An archive file sorted into verified JSON objects, damaged lines and a torn tail."""

    items: list[tuple[int, dict[str, Any]]]  # (1-based line number, the object)
    damaged: list[Damaged]
    torn_at: int | None  # byte offset where a torn last piece starts
    torn_bytes: int
    raw: dict[int, bytes]  # line number -> its bytes, for the objects in ``items``


def read_lines(data: bytes) -> Lines:
    """Split archive bytes on ``\\n`` only (never on ``\\r`` or other line breaks Python
    knows: a stray byte must not split a record) and check every line on its own. Only the
    last piece, when it lacks its newline, is a torn tail; a damaged line anywhere else is
    named and never hides the records after it. A line without ``_crc`` in a file whose
    other lines carry one is damaged too (the key itself was hit)."""
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline
    items: list[tuple[int, dict[str, Any]]] = []
    damaged: list[Damaged] = []
    raw: dict[int, bytes] = {}
    unchecked: list[int] = []
    for number, body in enumerate(pieces, start=1):
        line = body + b"\n"
        if not body.strip():
            continue
        try:
            item = json.loads(body.decode("utf-8"))
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            crc = item.get(CRC_KEY)
            if crc is None:
                unchecked.append(len(items))
            elif crc != record_crc(item):
                raise ValueError("checksum mismatch")
            items.append((number, item))
            raw[number] = line
        except UnicodeDecodeError:
            damaged.append(Damaged(number, "not UTF-8 text", line))
        except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            reason = "not JSON" if isinstance(exc, json.JSONDecodeError) else str(exc).splitlines()[0][:80]
            damaged.append(Damaged(number, reason, line))
    if unchecked and len(unchecked) < len(items):
        for index in reversed(unchecked):
            number, _ = items.pop(index)
            damaged.append(Damaged(number, "no checksum", raw.pop(number)))
        damaged.sort(key=lambda d: d.line)
    torn_at = len(data) - len(tail) if tail else None
    return Lines(items, damaged, torn_at, len(tail), raw)


def describe_damage(path: Path, damaged: list[Damaged], torn_bytes: int | None) -> str:
    """One line naming the damaged lines and a torn tail of ``path`` ('' when none)."""
    parts = []
    if damaged:
        lines = ", ".join(f"{d.line} ({d.reason})" for d in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        parts.append(f"{len(damaged)} damaged line(s): {lines}")
    if torn_bytes is not None:
        parts.append(f"a torn last line ({torn_bytes} bytes, an interrupted write)")
    return f"{path}: " + "; ".join(parts) if parts else ""


class Archive:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[Record] = []
        self.damaged: list[Damaged] = []
        self.torn_at: int | None = None  # byte offset where a torn last line starts
        self.torn_bytes = 0
        self._raw: list[bytes] = []  # the file's bytes of each record read (kept as is on a rewrite)
        if self.path.exists():
            self._read()
        self.by_key = {r.key: r for r in self.records}

    def _read(self) -> None:
        lines = read_lines(self.path.read_bytes())
        for number, item in lines.items:
            try:
                self.records.append(_record_from(item))
                self._raw.append(lines.raw[number])
            except TypeError as exc:  # a JSON object without the fields of a record
                self.damaged.append(Damaged(number, str(exc).splitlines()[0][:80], lines.raw[number]))
        self.damaged = sorted(self.damaged + lines.damaged, key=lambda d: d.line)
        self.torn_at, self.torn_bytes = lines.torn_at, lines.torn_bytes

    def describe_damage(self) -> str:
        """One line naming what is damaged ('' when nothing is)."""
        return describe_damage(self.path, self.damaged, self.torn_bytes if self.torn_at is not None else None)

    def quarantine_damaged(self) -> Path | None:
        """Move damaged lines to ``<archive>.damaged`` and rewrite the archive without them
        (atomically); drop a torn tail. Only the process holding the run lock may call this."""
        if not self.damaged and self.torn_at is None:
            return None
        aside = self.path.with_name(self.path.name + ".damaged")
        if self.damaged:
            with aside.open("ab") as f:
                for d in self.damaged:
                    f.write(d.raw)
                f.flush()
                os.fsync(f.fileno())
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                for i, r in enumerate(self.records):  # intact lines byte for byte (fields of newer versions kept)
                    f.write(self._raw[i] if i < len(self._raw) else self._line(r).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:  # a full disk, Ctrl-C: no temporary copy left behind
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None
            raise
        self.damaged, self.torn_at, self.torn_bytes = [], None, 0
        return aside if aside.exists() else None

    @staticmethod
    def _line(record: Record) -> str:
        data = asdict(record)
        data[CRC_KEY] = record_crc(data)
        return json.dumps(data, allow_nan=False, default=float) + "\n"

    def _write_error(self, exc: OSError) -> EvomergeError:
        what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        return ArchiveWriteError(
            f"cannot write {self.path}: {what}; nothing was lost -- free space and resume with resume={self.path.parent}"
        )

    def append(self, record: Record) -> None:
        line = self._line(record).encode()
        if self.torn_at is not None:  # never glue a record to a torn line
            with self.path.open("r+b") as f:
                f.truncate(self.torn_at)
            self.torn_at, self.torn_bytes = None, 0
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with self.path.open("ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            try:  # leave no partial line behind (a full disk may accept half of it)
                with self.path.open("r+b") as f:
                    f.truncate(size)
            except OSError:
                self.torn_at = size
            raise self._write_error(exc) from None
        self.records.append(record)
        self.by_key[record.key] = record

    def digest(self, n: int | None = None) -> str:
        """Digest of the first ``n`` records (ids, keys, losses, errors) in file order."""
        h = hashlib.sha1()
        for r in self.records[: len(self.records) if n is None else n]:
            h.update(f"{r.id}|{r.key}|{r.losses}|{r.error}\n".encode())
        return h.hexdigest()[:16]

    def next_id(self) -> int:
        return 1 + max((r.id for r in self.records), default=-1)

    def search_records(self) -> list[Record]:
        """Search candidates, one per genome: a retried failure replaces the earlier record."""
        return [r for r in self.records if r.kind == "search" and self.by_key.get(r.key) is r]
