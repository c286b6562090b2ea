"""A score cache shared by runs: test-split re-scores keyed by everything that decides them.

Benchmarks and sweeps re-score the same merges on the test split in every run (the base and
the experts in each of them, hand-made merges that several searches share). With
``EVOMERGE_SCORE_CACHE=<folder>`` those scores are computed once: the key is a hash of the
recipe, the tasks, the split and the scoring settings, and the content fingerprints (size and
SHA-1) of every model and task file, so a changed model or task never hits a stale entry.
One small JSON file per key, written atomically, so parallel runs can share the folder.

Each entry also holds the inputs of its key and a checksum over inputs and scores: an entry
that is torn, edited, written by an older version or filed under the wrong key is ignored
(with one warning naming it) and the point is scored again, never used as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

ENV_VAR = "EVOMERGE_SCORE_CACHE"
FORMAT = 2


def _content(fingerprints: dict[str, Any]) -> Any:
    """Only what identifies the bytes (size, SHA-1): not paths or modification times."""
    if isinstance(fingerprints, dict):
        if "sha1" in fingerprints:
            return [fingerprints.get("size"), fingerprints["sha1"]]
        return {k: _content(v) for k, v in sorted(fingerprints.items()) if k not in ("path", "mtime_ns")}
    if isinstance(fingerprints, list):
        return [_content(v) for v in fingerprints]
    return fingerprints


def _checksum(inputs: Any, scores: Any) -> str:
    body = json.dumps({"inputs": inputs, "scores": scores}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(body.encode()).hexdigest()


def cache_folder() -> Path | None:
    """``$EVOMERGE_SCORE_CACHE`` as a folder (created when missing); ``None`` when unset.
    A path that is not a folder is a ConfigError, checked at start-up (evomerge.checks)."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        return None
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"${ENV_VAR}={folder} is not a folder; point it at a folder for the shared score cache, or unset it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"${ENV_VAR}={folder}: cannot create the score cache folder ({exc.strerror or exc})") from None
    return path


class ScoreCache:
    def __init__(self, folder: Path, fingerprints: dict[str, Any], settings: dict[str, Any]):
        self.folder = folder
        self._context = json.dumps({"inputs": _content(fingerprints), "settings": settings}, sort_keys=True)
        self._write_failed = False

    @classmethod
    def from_env(cls, run_dir: Path, settings: dict[str, Any]) -> "ScoreCache | None":
        """``None`` unless ``$EVOMERGE_SCORE_CACHE`` is set and the run has its fingerprints."""
        folder = cache_folder()
        fingerprint_file = run_dir / "fingerprints.json"
        if folder is None or not fingerprint_file.is_file():
            return None
        try:
            fingerprints = json.loads(fingerprint_file.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:
            _warn(f"score cache not used: {fingerprint_file} is unreadable ({str(exc).splitlines()[0][:80]})")
            return None
        if not isinstance(fingerprints, dict):
            _warn(f"score cache not used: {fingerprint_file} holds a JSON {type(fingerprints).__name__}, not an object")
            return None
        return cls(folder, fingerprints, settings)

    def _inputs(self, recipe: dict[str, Any]) -> dict[str, Any]:
        weights_only = {k: v for k, v in recipe.items() if k != "metadata"}  # labels do not change scores
        # as JSON reads it back (tuples become lists), so a stored copy compares equal
        return json.loads(json.dumps({"recipe": weights_only, "context": json.loads(self._context)}, sort_keys=True))

    def key(self, recipe: dict[str, Any]) -> str:
        weights_only = {k: v for k, v in recipe.items() if k != "metadata"}
        payload = json.dumps(weights_only, sort_keys=True) + "\n" + self._context
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def path(self, recipe: dict[str, Any]) -> Path:
        return self.folder / f"{self.key(recipe)}.json"

    def get(self, recipe: dict[str, Any]) -> dict[str, float] | None:
        """The cached scores, or ``None`` (absent, or unusable: warned and scored again)."""
        path = self.path(recipe)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _warn(f"score cache entry {path} is unreadable ({exc.strerror or exc}); scoring again")
            return None
        problem = _check_entry(raw, self._inputs(recipe))
        if isinstance(problem, str):
            _warn(f"score cache entry {path} ignored ({problem}); scoring again")
            return None
        return problem

    def put(self, recipe: dict[str, Any], scores: dict[str, float]) -> None:
        """Store ``scores``; a cache that cannot be written is warned about once, never fatal."""
        path = self.path(recipe)
        inputs = self._inputs(recipe)
        plain = {str(k): float(v) for k, v in scores.items()}
        try:
            text = json.dumps({"format": FORMAT, "scores": plain, "inputs": inputs, "sha256": _checksum(inputs, plain)}, allow_nan=False)
        except ValueError:
            return  # a non-finite score is not worth sharing
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if not self._write_failed:
                _warn(f"score cache {self.folder} not written ({exc.strerror or exc}); the run goes on without it")
            self._write_failed = True


def _check_entry(raw: bytes, inputs: dict[str, Any]) -> dict[str, float] | str:
    """The entry's scores, or why it cannot be used."""
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not JSON: torn or damaged"
    if not isinstance(entry, dict) or not isinstance(entry.get("scores"), dict):
        return "not a score cache entry"
    if "sha256" not in entry or "inputs" not in entry:
        return "no checksum: written by an older evomerge"
    scores = entry["scores"]
    try:
        if entry["sha256"] != _checksum(entry["inputs"], scores):
            return "checksum mismatch: edited or damaged"
    except (TypeError, ValueError):
        return "checksum mismatch: edited or damaged"
    if entry["inputs"] != inputs:
        return "its inputs differ from this key's: filed under the wrong key"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores.values()):
        return "scores are not finite numbers"
    return {str(k): float(v) for k, v in scores.items()}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
