"""Exceptions for inputs a user can fix.

The CLI prints a ``LinkriskError`` as one line on standard error and
exits with status 2 for a :class:`ConfigError` (a usage error) or 1 for
any other (an input that cannot be used). Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class LinkriskError(Exception):
    """An input or option problem, with the record it concerns and the fix."""


class InputError(LinkriskError):
    """A data file, row or record that cannot be used as it is."""


class ConfigError(LinkriskError):
    """An option value outside its allowed range or set."""


class EngineError(LinkriskError):
    """A failure of a distributed engine (a Ray worker that died or could not start), with its cause."""
