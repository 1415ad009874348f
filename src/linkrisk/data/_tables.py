"""CSV reading that turns parser failures into errors naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd

from linkrisk.errors import InputError

ALLOWED_LABEL_VALUES = (1.0, 0.0, -1.0)


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


def numeric_labels(table: pd.DataFrame, labels: tuple[str, ...], path: Path, line_offset: int | None = 2) -> None:
    """Convert ``labels`` columns of ``table`` to floats in place, raising on any value outside 1, 0, -1, blank.

    The error names the file, the column and the first bad value's place:
    ``line = row + line_offset`` for a CSV with a header (offset 2), or the
    0-based row when ``line_offset`` is None.
    """
    for label in labels:
        values = pd.to_numeric(table[label], errors="coerce")
        bad = (values.isna() & table[label].notna()) | ~(values.isna() | values.isin(ALLOWED_LABEL_VALUES))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            where = f"row {row}" if line_offset is None else f"line {row + line_offset}"
            value = table[label].iloc[row]
            shown = repr(value) if isinstance(value, str) else str(value)  # numpy 2 reprs read np.float64(2.0)
            raise InputError(f"{path}: column {label!r} has {int(bad.sum())} values outside {{1, 0, -1, blank}} "
                             f"(first at {where}: {shown}); use 1, 0, -1 or an empty cell")
        table[label] = values
