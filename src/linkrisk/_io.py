"""Atomic file writes (a temp file in the target folder, then a rename) and owner-only folders.

Outputs are derived from patient data, so files written here get mode
0600 and folders created here get mode 0700. An existing folder keeps
its mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Modes of what linkrisk creates: read, write (and, for folders, enter) by the owner only. The process umask
# can only remove bits from these.
PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dirs(path: Path) -> None:
    """Create the folder ``path`` and its missing parents, each with mode 0700.

    Folders that already exist keep their mode, unlike ``Path.mkdir(parents=True)``,
    which creates the parents with the default mode.
    """
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_FOLDER_MODE)
        except FileExistsError:
            # Another process may have created the folder first, which is fine, but a file of this name is an error.
            if not folder.is_dir():
                raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path``.

    A crash or a full disk during ``write`` leaves any previous ``path``
    untouched; the temp file is removed. The file gets mode 0600, even
    where ``write`` replaces the temp file, and missing parent folders
    get mode 0700.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name to write to", str(path))
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file with mode 0600, and this restores it where ``write`` deleted and recreated the file.
        os.chmod(tmp, PRIVATE_FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # Name the file being written, not the temp file, so the message points at a file the user recognises.
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    def _write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")

    atomic_write(path, _write)


def write_npy(path: Path, array: np.ndarray) -> None:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, _write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
