"""Rank counting sharded over query blocks as Ray tasks.

:class:`RayEngine` runs the blocks of one counting pass
(:func:`~linkrisk.audit.ranks.stream_counts`) as Ray tasks. The
:class:`~linkrisk.audit.ranks.CountPlan` (queries, the deduplicated
candidate matrix and the unit and label layout) is put in the object store
once and read by every task without a copy on the same node. Each task
scores a contiguous run of the same blocks the single-process engine
scores, with the same block size, so every count is identical to the
local engine's.

Example::

    from linkrisk.audit.distributed import RayEngine
    with RayEngine(address="auto") as engine:
        counts = stream_counts(queries, candidates, true_index, engine=engine)
"""

from __future__ import annotations

import contextlib

import numpy as np

from linkrisk._logging import logger
from linkrisk._ray import raise_from_ray, ray_cluster
from linkrisk.audit.ranks import BlockCounts, CountPlan, count_block
from linkrisk.errors import ConfigError


def _count_blocks(plan: CountPlan, blocks: list[np.ndarray]) -> list[BlockCounts]:
    """Count several blocks in one task (the body of the Ray task)."""
    return [count_block(plan, rows) for rows in blocks]


@contextlib.contextmanager
def counting_engine(engine: str, address: str | None = None):
    """Yield the rank-counting engine named ``engine``: None for ``local``, or a started :class:`RayEngine`."""
    if engine != "ray":
        yield None
        return
    with RayEngine(address) as ray_engine:
        yield ray_engine


class RayEngine:
    """Run counting blocks as Ray tasks; use as a context manager, which joins or starts the cluster.

    Args:
        address: ``local``/None (start a cluster for this run), ``auto``
            (the cluster ``ray start`` started) or ``ray://HOST:PORT``.
        num_cpus: CPUs of a local cluster (default: all).
        tasks: tasks per pass (default: twice the cluster's CPUs, or GPUs
            for a CUDA plan); blocks are split evenly between them.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, tasks: int | None = None):
        self.address = address
        self.num_cpus = num_cpus
        self.tasks = tasks
        self._cluster = None
        self._ray = None

    def __enter__(self) -> "RayEngine":
        self._cluster = ray_cluster(self.address, self.num_cpus)
        self._ray = self._cluster.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        cluster, self._cluster, self._ray = self._cluster, None, None
        cluster.__exit__(*exc)

    def map_blocks(self, plan: CountPlan, blocks: list[np.ndarray]):
        """Yield :class:`~linkrisk.audit.ranks.BlockCounts` for every block, in completion order."""
        if self._ray is None:
            raise RuntimeError("RayEngine is used outside its `with` block")
        ray = self._ray
        gpu = plan.device.startswith("cuda")
        resources = ray.cluster_resources()
        if gpu and resources.get("GPU", 0) < 1:
            raise ConfigError(f"device {plan.device} was requested but the Ray cluster has no GPU; start the cluster "
                              "on GPU nodes or use --device cpu")
        slots = int(resources.get("GPU" if gpu else "CPU", 1)) or 1
        n_tasks = max(1, min(len(blocks), self.tasks or 2 * slots))
        plan_ref = ray.put(plan)
        task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=2)(_count_blocks)
        shares = [list(part) for part in np.array_split(np.arange(len(blocks)), n_tasks) if len(part)]
        logger.info("counting %d query blocks of %d queries in %d Ray tasks", len(blocks), plan.block_size,
                    len(shares))
        pending = [task.remote(plan_ref, [blocks[i] for i in share]) for share in shares]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                parts = ray.get(done[0])
            except Exception as err:  # noqa: BLE001  (Ray wraps errors raised inside tasks)
                raise_from_ray(err, "counting ranks")
            yield from parts
