"""CSV reading that turns parser failures into errors naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd

from linkrisk.errors import InputError


def read_csv(path: Path, required: tuple[str, ...] = (), **options) -> pd.DataFrame:
    """Read a CSV with pandas; raise :class:`InputError` naming ``path`` when it cannot be used.

    Covers a missing file, a folder in its place, an empty file, bytes that
    are not UTF-8, rows of the wrong width and missing ``required`` columns.
    """
    if not path.is_file():
        raise InputError(f"{path}: not found or not a file")
    try:
        table = pd.read_csv(path, encoding="utf-8", **options)
    except pd.errors.EmptyDataError as err:
        raise InputError(f"{path}: the file is empty; expected a header row and data rows") from err
    except UnicodeDecodeError as err:
        # The parser's offset is relative to its buffer; decode the whole file for the real position.
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        try:
            data.decode("utf-8")
            offset = err.start
        except UnicodeDecodeError as whole:
            offset = whole.start
        line = data[:offset].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from err
    except pd.errors.ParserError as err:
        raise InputError(f"{path}: cannot be parsed as CSV ({' '.join(str(err).split())})") from err
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing}; expected at least {list(required)}")
    return table
