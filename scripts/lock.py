"""Print the lock (constraints.txt) for the current environment: every runtime and dev
dependency of evomerge, transitive ones included, pinned to the installed version.

    python3 scripts/lock.py > constraints.txt     (scripts/lock.sh does this)

The closure is walked from pyproject.toml's dependencies and the ``dev`` and ``ray`` extras
through the installed packages' own requirements (environment markers evaluated for this
Python and platform). torch is pinned without its local build label (2.13.0, not
2.13.0+cpu), so a CUDA build of the same version satisfies it too."""

from __future__ import annotations

import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("dev", "ray")


def top_level() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(r) for r in reqs]


def applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure() -> dict[str, str]:
    """canonical name -> installed version, for everything the top-level requirements pull in."""
    pinned: dict[str, str] = {}
    wanted: dict[str, set[str]] = {}  # name -> extras already expanded
    todo = [(r, set()) for r in top_level()]
    while todo:
        req, parent_extras = todo.pop()
        if not applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {req.name} is required ({req}) but not installed; install it (scripts/install.sh dev) first")
        extras = set(req.extras)
        if name in wanted and extras <= wanted[name]:
            continue
        wanted[name] = wanted.get(name, set()) | extras
        pinned[name] = dist.version
        for sub in dist.requires or []:
            todo.append((Requirement(sub), extras))
    pinned.pop("evomerge", None)
    return pinned


def main() -> None:
    pins = closure()
    if "torch" in pins:
        pins["torch"] = Version(pins["torch"]).public  # 2.13.0+cpu -> 2.13.0
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    print("# evomerge lock: the tested versions of every runtime and dev dependency (transitive included).")
    print("# Used by scripts/install.sh as pip constraints; opt out with EVOMERGE_UNLOCKED=1.")
    print("# Regenerate deliberately with scripts/lock.sh (see docs/install.md); do not edit by hand.")
    print(f"# python {py} on {platform.system()} {platform.machine()}")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
