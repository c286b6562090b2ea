"""State an estimator saves in the run directory (IRT fit, multi-fidelity order), read back on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


class SavedStateError(EvomergeError):
    """An estimator's saved state in the run directory cannot be used."""


def read_saved(path: Path, required: str) -> dict[str, Any]:
    """The JSON object in ``path`` holding ``required``; a damaged file is one line naming it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        data, why = None, str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
    else:
        why = f"holds a JSON {type(data).__name__}, not an object" if not isinstance(data, dict) else f"has no '{required}'"
    if not isinstance(data, dict) or required not in data:
        raise SavedStateError(f"{path} is damaged ({why}): it is the estimator's state of this run; restore it, or delete it "
                              "to compute it again (the scores archived so far were made with the old one)")
    return data
