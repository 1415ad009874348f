"""Connect to (or start) a Ray cluster for the ``ray`` engines; Ray is the optional extra ``linkrisk[ray]``.

Addresses: ``local`` (or none) starts a private cluster inside this process
for the length of one run, ``auto`` joins the cluster that ``ray start``
started on this machine, and ``ray://HOST:PORT`` goes through Ray Client.
A cluster that this process already joined (``ray.init`` called by the
user) is used as it is and left running.

Ray's usage statistics are turned off (``RAY_USAGE_STATS_ENABLED=0``)
unless the user set that variable, so no run reports to Ray's servers.
Data sent to workers (decoded pixels, report text, embeddings) travels
through Ray's object store: on a multi-node cluster it crosses the
network between the nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import NoReturn

from linkrisk._logging import logger
from linkrisk.errors import ConfigError, EngineError, InputError, LinkriskError

ENGINES = ("local", "ray")
LOCAL_ADDRESSES = (None, "", "local")


def import_ray():
    """Import Ray with usage statistics off; raise :class:`ConfigError` saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401  (the embedding engine needs Ray Data)
    except ImportError as err:
        raise ConfigError("the ray engine needs Ray and Ray Data; install them with: pip install 'linkrisk[ray]'") \
            from err
    return ray


def check_engine(engine: str, address: str | None) -> None:
    """Reject an unknown engine, or an address given to the local engine."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid values: {', '.join(ENGINES)}")
    if engine == "local" and address not in LOCAL_ADDRESSES:
        raise ConfigError(f"an address ({address!r}) was given with the local engine; pass --engine ray to use it")


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None):
    """Yield the ``ray`` module connected to a cluster (see the module docstring for ``address``).

    Args:
        address: ``local``/None, ``auto`` or ``ray://HOST:PORT``.
        num_cpus: CPUs of a local cluster (default: all of this machine's).
    """
    ray = import_ray()
    if ray.is_initialized():
        logger.info("using the Ray cluster this process already joined (%s CPUs)",
                    ray.cluster_resources().get("CPU", 0))
        yield ray
        return
    # Ray's own warnings (token authentication, deprecations) would break --quiet; linkrisk logs each step itself.
    options = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address in LOCAL_ADDRESSES:
        options["num_cpus"] = num_cpus or os.cpu_count() or 1
        logger.info("starting a local Ray cluster with %d CPUs", options["num_cpus"])
    else:
        options["address"] = address
        logger.info("connecting to the Ray cluster at %s", address)
        _check_reachable(address)
    try:
        ray.init(**options)
    except ConnectionError as err:
        raise InputError(f"could not reach a Ray cluster at {address!r} ({err}); start one with `ray start --head`, "
                         "or pass --address local to start one inside this run") from err
    except ValueError as err:  # a malformed address, or Ray Client without its package
        raise ConfigError(f"invalid Ray address {address!r}: {err}; use local, auto, HOST:PORT or "
                          "ray://HOST:PORT (Ray Client, from the linkrisk[ray] extra)") from err
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        resources = ray.cluster_resources()
        logger.info("Ray cluster ready: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))
        yield ray
    finally:
        ray.shutdown()
        logger.info("Ray cluster %s", "stopped" if address in LOCAL_ADDRESSES else "disconnected")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``HOST:PORT`` or ``ray://HOST:PORT`` address that accepts no connection.

    ``ray.init`` retries an unreachable head node for minutes without a
    message, so one TCP connection is tried first. ``auto`` is left to Ray,
    which reads the address of the cluster ``ray start`` started.
    """
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, separator, port = target.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ConfigError(f"invalid Ray address {address!r}; use local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise InputError(f"could not reach a Ray cluster at {address!r} ({err.strerror or err}); check the address, "
                         "start the head node with `ray start --head`, or pass --address local to start a cluster "
                         "inside this run") from err


def unwrap_task_error(err: BaseException) -> BaseException:
    """Return the exception a Ray task or Ray Data function raised, following Ray's wrappers, or ``err`` itself.

    Ray wraps a task's exception in ``RayTaskError`` (``.cause``) and Ray Data
    wraps a function's in ``UserCodeException`` (``__cause__``). The first
    linkrisk or I/O error in that chain is returned, or else the innermost one.
    """
    seen, current = set(), err
    while id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):
            # A RayTaskError subclasses the original type too, but its message is the remote traceback.
            current = cause
            continue
        if isinstance(current, (LinkriskError, OSError)) or current.__cause__ is None:
            return current
        current = current.__cause__
    return err


def raise_from_ray(err: BaseException, step: str) -> NoReturn:
    """Re-raise a task's own input or I/O error as it is; wrap any other Ray failure in :class:`EngineError`."""
    cause = unwrap_task_error(err)
    # Ray Data appends retry advice to the message, so the error is raised again with its own first line.
    if isinstance(cause, LinkriskError):
        raise type(cause)(str(cause).strip().splitlines()[0]) from None
    if isinstance(cause, OSError):
        raise OSError(cause.errno, cause.strerror, cause.filename) if cause.errno else OSError(
            str(cause).strip().splitlines()[0]) from None
    lines = str(cause).strip().splitlines()
    detail = lines[0] if lines else ""
    logger.debug("Ray failure in %s", step, exc_info=err)
    raise EngineError(f"the Ray engine failed while {step}: {type(cause).__name__}: {detail}; finished cache chunks "
                      "are kept, so rerunning resumes (the full Ray traceback is in the log at debug level)") from err
