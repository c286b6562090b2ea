"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class EvomergeError(Exception):
    """A problem caused by user input (bad path, bad config, incompatible models)."""


class MergeError(EvomergeError):
    """A recipe cannot be applied to a model pool."""


class PoolError(EvomergeError):
    """Models cannot be loaded or are not mergeable."""


class ConfigError(EvomergeError):
    """A configuration value is invalid."""
