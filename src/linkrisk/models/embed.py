"""The embedding run: a model's frozen towers over a cohort, cached in chunks, then projected.

:func:`embed_cohort` computes pre-projection features of every image and
report once and writes them with ids, the model's heads and the projected
embeddings into one folder, which ``linkrisk audit`` reads directly and
the ``precomputed`` adapter reads as input.

Cache: ``<out>/cache/<model key>/{images,reports}/<chunk key>.npz``. The
model key hashes the adapter name, the weights' SHA-256, the image
preprocessing, the tokenizer settings and the precision. A chunk key
hashes the model key and the chunk's rows: image id and file stamp (path,
size, modification time, inode, status-change time), or report id and
text. Chunks are written atomically (temp file and rename), so a killed
run resumes at the first chunk not yet on disk and recomputes at most the
chunk it was working on. Batches never straddle chunks, so a chunk is
always computed from the same batches and the resumed result is
byte-identical to an uninterrupted run on the same device, batch size and
library versions.
A chunk with an unreadable image is recomputed on every run, so a file
that was fixed in the meantime is read again.

One run at a time may write an output folder (a lock file guards it).
``embed.json`` is removed when the outputs are rewritten and written last,
so a folder without it is incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from linkrisk import __version__
from linkrisk._io import PRIVATE_FILE_MODE, atomic_write, make_private_dirs, write_json, write_npy
from linkrisk._logging import logger, stage
from linkrisk._progress import progress_bar
from linkrisk._ray import check_engine, ray_cluster
from linkrisk.data.cohort import PairedCohort
from linkrisk.data.file_metadata import image_attribute_table
from linkrisk.data.images import ImageReadError, read_image, to_8bit
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.features import file_stamp, load_chunk, save_chunk
from linkrisk.models.head_io import save_heads
from linkrisk.models.precomputed import PrecomputedAdapter

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass
class EmbedConfig:
    """Options of :func:`embed_cohort`; all of them are written to ``embed.json``.

    Attributes:
        batch_size: images per forward pass.
        text_batch_size: reports per forward pass.
        chunk_size: images (and reports) per cache chunk; a killed run loses at most one chunk.
        workers: DataLoader worker processes decoding and resizing images (0: in the main process).
        device: torch device of the forward pass (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast on a GPU.
        fast_decode: decode JPEGs at a reduced scale (libjpeg DCT scaling) that keeps
            at least twice the model's input size. This is faster, and the pixels differ
            slightly from the model's own preprocessing.
        progress: show progress bars with rates and remaining time.
        engine: ``local`` (this process and its DataLoader workers) or ``ray``
            (:mod:`linkrisk.models.ray_embed`; the cache and outputs are the same).
        address: with ``ray``: ``local``/None (start a cluster for the run),
            ``auto`` or ``ray://HOST:PORT`` (:func:`~linkrisk._ray.ray_cluster`).
        actors: with ``ray``: encoder actors (0: one per GPU, or half the CPUs).
    """

    batch_size: int = 32
    text_batch_size: int = 64
    chunk_size: int = 512
    workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    fast_decode: bool = False
    progress: bool = True
    engine: str = "local"
    address: str | None = None
    actors: int = 0

    def validate(self) -> "EmbedConfig":
        """Check ranges and the precision-device pairing; raise :class:`ConfigError` naming the option."""
        for name in ("batch_size", "text_batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        if self.actors < 0:
            raise ConfigError(f"actors must be 0 (automatic) or more, got {self.actors}")
        check_engine(self.engine, self.address)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"invalid precision {self.precision!r}; valid values: {', '.join(PRECISIONS)}")
        if self.precision != "fp32" and torch.device(self.device).type == "cpu":
            raise ConfigError(f"precision {self.precision} is autocast for GPUs; use fp32 on cpu")
        return self


def hash_weights(path: str | Path) -> str:
    """Return the SHA-256 (hex) of a weights file, or of every file in a folder (relative names and contents)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise InputError(f"{path}: weights not found; pass a local file or folder")
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def model_key(adapter, weights_sha256: str, precision: str, fast_decode: bool = False) -> str:
    """Hash what determines the features: adapter name, weights, preprocessing, tokenizer, precision, decoding."""
    tokenizer = adapter.tokenizer
    tokenizer_text = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}" if tokenizer else ""
    extra = repr(getattr(adapter, "config", ""))
    return _key(type(adapter).__name__, weights_sha256, repr(adapter.preprocess), tokenizer_text,
                str(adapter.context_length), precision, extra, "fast-decode" if fast_decode else "")[:16]


