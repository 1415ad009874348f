"""Package logger and a timed-stage helper."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger("linkrisk")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log the start and end of one pipeline stage, with its wall time."""
    logger.info("%s: started", name)
    start = time.perf_counter()
    yield
    logger.info("%s: finished in %.1f s", name, time.perf_counter() - start)
