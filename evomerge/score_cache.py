"""A score cache shared by runs: test-split re-scores keyed by everything that decides them.

Benchmarks and sweeps re-score the same merges on the test split in every run (the base and
the experts in each of them, hand-made merges that several searches share). With
``EVOMERGE_SCORE_CACHE=<folder>`` those scores are computed once: the key is a hash of the
recipe, the tasks, the split and the scoring settings, and the content fingerprints (size and
SHA-1) of every model and task file, so a changed model or task never hits a stale entry.
One small JSON file per key, written atomically, so parallel runs can share the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ENV_VAR = "EVOMERGE_SCORE_CACHE"


def _content(fingerprints: dict[str, Any]) -> Any:
    """Only what identifies the bytes (size, SHA-1): not paths or modification times."""
    if isinstance(fingerprints, dict):
        if "sha1" in fingerprints:
            return [fingerprints.get("size"), fingerprints["sha1"]]
        return {k: _content(v) for k, v in sorted(fingerprints.items()) if k not in ("path", "mtime_ns")}
    if isinstance(fingerprints, list):
        return [_content(v) for v in fingerprints]
    return fingerprints


class ScoreCache:
    def __init__(self, folder: Path, fingerprints: dict[str, Any], settings: dict[str, Any]):
        self.folder = folder
        self._context = json.dumps({"inputs": _content(fingerprints), "settings": settings}, sort_keys=True)

    @classmethod
    def from_env(cls, run_dir: Path, settings: dict[str, Any]) -> "ScoreCache | None":
        """``None`` unless ``$EVOMERGE_SCORE_CACHE`` is set and the run has its fingerprints."""
        folder = os.environ.get(ENV_VAR)
        fingerprint_file = run_dir / "fingerprints.json"
        if not folder or not fingerprint_file.is_file():
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder), json.loads(fingerprint_file.read_text()), settings)

    def key(self, recipe: dict[str, Any]) -> str:
        weights_only = {k: v for k, v in recipe.items() if k != "metadata"}  # labels do not change scores
        payload = json.dumps(weights_only, sort_keys=True) + "\n" + self._context
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, recipe: dict[str, Any]) -> dict[str, float] | None:
        path = self.folder / f"{self.key(recipe)}.json"
        try:
            return json.loads(path.read_text())["scores"]
        except (OSError, ValueError, KeyError):
            return None  # absent or torn: score again

    def put(self, recipe: dict[str, Any], scores: dict[str, float]) -> None:
        path = self.folder / f"{self.key(recipe)}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"scores": dict(scores)}))
        os.replace(tmp, path)
