"""Progress bars of long steps: description, bar, M/N complete, rate and time remaining, on stderr.

Every long step opens its bar with :func:`progress_bar` and takes a
``progress: bool`` flag, which the command line's ``--quiet`` turns off.
Bars are transient, so nothing of them stays on the terminal when a step
ends, and they write to stderr, so stdout stays free for JSON output.

A bar opened while another is shown (a DP run inside the ε sweep, one
InfoNCE fit inside the refit attack) is drawn below it on rich releases
that nest live displays. Older rich releases raise ``LiveError`` for a
second live display, and there the inner bar stays hidden.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.errors import LiveError
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from linkrisk._logging import _OWNED

# Used when configure_logging has installed no console handler (library use).
_stderr_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second of a task, followed by the item's name (``12.5 images/s``)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"- {self.unit}/s")
        # Two significant digits below one item per second, so that 0.04 points/s does not read as 0.0.
        return Text(f"{speed:,.1f} {self.unit}/s" if speed >= 1 else f"{speed:.2g} {self.unit}/s")


class _Progress(Progress):
    """A :class:`Progress` that hides itself where rich cannot show a second live display."""

    def start(self) -> None:
        try:
            super().start()
        except LiveError:
            self.disable = True


def _console() -> Console:
    """Return the console of the handler that ``configure_logging`` installed, else a stderr console.

    Sharing the log handler's console lets rich print log records above a
    live bar. A second console on the same stream would write into the bar's lines.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler) and getattr(handler, _OWNED, False):
            return handler.console
    return _stderr_console


def progress_bar(enabled: bool, unit: str, console: Console | None = None) -> Progress:
    """Create a transient progress display for tasks counted in ``unit`` (a plural noun: ``images``, ``steps``).

    Use it as a context manager and add tasks with a description and a total.
    The display is disabled, and writes nothing, unless ``enabled`` is true
    and the console is an interactive terminal or a Jupyter notebook. A
    redirected stderr therefore gets no bars and no blank lines.

    Args:
        enabled: show the bar (false for ``--quiet``).
        unit: name of the counted items, shown in the rate column as ``UNIT/s``.
        console: where to draw; default: the console of the log handler, or stderr.
    """
    console = console or _console()
    visible = enabled and (console.is_interactive or console.is_jupyter)
    return _Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                     TimeRemainingColumn(), console=console, transient=True, redirect_stdout=False,
                     disable=not visible)


__all__ = ["RateColumn", "progress_bar"]
