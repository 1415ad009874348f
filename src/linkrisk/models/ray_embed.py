"""The ``ray`` engine of the embedding run: decoding as Ray tasks, encoders in Ray Data actor pools.

:func:`~linkrisk.models.embed.embed_cohort` with ``engine="ray"`` hands the
batches still missing from the cache to this module. Each model batch
(the same rows the local engine would put in it, so batches never
straddle cache chunks) becomes one row of a Ray dataset:

1. ``map`` decodes and preprocesses the batch's images in CPU tasks
   (kept apart from the encoders, so decoding scales with the cluster's
   CPUs);
2. ``map_batches`` runs the frozen image tower in an actor pool, with
   one actor per GPU (or per two CPUs without GPUs). Each actor loads the
   model once;
3. the driver receives each batch's features as it finishes. The caller
   writes every completed chunk to the same content-addressed cache the
   local engine uses. A killed run therefore resumes with either engine,
   and later steps cannot tell how the features were made.

Reports go the same way without the decoding step. Arrays cross the
object store as raw bytes with their shape and dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import torch

from linkrisk._logging import logger
from linkrisk._ray import raise_from_ray
from linkrisk.errors import ConfigError


# Memory reserved by each decoding task (bytes): Ray measured up to 646 MiB for a batch of 32 COVID images
# (the worker's libraries included), so 1 GiB leaves room for larger 16-bit radiographs.
DECODE_MEMORY_BYTES = 2**30


def _pack(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"data": array.tobytes(), "shape": json.dumps(list(array.shape)), "dtype": array.dtype.str}


def _unpack(row: dict, prefix: str) -> np.ndarray:
    shape = json.loads(row[f"{prefix}_shape"])
    return np.frombuffer(row[f"{prefix}_data"], dtype=np.dtype(row[f"{prefix}_dtype"])).reshape(shape).copy()


class _DecodeBatch:
    """Decode and preprocess the images of one batch row (runs in Ray tasks)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, row: dict) -> dict:
        indices = json.loads(row["indices"])
        tensors, errors = [], []
        for index in indices:
            _, tensor, error = self.dataset[index]
            errors.append(error)
            if tensor is not None:
                tensors.append(tensor.numpy())
        pixels = np.stack(tensors) if tensors else np.zeros((0,), np.float32)
        packed = _pack(pixels)
        return {"indices": row["indices"], "errors": json.dumps(errors), "pixels_data": packed["data"],
                "pixels_shape": packed["shape"], "pixels_dtype": packed["dtype"]}


class _Encoder:
    """One Ray Data actor: loads the model once and encodes batch rows (images or reports)."""

    def __init__(self, factory: Callable, side: str, device: str, precision: str, threads: int):
        from linkrisk.models.embed import _autocast, _move

        torch.set_num_threads(max(1, threads))
        self.side, self.device, self.precision = side, device, precision
        self._autocast = _autocast
        # A model that fails to load is reported from the first batch, where Ray passes the exception on
        # as it is (an actor that dies in its constructor only reports that it died).
        self.error = None
        try:
            self.adapter = factory()
            _move(self.adapter, device)
        except Exception as err:  # noqa: BLE001  (re-raised below)
            self.error = err

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise self.error
        out = {key: [] for key in ("indices", "errors", "features_data", "features_shape", "features_dtype",
                                   "truncated")}
        for i in range(len(batch["indices"])):
            row = {key: batch[key][i] for key in batch}
            before = getattr(self.adapter, "_truncated", 0)
            with torch.inference_mode(), self._autocast(self.device, self.precision):
                if self.side == "images":
                    pixels = _unpack(row, "pixels")
                    features = (self.adapter.encode_image_features(torch.from_numpy(pixels).to(self.device))
                                if len(pixels) else None)
                else:
                    features = self.adapter.encode_text_features(json.loads(row["texts"]))
            array = features.float().cpu().numpy() if features is not None else np.zeros((0,), np.float32)
            packed = _pack(array)
            out["indices"].append(row["indices"])
            out["errors"].append(row.get("errors", "[]"))
            out["features_data"].append(packed["data"])
            out["features_shape"].append(packed["shape"])
            out["features_dtype"].append(packed["dtype"])
            out["truncated"].append(int(getattr(self.adapter, "_truncated", 0) - before))
        return {key: np.asarray(values, dtype=object) if key != "truncated" else np.asarray(values)
                for key, values in out.items()}


def decode_cpus(ray) -> float:
    """CPUs each decoding task reserves: 1, or half of a one-CPU cluster's only CPU."""
    return 1.0 if ray.cluster_resources().get("CPU", 1) >= 2 else 0.5


