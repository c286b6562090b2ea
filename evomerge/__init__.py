"""evomerge: evolutionary, multi-objective merge-recipe search for language models."""

from evomerge.errors import ConfigError, EvomergeError, MergeError, PoolError

__version__ = "0.1.0"
__all__ = ["ConfigError", "EvomergeError", "MergeError", "PoolError", "__version__"]
