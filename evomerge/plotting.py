"""matplotlib for the static figures (front.png, progress.png, compare.png): headless and quiet."""

from __future__ import annotations

import logging
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend. matplotlib's font manager logs a warning
    line on a fresh machine ("Matplotlib is building the font cache; this may take a
    moment.") and ``findfont`` lines when a font family is missing; neither concerns the
    user of a plot, so they are kept out of the console and run.log."""
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
