"""Train the test zoo (conftest.TEST_ZOO_SETTINGS) and store it in tests/data/test_zoo.

Run once when TEST_ZOO_SETTINGS change; the tests then load these files on every machine
(a zoo trained per machine differs by CPU kernels and threads).

    python tests/data/make_test_zoo.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import TEST_ZOO_DIR, TEST_ZOO_SETTINGS  # noqa: E402

from evomerge.zoo.build import ZooConfig, build_zoo  # noqa: E402
from evomerge.zoo.shipped import ship_zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="where to train (default: a temporary folder)")
    args = ap.parse_args()
    cfg = ZooConfig(**TEST_ZOO_SETTINGS)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="test-zoo-"))
    record = ship_zoo(build_zoo(cache, cfg), cfg, TEST_ZOO_DIR, "test")
    print(f"{TEST_ZOO_DIR}: digest {record['digest'][:12]}")


if __name__ == "__main__":
    main()
