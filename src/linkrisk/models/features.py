"""Encoder features computed once, in chunks, and cached on disk.

Cache layout: ``<cache_dir>/features/<encoder name>/<chunk key>.npz``.
A chunk key hashes the encoder config and, for images, each image's
:func:`file_stamp` (for texts, the texts). A changed
file or encoder setting therefore misses the cache, and a killed run
resumes at the first chunk not yet written. Chunks are written atomically.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from linkrisk._io import atomic_write
from linkrisk._logging import logger
from linkrisk._progress import progress_bar
from linkrisk.data.cohort import PairedCohort
from linkrisk.data.images import ImageReadError, load_grayscale
from linkrisk.models.image_encoders import ImageEncoder, encoder_key


def _chunk_key(encoder_config: dict, items: Sequence[str]) -> str:
    digest = hashlib.sha256(encoder_key(encoder_config).encode())
    for item in items:
        digest.update(b"\0" + item.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


def file_stamp(image_id: str, path: str) -> str:
    """Return the id, path, size, modification time, inode and status-change time of an image file.

    The status-change time (ctime) moves whenever the file is written,
    replaced, renamed or has its permissions changed, and no copy tool can
    set it, so content replaced under an unchanged size and mtime (``cp -p``,
    ``rsync -a``) still changes the stamp.
    """
    try:
        stat = Path(path).stat()
        return f"{image_id}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"
    except OSError:
        return f"{image_id}|{path}|missing"


def save_chunk(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    """Read a cached chunk; a damaged one is logged and treated as missing, so it is recomputed."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        logger.warning("cache chunk %s is damaged (%s: %s); recomputing it", path, type(err).__name__, err)
        return None


def _run_chunks(n: int, chunk_size: int, description: str, key_of: Callable[[slice], str], cache: Path,
                compute: Callable[[slice], dict[str, np.ndarray]], progress: bool,
                unit: str) -> list[dict[str, np.ndarray]]:
    chunks = [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    results, reused, to_compute = [], 0, n
    with progress_bar(progress, unit) as bar:
        task = bar.add_task(description, total=to_compute)
        for chunk in chunks:
            path = cache / f"{key_of(chunk)}.npz"
            stored = load_chunk(path) if path.exists() else None
            if stored is not None:
                results.append(stored)
                reused += 1
                # A cached chunk leaves the total rather than advancing it, so the rate and the
                # time remaining count computed rows only.
                to_compute -= chunk.stop - chunk.start
                bar.update(task, total=to_compute)
            else:
                arrays = compute(chunk)
                save_chunk(path, **arrays)
                results.append(arrays)
                bar.advance(task, chunk.stop - chunk.start)
    logger.info("%s: %d chunks, %d reused from cache %s", description, len(chunks), reused, cache)
    return results


def embed_images(cohort: PairedCohort, encoder: ImageEncoder, cache_dir: Path, chunk_size: int = 64,
                 progress: bool = True) -> tuple[np.ndarray, PairedCohort]:
    """Encode every image of ``cohort``; drop and count the ones that fail to decode.

    Returns:
        ``(features, cohort)``: float32 ``[n_ok, encoder.feature_dim]`` whose
        rows follow the returned cohort's image table, which lacks the
        unreadable images.
    """
    config = encoder.config()
    cache = Path(cache_dir) / "features" / encoder.name
    ids = cohort.images["image_id"].tolist()
    paths = cohort.images["image_path"].tolist()
    stamps = [file_stamp(i, p) for i, p in zip(ids, paths)]

    def compute(chunk: slice) -> dict[str, np.ndarray]:
        pixels = np.zeros((chunk.stop - chunk.start, encoder.image_size, encoder.image_size), np.float32)
        errors = np.full(chunk.stop - chunk.start, "", dtype=object)
        for row, path in enumerate(paths[chunk]):
            try:
                pixels[row] = load_grayscale(path, encoder.image_size)
            except ImageReadError as err:
                errors[row] = str(err)
        features = encoder.encode(pixels)
        return {"features": features, "errors": errors.astype(str)}

    chunks = _run_chunks(len(ids), chunk_size, f"{cohort.name}: image features ({encoder.name})",
                         lambda c: _chunk_key(config, stamps[c]), cache, compute, progress, "images")
    features = np.concatenate([c["features"] for c in chunks]) if chunks else np.zeros((0, encoder.feature_dim), np.float32)
    errors = np.concatenate([c["errors"] for c in chunks]) if chunks else np.zeros(0, str)
    failed = errors != ""
    for message in errors[failed]:
        logger.warning("%s: unreadable image skipped: %s", cohort.name, message)
    cohort = cohort.drop_images([ids[i] for i in np.flatnonzero(failed)], "unreadable image file")
    return features[~failed], cohort


def embed_texts(texts: Sequence[str], encoder, cache_dir: Path, name: str, chunk_size: int = 1024,
                progress: bool = True) -> np.ndarray:
    """Encode report texts in cached chunks; returns float32 ``[len(texts), encoder.feature_dim]``."""
    config = encoder.config()
    cache = Path(cache_dir) / "features" / encoder.name
    texts = list(texts)
    chunks = _run_chunks(len(texts), chunk_size, f"{name}: text features ({encoder.name})",
                         lambda c: _chunk_key(config, texts[c]), cache,
                         lambda c: {"features": encoder.encode(texts[c])}, progress, "reports")
    if not chunks:
        return np.zeros((0, encoder.feature_dim), np.float32)
    return np.concatenate([c["features"] for c in chunks])
