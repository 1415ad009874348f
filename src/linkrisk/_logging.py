"""Package logger, a timed-stage helper and the command-line logging set-up.

The package logs counts, ids, paths and timings, never report text, so
both the console and the log file stay free of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from linkrisk._io import PRIVATE_FILE_MODE, make_private_dirs

logger = logging.getLogger("linkrisk")

# Lines of the log file: local time with milliseconds, level, logger name, message.
LOG_FILE_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"

# Handlers installed by configure_logging carry this attribute, so a second call replaces only them.
_OWNED = "_linkrisk_handler"

_file_handler: logging.FileHandler | None = None


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log the start and end of one pipeline stage, with its wall time."""
    logger.info("%s: started", name)
    start = time.perf_counter()
    yield
    logger.info("%s: finished in %.1f s", name, time.perf_counter() - start)


class OwnerOnlyFileHandler(logging.FileHandler):
    """Append to a log file, creating it with mode 0600 (read and write for its owner only).

    An existing file keeps its mode.
    """

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8")

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(quiet: bool = False, log_file: Path | None = None, console: Console | None = None) -> None:
    """Send log records to the console and, optionally, to a log file.

    The console shows INFO and above, or WARNING and above with ``quiet``,
    through rich. ``log_file`` receives every record at INFO and above,
    with or without ``quiet``, as plain text with timestamps. The file is
    appended to, its missing parent folders are created with mode 0700, and
    a new file gets mode 0600. Python warnings (``warnings.warn``) become WARNING records of the
    ``py.warnings`` logger, so they reach both. A second call replaces the
    handlers of the first and closes its file.

    Raises:
        OSError: the log file cannot be created or opened for appending.
    """
    global _file_handler
    _remove_owned_handlers()
    root = logging.getLogger()
    console_handler = RichHandler(console=console or Console(stderr=True), show_path=False, markup=False)
    console_handler.setFormatter(logging.Formatter("%(message)s", datefmt="%H:%M:%S"))
    console_handler.setLevel(logging.WARNING if quiet else logging.INFO)
    setattr(console_handler, _OWNED, True)
    root.addHandler(console_handler)
    # The root level lets INFO records through to the file; the console handler filters by its own level.
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)

    if log_file is not None:
        path = Path(log_file)
        make_private_dirs(path.parent)
        file_handler = OwnerOnlyFileHandler(path)
        file_handler.setFormatter(logging.Formatter(LOG_FILE_FORMAT))
        file_handler.setLevel(logging.INFO)
        setattr(file_handler, _OWNED, True)
        root.addHandler(file_handler)
        _file_handler = file_handler


def log_to_file(level: int, message: str, *args: object) -> None:
    """Write one record to the log file of :func:`configure_logging` only; do nothing without one.

    Used for lines that the console already shows in another form (an
    error) or that would only clutter it (start and end of a command).
    """
    if _file_handler is None:
        return
    record = logger.makeRecord(logger.name, level, "(command line)", 0, message, args, None)
    if record.levelno >= _file_handler.level:
        _file_handler.handle(record)


def reset_logging() -> None:
    """Remove and close the handlers of :func:`configure_logging` and stop capturing warnings."""
    _remove_owned_handlers()
    logging.captureWarnings(False)


def _remove_owned_handlers() -> None:
    global _file_handler
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(handler)
        handler.close()
    _file_handler = None