class _ImageFiles(Dataset):
    """Decode and preprocess one image per item; a file that fails yields its error message instead."""

    def __init__(self, paths: list[str], preprocess, float_input: bool, draft_size: int | None = None):
        self.paths = paths
        self.preprocess = preprocess
        self.float_input = float_input
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.paths[index], self.draft_size)
            return index, self.preprocess(image if self.float_input else to_8bit(image)), ""
        except ImageReadError as err:
            return index, None, str(err)
        except (OSError, ValueError) as err:
            return index, None, f"{self.paths[index]}: preprocessing failed ({type(err).__name__}: {err})"


def _input_size(adapter) -> int:
    """Return the largest side of the model's preprocessed input, found by preprocessing one blank image."""
    sample = adapter.preprocess(Image.new("L", (64, 64)))
    return int(max(sample.shape[-2:]))


def _collate(items):
    indices = [index for index, _, _ in items]
    tensors = [tensor for _, tensor, _ in items if tensor is not None]
    errors = [error for _, _, error in items]
    return indices, (torch.stack(tensors) if tensors else None), errors


def _worker_init(_: int) -> None:
    # Decoding workers run one thread each; the forward pass keeps the process's threads.
    torch.set_num_threads(1)


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@dataclasses.dataclass
class _ChunkStore:
    """The chunk files of one side (images or reports) under one model key; each chunk stores its row ids."""

    folder: Path
    keys: list[str]
    ids: list[list[str]]

    def path(self, chunk: int) -> Path:
        return self.folder / f"{self.keys[chunk]}.npz"

    def load(self, chunk: int) -> dict[str, np.ndarray] | None:
        path = self.path(chunk)
        stored = load_chunk(path) if path.exists() else None
        if stored is not None and stored.get("ids", np.zeros(0, str)).tolist() != self.ids[chunk]:
            logger.warning("cache chunk %s lists other rows than expected; recomputing it", path)
            return None
        return stored

    def save(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        save_chunk(self.path(chunk), **arrays, ids=np.asarray(self.ids[chunk], dtype=str))


def image_store(cohort: PairedCohort, folder: Path, key: str, chunk_size: int) -> _ChunkStore:
    """Chunk the images; a chunk key hashes ``key`` and each image's id, path, size and modification time."""
    ids, paths = cohort.images["image_id"].tolist(), cohort.images["image_path"].tolist()
    rows = _chunks(len(ids), chunk_size)
    keys = [_key(key, *(file_stamp(ids[i], paths[i]) for i in chunk))[:24] for chunk in rows]
    return _ChunkStore(folder, keys, [[ids[i] for i in chunk] for chunk in rows])


def report_store(cohort: PairedCohort, folder: Path, key: str, chunk_size: int) -> _ChunkStore:
    """Chunk the reports; a chunk key hashes ``key`` and each report's id and text."""
    ids, texts = cohort.reports["report_id"].tolist(), cohort.reports["text"].tolist()
    rows = _chunks(len(ids), chunk_size)
    keys = [_key(key, *(f"{ids[i]}\0{texts[i]}" for i in chunk))[:24] for chunk in rows]
    return _ChunkStore(folder, keys, [[ids[i] for i in chunk] for chunk in rows])


# NOTE: the CUDA copy stream below has not run on a GPU in the tests (CPU only); on CPU batches pass through.
class _DevicePrefetcher:
    """Copy the next batch to the device on a side CUDA stream while the current one is encoded.

    With pinned host memory (the DataLoader's ``pin_memory``) the copy runs
    asynchronously and overlaps the forward pass; on other devices batches
    pass through unchanged.
    """

    def __init__(self, loader, device: str):
        self.loader, self.device = loader, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _copy(self, item):
        indices, pixels, errors = item
        if pixels is None:
            return item
        if self.stream is None:
            return indices, pixels.to(self.device), errors
        with torch.cuda.stream(self.stream):
            return indices, pixels.to(self.device, non_blocking=True), errors

    def __iter__(self):
        waiting = None
        for item in self.loader:
            ready, waiting = waiting, self._copy(item)
            if ready is not None:
                yield self._ready(ready)
        if waiting is not None:
            yield self._ready(waiting)

    def _ready(self, item):
        if self.stream is not None and item[1] is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            item[1].record_stream(torch.cuda.current_stream(self.device))
        return item


class AdapterFactory:
    """Build a model adapter from its registry name and local weights (in Ray actors); picklable.

    Args:
        name: adapter name (:func:`~linkrisk.models.adapters.load_adapter`).
        weights: weights file or folder (made absolute, since workers may run elsewhere).
        offline: set ``HF_HUB_OFFLINE=1`` in the worker before loading, as the CLI does without
            ``--allow-download``; default: whether it is set in this process.
    """

    def __init__(self, name: str, weights: str | Path, offline: bool | None = None):
        weights = str(weights)
        self.name = name
        self.weights = weights if weights.startswith("hf-hub:") else str(Path(weights).resolve())
        self.offline = os.environ.get("HF_HUB_OFFLINE") == "1" if offline is None else offline

    def __call__(self):
        from linkrisk.models.adapters import load_adapter

        if self.offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        return load_adapter(self.name, self.weights, allow_download=not self.offline)


class _SameAdapter:
    """Factory returning an adapter object that was pickled as it is (for adapters not built by name)."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self):
        return self.adapter


@contextlib.contextmanager
def _image_batches(adapter, dataset: _ImageFiles, batches: list[list[int]], config: EmbedConfig, factory=None):
    """Yield an iterator of ``(indices, features or None, errors)`` per batch, from the configured engine."""
    if config.engine == "ray":
        from linkrisk.models.ray_embed import ray_image_batches

        with ray_cluster(config.address) as ray:
            yield ray_image_batches(ray, factory or _SameAdapter(adapter), dataset, batches, config.device,
                                    config.precision, config.actors)
        return
    workers = min(config.workers, os.cpu_count() or 1)
    if workers < config.workers:
        logger.warning("%d DataLoader workers requested on %d CPUs; using %d", config.workers, os.cpu_count(), workers)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if workers else None,
                        pin_memory=torch.device(config.device).type == "cuda")

    def encoded():
        for indices, pixels, errors in _DevicePrefetcher(loader, config.device):
            features = None
            if pixels is not None:
                with _autocast(config.device, config.precision):
                    features = adapter.encode_image_features(pixels).float().cpu().numpy()
            yield indices, features, errors

    yield encoded()


@contextlib.contextmanager
def _report_batches(adapter, texts: list[str], batches: list[range], config: EmbedConfig, factory=None):
    """Yield an iterator of ``(first row, features)`` per report batch, from the configured engine."""
    if config.engine == "ray":
        from linkrisk.models.ray_embed import ray_report_batches

        with ray_cluster(config.address) as ray:
            def collected():
                truncated = 0
                for start, features, cut in ray_report_batches(ray, factory or _SameAdapter(adapter), texts, batches,
                                                               config.device, config.precision, config.actors):
                    truncated += cut
                    yield start, features
                if truncated and hasattr(adapter, "_truncated"):
                    adapter._truncated += truncated
            yield collected()
        return

    def encoded():
        for batch in batches:
            with _autocast(config.device, config.precision):
                yield batch.start, adapter.encode_text_features(texts[batch.start:batch.stop]).float().cpu().numpy()

    yield encoded()


def _embed_images(adapter, cohort: PairedCohort, store: _ChunkStore, config: EmbedConfig,
                  factory=None) -> tuple[list, dict]:
    chunks = _chunks(cohort.n_images, config.chunk_size)
    stored = [store.load(i) for i in range(len(chunks))]
    # A chunk with an unreadable image is computed again: the failure may have been transient.
    retried = [i for i, chunk in enumerate(stored) if chunk is not None and not chunk["ok"].all()]
    for i in retried:
        stored[i] = None
    missing = [i for i, chunk in enumerate(stored) if chunk is None]
    logger.info("image features: %d chunks, %d reused from %s, %d to compute (%d of them to retry unreadable "
                "images)", len(chunks), len(chunks) - len(missing), store.folder, len(missing), len(retried))
    if not missing:
        return stored, {"total": len(chunks), "reused": len(chunks), "computed": 0}

    batches = [list(chunks[i][start:start + config.batch_size])
               for i in missing for start in range(0, len(chunks[i]), config.batch_size)]
    dataset = _ImageFiles(cohort.images["image_path"].tolist(), adapter.preprocess,
                          getattr(adapter, "accepts_float_images", False),
                          2 * _input_size(adapter) if config.fast_decode else None)
    pending = {i: {"features": {}, "ok": np.zeros(len(chunks[i]), bool), "errors": [""] * len(chunks[i]),
                   "left": len(chunks[i])} for i in missing}
    chunk_of = np.repeat(np.arange(len(chunks)), [len(c) for c in chunks])

    with progress_bar(config.progress, "images") as bar, _image_batches(adapter, dataset, batches, config, factory) as results:
        task = bar.add_task(f"{cohort.name}: image features", total=sum(len(chunks[i]) for i in missing))
        for indices, features, errors in results:
            chunk = int(chunk_of[indices[0]])
            state = pending[chunk]
            offsets = [index - chunks[chunk].start for index in indices]
            if features is not None:
                state["features"][offsets[0]] = features
            for offset, error in zip(offsets, errors):
                state["ok"][offset] = not error
                state["errors"][offset] = error
            state["left"] -= len(indices)
            if state["left"] == 0:
                arrays = {"ok": state["ok"], "errors": np.asarray(state["errors"], dtype=str)}
                if state["features"]:
                    arrays["features"] = np.concatenate([state["features"][k] for k in sorted(state["features"])])
                store.save(chunk, arrays)
                stored[chunk] = arrays
                del pending[chunk]
            bar.advance(task, len(indices))
    return stored, {"total": len(chunks), "reused": len(chunks) - len(missing), "computed": len(missing)}


def _embed_reports(adapter, cohort: PairedCohort, store: _ChunkStore, config: EmbedConfig,
                   factory=None) -> tuple[list, dict]:
    texts = cohort.reports["text"].tolist()
    chunks = _chunks(len(texts), config.chunk_size)
    stored = [store.load(i) for i in range(len(chunks))]
    missing = [i for i, chunk in enumerate(stored) if chunk is None]
    logger.info("report features: %d chunks, %d reused from %s, %d to compute", len(chunks),
                len(chunks) - len(missing), store.folder, len(missing))
    batches = [range(start, min(start + config.text_batch_size, chunks[i].stop))
               for i in missing for start in range(chunks[i].start, chunks[i].stop, config.text_batch_size)]
    pending = {i: {"parts": {}, "left": len(chunks[i])} for i in missing}
    chunk_of = np.repeat(np.arange(len(chunks)), [len(c) for c in chunks])
    with progress_bar(config.progress and bool(missing), "reports") as bar, \
            _report_batches(adapter, texts, batches, config, factory) as results:
        task = bar.add_task(f"{cohort.name}: report features", total=sum(len(chunks[i]) for i in missing))
        for start, features in results:
            i = int(chunk_of[start])
            pending[i]["parts"][start] = features
            pending[i]["left"] -= len(features)
            if pending[i]["left"] == 0:
                parts = pending.pop(i)["parts"]
                stored[i] = {"features": np.concatenate([parts[k] for k in sorted(parts)])}
                store.save(i, stored[i])
            bar.advance(task, len(features))
    adapter.warn_truncated()
    return stored, {"total": len(chunks), "reused": len(chunks) - len(missing), "computed": len(missing)}


def _assemble_images(stored: list[dict], cohort: PairedCohort) -> tuple[np.ndarray, PairedCohort, dict[str, int]]:
    """Join the image chunks; drop and count the images that failed to decode."""
    ok = np.concatenate([chunk["ok"] for chunk in stored]) if stored else np.zeros(0, bool)
    errors = np.concatenate([chunk["errors"] for chunk in stored]) if stored else np.zeros(0, str)
    parts = [chunk["features"] for chunk in stored if "features" in chunk]
    if not parts:
        raise InputError(f"cohort {cohort.name!r} ({cohort.source}): none of its {cohort.n_images} images could be "
                         f"decoded; first error: {errors[0] if len(errors) else 'no images'}")
    features = np.concatenate(parts)
    for message in errors[~ok][:20]:
        logger.warning("%s: image skipped: %s", cohort.name, message)
    if (~ok).sum() > 20:
        logger.warning("%s: %d more images skipped (not listed)", cohort.name, int((~ok).sum()) - 20)
    failed_ids = cohort.images["image_id"].to_numpy()[~ok].tolist()
    return features, cohort.drop_images(failed_ids, "unreadable image file"), {"unreadable image file": len(failed_ids)}


def _project(head: nn.Module, features: np.ndarray, max_values: int = 1 << 24) -> np.ndarray:
    """Apply a head on CPU and L2-normalise the rows; float32 ``[n, embed_dim]``.

    Rows go through in batches of at most ``max_values`` input values (64 MiB of float32),
    so patch-grid features do not need one large copy.
    """
    head = head.eval().cpu()
    batch_size = max(1, max_values // max(1, int(np.prod(features.shape[1:]))))
    out = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(features[start:start + batch_size], dtype=np.float32))
            out.append(nn.functional.normalize(head(batch).float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _move(adapter, device: str) -> None:
    if hasattr(adapter, "to"):
        adapter.to(device)
        return
    for name in ("model", "image_model", "text_model"):
        module = getattr(adapter, name, None)
        if isinstance(module, nn.Module):
            module.to(device)


def _checked_embeddings(adapter, cohort: PairedCohort, image_features: np.ndarray,
                        report_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project both sides; raise :class:`InputError` where the result could not be audited."""
    embeddings = []
    for head, features, ids, side in ((adapter.image_head, image_features, cohort.images["image_id"], "image"),
                                      (adapter.text_head, report_features, cohort.reports["report_id"], "report")):
        projected = _project(head, features)
        if projected.ndim != 2:
            raise InputError(f"{adapter.name}: the {side} head gives embeddings of shape {list(projected.shape[1:])}, "
                             "not one vector per row")
        norms = np.linalg.norm(projected, axis=1)
        bad = ~np.isfinite(norms) | (norms < 0.5)  # rows are unit length unless the input was zero or non-finite
        if bad.any():
            raise InputError(f"{adapter.name}: {int(bad.sum())} {side} embeddings are zero or not finite (first: "
                             f"id {ids.iloc[int(np.flatnonzero(bad)[0])]}); such rows cannot be ranked")
        embeddings.append(projected)
    if embeddings[0].shape[1] != embeddings[1].shape[1]:
        raise InputError(f"{adapter.name}: image embeddings have {embeddings[0].shape[1]} dimensions but report "
                         f"embeddings {embeddings[1].shape[1]}; both heads must map into one space")
    return embeddings[0], embeddings[1]


def _write_outputs(out: Path, cohort: PairedCohort, image_features: np.ndarray, report_features: np.ndarray,
                   adapter, metadata: dict) -> None:
    """Write features, id tables, heads, projected embeddings and the audit pairing into ``out``."""
    image_embeddings, report_embeddings = _checked_embeddings(adapter, cohort, image_features, report_features)
    # Without embed.json the folder reads as incomplete until every file below is written.
    (out / "embed.json").unlink(missing_ok=True)
    write_npy(out / "image_features.npy", image_features)
    write_npy(out / "report_features.npy", report_features)
    # Ids plus the attribute columns (view, sex, age band, site, source where the dataset has them) and the
    # file metadata read from headers, for attribute-matched pools and the attribute oracle.
    attributes = image_attribute_table(cohort.images)
    images = pd.concat([cohort.images[["image_id", "study_id", "patient_id", "report_id"]].reset_index(drop=True),
                        attributes], axis=1)
    atomic_write(out / "images.parquet", lambda tmp: images.to_parquet(tmp, index=False))
    reports = cohort.reports[["report_id", *cohort.label_names]]
    atomic_write(out / "reports.parquet", lambda tmp: reports.to_parquet(tmp, index=False))

    position = pd.Series(np.arange(cohort.n_reports), index=cohort.reports["report_id"].values)
    pairs = pd.DataFrame({"image_id": images["image_id"].values,
                          "report_row": position.loc[images["report_id"].values].to_numpy().astype(np.int64),
                          "patient_id": images["patient_id"].astype(str).values})
    atomic_write(out / "pairs.parquet", lambda tmp: pairs.to_parquet(tmp, index=False))

    save_heads(out, adapter.image_head, adapter.text_head, {"model": metadata["model"]})
    write_npy(out / "image.npy", image_embeddings)
    write_npy(out / "report.npy", report_embeddings)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on ``out/.embed.lock`` for the run; the OS releases it if the process dies."""
    make_private_dirs(out)
    with open(os.open(out / ".embed.lock", os.O_WRONLY | os.O_CREAT, PRIVATE_FILE_MODE), "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"{out}: another linkrisk embed run is writing this folder; wait for it to finish or "
                             "choose another --out") from err
        yield


def _remove_stale_temp_files(out: Path) -> None:
    """Delete temp files (``.NAME.XXXX.tmp``) that a killed run left under ``out``; they may hold features."""
    removed = 0
    for path in out.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d temp files left by an interrupted run under %s", removed, out)


def embed_cohort(adapter, cohort: PairedCohort, out: str | Path, config: EmbedConfig | None = None,
                 model: dict | None = None, adapter_factory=None) -> dict:
    """Embed every image and report of ``cohort`` with ``adapter`` into the folder ``out``.

    Args:
        adapter: a model adapter (:mod:`linkrisk.models.adapters`) or a
            :class:`~linkrisk.models.precomputed.PrecomputedAdapter`.
        cohort: the paired cohort; unreadable images are dropped and counted.
        out: output folder (created); ``out/cache`` contains the resumable chunks.
        config: batch sizes, chunk size, workers, device and precision.
        model: model name, weights path and ``weights_sha256`` for the cache key and ``embed.json``.
        adapter_factory: with the ``ray`` engine, a picklable callable that builds the adapter in
            each encoder actor. Default: :class:`AdapterFactory` from ``model``'s ``model`` and
            ``weights``, or else ``adapter`` itself, pickled.

    Returns:
        The summary written to ``out/embed.json``: model, dataset, counts, chunks reused and computed, timings.
    """
    out = Path(out)
    with _locked(out):
        _remove_stale_temp_files(out)
        config = (config or EmbedConfig()).validate()
        model = dict(model or {})
        if adapter_factory is None and model.get("model") and model.get("weights"):
            adapter_factory = AdapterFactory(model["model"], model["weights"])
        # One cluster serves both towers: the image and report steps join it instead of starting their own.
        cluster = ray_cluster(config.address) if config.engine == "ray" and not isinstance(
            adapter, PrecomputedAdapter) else contextlib.nullcontext()
        with cluster:
            return _embed_locked(adapter, cohort, out, config, model, adapter_factory)


def _embed_locked(adapter, cohort: PairedCohort, out: Path, config: EmbedConfig, model: dict,
                  factory=None) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    cohort.validate()

    if isinstance(adapter, PrecomputedAdapter):
        with stage(f"{cohort.name}: look up precomputed features"):
            image_features = adapter.image_features_for(cohort.images["image_id"])
            report_features = adapter.report_features_for(cohort.reports["report_id"])
        chunks, skipped, key = {}, {}, None
    else:
        key = model_key(adapter, model.get("weights_sha256", ""), config.precision, config.fast_decode)
        cache = out / "cache" / key
        _move(adapter, config.device)
        with stage(f"{cohort.name}: image features ({cohort.n_images} images)"):
            store = image_store(cohort, cache / "images", key, config.chunk_size)
            stored, image_chunks = _embed_images(adapter, cohort, store, config, factory)
            image_features, cohort, skipped = _assemble_images(stored, cohort)
        with stage(f"{cohort.name}: report features ({cohort.n_reports} reports)"):
            store = report_store(cohort, cache / "reports", key, config.chunk_size)
            stored, report_chunks = _embed_reports(adapter, cohort, store, config, factory)
            report_features = np.concatenate([chunk["features"] for chunk in stored])
        chunks = {"images": image_chunks, "reports": report_chunks}

    summary = {
        "linkrisk_version": __version__,
        "model": {**model, "adapter": type(adapter).__name__, "name": adapter.name, "cache_key": key,
                  "preprocess": repr(adapter.preprocess), "context_length": adapter.context_length,
                  "image_feature_shape": list(image_features.shape[1:]),
                  "text_feature_dim": int(report_features.shape[1]), "embed_dim": int(adapter.embed_dim)},
        "dataset": {"name": cohort.name, "source": cohort.source, "fingerprint": cohort.fingerprint(),
                    "n_images": cohort.n_images, "n_reports": cohort.n_reports, "n_patients": cohort.n_patients,
                    "skipped": {**cohort.skipped, **{k: v for k, v in skipped.items() if v}},
                    "repairs": cohort.repairs},
        "config": dataclasses.asdict(config),
        "chunks": chunks,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 3),
    }
    with stage(f"{cohort.name}: write features, heads and projected embeddings to {out}"):
        _write_outputs(out, cohort, image_features, report_features, adapter, summary)
        write_json(out / "embed.json", summary)
    return summary


def iter_chunk_files(out: str | Path) -> Iterator[Path]:
    """Yield the cache chunk files under ``out/cache`` (complete chunks only; temp files are hidden)."""
    yield from (p for p in Path(out, "cache").rglob("*.npz") if not p.name.startswith("."))


__all__ = ["AdapterFactory", "EmbedConfig", "PRECISIONS", "embed_cohort", "hash_weights", "iter_chunk_files", "model_key"]
