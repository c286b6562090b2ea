"""User-facing errors: the CLI prints these as one line instead of a traceback (kept free of
heavy imports: ``evomerge --help`` loads this module)."""

from __future__ import annotations

import errno
import sys


class EvomergeError(Exception):
    """A problem caused by user input (bad path, bad config, incompatible models)."""

    exit_code = 2  # the CLI's exit status for it (a finding such as a failed verification: 1)


class MergeError(EvomergeError):
    """A recipe cannot be applied to a model pool."""


class PoolError(EvomergeError):
    """Models cannot be loaded or are not mergeable."""


class ConfigError(EvomergeError):
    """A configuration value is invalid."""


def raise_user_errors(fn):
    """Decorator for CLI entry points: user mistakes exit 2 with one line, no traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvomergeError as exc:
            print(f"evomerge: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            fix = "make it writable" if exc.errno == errno.EROFS else "free space"
            print(f"evomerge: error: cannot write {exc.filename or 'a file'}: {exc.strerror}; {fix}, then resume with resume=<run dir>", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("evomerge: interrupted; resume with resume=<run dir>", file=sys.stderr)
            raise SystemExit(130) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