def _actor_plan(ray, device: str, actors: int, decoding: bool = True) -> tuple[int, dict]:
    """Return the number of encoder actors and the resources of each.

    The actors never reserve every CPU: with ``decoding``, one decoding
    task must still fit beside them, or Ray would never schedule it and the
    run would wait forever.
    """
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    spare = cpus - (decode_cpus(ray) if decoding else 0.0)
    if torch.device(device).type == "cuda":
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ConfigError(f"device {device} was requested but the Ray cluster has no GPU; start the cluster on "
                              "GPU nodes or use --device cpu")
        count = actors or gpus
        if count > gpus:
            raise ConfigError(f"--actors {count} asks for one GPU each, but the Ray cluster has {gpus} GPUs; use at "
                              f"most {gpus}")
        per_actor = min(1.0, spare / count)
        return count, {"num_gpus": 1, "num_cpus": per_actor}
    count = actors or max(1, int(spare // 2) or 1)
    per_actor = spare / count
    if per_actor < 0.5:
        limit = max(1, int(spare // 0.5))
        raise ConfigError(f"--actors {count} leaves less than half a CPU per encoder actor on a Ray cluster of "
                          f"{cpus:g} CPUs (one CPU stays free for decoding); use at most {limit}")
    return count, {"num_cpus": float(int(per_actor)) if per_actor >= 1 else per_actor}


def _rows(dataset, step: str) -> Iterator[dict]:
    """Yield the dataset's output rows; errors from tasks and actors go through :func:`raise_from_ray`."""
    # Without this, Ray Data replaces a function's exception with a generic UserCodeException.
    dataset.context.raise_original_map_exception = True
    try:
        yield from dataset.iter_rows()
    except Exception as err:  # noqa: BLE001  (Ray wraps errors raised inside tasks and actors)
        raise_from_ray(err, step)


def ray_image_batches(ray, factory: Callable, image_dataset, batches: list[list[int]], device: str,
                      precision: str, actors: int = 0) -> Iterator[tuple[list[int], np.ndarray | None, list[str]]]:
    """Yield ``(indices, features or None, errors)`` per image batch, in completion order.

    Args:
        ray: the connected ``ray`` module (:func:`~linkrisk._ray.ray_cluster`).
        factory: builds the model adapter inside each actor.
        image_dataset: the local engine's decoding dataset (picklable).
        batches: row indices of each model batch.
        device, precision: as in :class:`~linkrisk.models.embed.EmbedConfig`.
        actors: encoder actors (0: one per GPU, or half the CPUs).
    """
    count, resources = _actor_plan(ray, device, actors)
    logger.info("ray engine: %d image batches, decoding in CPU tasks, %d encoder actors (%s each)", len(batches),
                count, ", ".join(f"{key.removeprefix('num_')} {value}" for key, value in resources.items()))
    items = [{"indices": json.dumps([int(i) for i in batch])} for batch in batches]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Decoding tasks reserve memory for a batch of full-size radiographs. Their resource request differs from
    # the actors', which also keeps Ray Data from fusing decoding into the encoder actors.
    dataset = dataset.map(_DecodeBatch(image_dataset), num_cpus=decode_cpus(ray), memory=DECODE_MEMORY_BYTES)
    dataset = dataset.map_batches(_Encoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=count),
                                  fn_constructor_kwargs={"factory": factory, "side": "images", "device": device,
                                                         "precision": precision,
                                                         "threads": int(resources.get("num_cpus", 1))},
                                  **resources)
    for row in _rows(dataset, "encoding images"):
        features = _unpack(row, "features")
        yield json.loads(row["indices"]), (features if features.ndim > 1 else None), json.loads(row["errors"])


def ray_report_batches(ray, factory: Callable, texts: list[str], batches: list[range], device: str,
                       precision: str, actors: int = 0) -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield ``(first row, features, reports truncated)`` per report batch, in completion order."""
    count, resources = _actor_plan(ray, device, actors, decoding=False)
    logger.info("ray engine: %d report batches, %d encoder actors", len(batches), count)
    items = [{"indices": json.dumps([batch.start, batch.stop]), "texts": json.dumps(texts[batch.start:batch.stop])}
             for batch in batches]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(_Encoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=count),
                                  fn_constructor_kwargs={"factory": factory, "side": "reports", "device": device,
                                                         "precision": precision,
                                                         "threads": int(resources.get("num_cpus", 1))},
                                  **resources)
    for row in _rows(dataset, "encoding reports"):
        yield json.loads(row["indices"])[0], _unpack(row, "features"), int(row["truncated"])
