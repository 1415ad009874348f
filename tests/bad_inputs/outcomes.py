"""Expected outcomes of a bad-input case, and the check of each against what the entry point did.

Four outcomes:

- :class:`Raises`: the entry point raises ``error`` (InputError or
  ConfigError), and the message contains every part (the file, row or
  id, and the fix).
- :class:`Exits`: the CLI exits with ``code`` and prints one
  ``error: ...`` line on standard error, without a traceback.
- :class:`Skips`: the entry point returns, and the record is left out
  and counted under ``reason`` in the cohort's ``skipped`` (and in
  ``describe()``).
- :class:`Loads`: the entry point returns, and the decoded or loaded
  values are right (``check`` asserts them).

A part or a reason may name a key of the case's context in braces
(``"{csv}"``), filled in when the case is built.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from typing import Any

from linkrisk.errors import LinkriskError

# Outcome labels of the terminal summary, in the order it prints them.
CLEAR_ERROR = "clear error"
COUNTED_SKIP = "counted skip"
LOADED = "loaded correctly"
KINDS = (CLEAR_ERROR, COUNTED_SKIP, LOADED)


@dataclasses.dataclass
class Built:
    """What a builder made: the entry point's arguments and named values for messages and checks."""

    args: tuple
    context: dict[str, Any] = dataclasses.field(default_factory=dict)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fill(part: str, built: Built) -> str:
    return _one_line(part.format(**built.context))


@dataclasses.dataclass
class Raises:
    """The entry point raises ``error`` whose message contains every one of ``parts``; ``also`` checks more."""

    error: type[LinkriskError]
    parts: tuple[str, ...]
    also: Callable[[Built], None] | None = None
    kind = CLEAR_ERROR

    def check(self, raised: BaseException | None, result: Any, built: Built, log: str) -> None:
        assert raised is not None, f"expected {self.error.__name__}, but the entry point returned {result!r:.300}"
        assert isinstance(raised, self.error), f"expected {self.error.__name__}, got {type(raised).__name__}: {raised}"
        message = _one_line(str(raised))
        for part in self.parts:
            assert _fill(part, built) in message, f"{_fill(part, built)!r} not in the message {message!r}"
        if self.also is not None:
            self.also(built)


@dataclasses.dataclass
class Exits:
    """The CLI exits with ``code`` and one ``error:`` line on standard error containing every one of ``parts``."""

    code: int
    parts: tuple[str, ...]
    also: Callable[[subprocess.CompletedProcess, Built], None] | None = None
    kind = CLEAR_ERROR

    def check(self, raised: BaseException | None, result: Any, built: Built, log: str) -> None:
        assert raised is None, f"the CLI run raised {raised!r}"
        assert result.returncode == self.code, f"exit status {result.returncode}, stderr: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr[-2000:]}"
        assert lines[0].startswith("error: ")
        for part in self.parts:
            assert _fill(part, built) in lines[0], f"{_fill(part, built)!r} not in {lines[0]!r}"
        if self.also is not None:
            self.also(result, built)


@dataclasses.dataclass
class Skips:
    """The entry point returns a cohort that counts ``count`` records under ``reason``.

    ``also`` runs further checks on the returned cohort, with the case's
    context and the captured log text (for example that the log names the
    skipped file).
    """

    reason: str
    count: int
    also: Callable[[Any, Built, str], None] | None = None
    kind = COUNTED_SKIP

    def check(self, raised: BaseException | None, result: Any, built: Built, log: str) -> None:
        assert raised is None, f"expected a counted skip, got {type(raised).__name__}: {raised}"
        reason = _fill(self.reason, built)
        skipped = result.describe()["skipped"]
        assert skipped.get(reason) == self.count, f"skipped {skipped}, expected {reason!r}: {self.count}"
        assert result.skipped.get(reason) == self.count
        if self.also is not None:
            self.also(result, built, log)


@dataclasses.dataclass
class Loads:
    """The entry point returns, and ``check(result, built, log)`` asserts that the values are right."""

    check_values: Callable[[Any, Built, str], None]
    kind = LOADED

    def check(self, raised: BaseException | None, result: Any, built: Built, log: str) -> None:
        assert raised is None, f"expected the input to load, got {type(raised).__name__}: {raised}"
        self.check_values(result, built, log)
