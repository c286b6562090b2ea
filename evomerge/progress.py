"""Progress lines: printed to stderr and written to the run's log file (run.log).

Hydra's file handler on the root logger writes run.log; progress lines are plain prints
(their format is what users read and tests check), so each is also handed to that file
handler through a logger that does not reach the console.
"""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("evomerge.progress")
_logger.propagate = False  # never printed twice: the console got the print


def say(message: str, stream=None) -> None:
    """Print ``message`` to stderr (or ``stream``) and append it to run.log (when a run log is open)."""
    print(message, file=stream or sys.stderr, flush=True)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    _logger.handlers = files
    _logger.setLevel(logging.INFO)
    _logger.info(message)
