"""Monte Carlo Recall@K over explicitly sampled candidate pools (seeded).

The sampled protocol many papers use: for each query, draw pools of
``N - 1`` other candidates uniformly without replacement, rank the true
candidate among them (ties broken uniformly at random), and average the
hits. It serves as an independent cross-check of the closed form in
:mod:`linkrisk.audit.recall` and for users who report the sampled
protocol. It shares no counting code with the closed form: scores are
recomputed and compared pool by pool.

Each query's pools come from its own generator, seeded by
``(seed, query index)``, so results do not depend on the block size.
"""

from __future__ import annotations

import numpy as np
import torch

from linkrisk._progress import progress_bar
from linkrisk.errors import ConfigError, InputError

# Pools sampled per chunk when drawing by random keys (memory: chunk * population * 8 bytes).
_KEY_CHUNK = 64
# Draw with replacement and redraw repeats while size**2 / population stays below this.
_REDRAW_MAX_RATIO = 64


def sample_pools(rng: np.random.Generator, population: int, size: int, n_pools: int) -> np.ndarray:
    """Draw ``n_pools`` sets of ``size`` distinct indices from ``range(population)``: ``[n_pools, size]``.

    Small sets (``size**2 <= 64 * population``, a few repeats per row) are
    drawn with replacement, and every repeat within a row is redrawn until
    the row is distinct. The procedure commutes with any relabelling of the
    population, so each set of ``size`` indices is equally likely. Larger
    sets take the ``size`` smallest of uniform random keys.
    """
    if not 0 <= size <= population:
        raise ConfigError(f"cannot draw {size} distinct candidates from {population}")
    if size == population:
        return np.tile(np.arange(population), (n_pools, 1))
    if size * size <= _REDRAW_MAX_RATIO * population:
        pools = rng.integers(0, population, size=(n_pools, size))
        todo = np.arange(n_pools)
        while size > 1 and len(todo):
            order = np.argsort(pools[todo], axis=1, kind="stable")
            ordered = np.take_along_axis(pools[todo], order, axis=1)
            repeat = ordered[:, 1:] == ordered[:, :-1]
            rows, cols = np.nonzero(repeat)
            pools[todo[rows], order[rows, cols + 1]] = rng.integers(0, population, size=len(rows))
            todo = todo[repeat.any(axis=1)]
        return pools
    out = np.empty((n_pools, size), dtype=np.int64)
    for start in range(0, n_pools, _KEY_CHUNK):
        stop = min(start + _KEY_CHUNK, n_pools)
        keys = rng.random((stop - start, population))
        out[start:stop] = np.argpartition(keys, size - 1, axis=1)[:, :size]
    return out


def monte_carlo_recall(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                       pool_sizes: list[int], ks: list[int], n_pools: int = 1000, seed: int = 0, *,
                       candidate_unit: np.ndarray | None = None, block_size: int = 256,
                       device: str | torch.device = "cpu", progress: bool = False) -> np.ndarray:
    """Per-query hit rates over sampled pools.

    Args:
        queries: ``[Q, D]``; candidates: ``[M, D]``; true_index: ``[Q]`` true unit.
        pool_sizes: pool sizes ``N``, each between 2 and the number of units.
        ks: cut-offs ``K``.
        n_pools: pools sampled per query and pool size.
        seed: base seed.
        candidate_unit: ``[M]`` unit of each candidate (a unit scores its best member), or None.
        progress: show a progress bar over the queries.

    Returns:
        float64 ``[len(pool_sizes), len(ks), Q]``: the share of each query's
        pools in which its true unit ranks within the top ``K``.
    """
    if n_pools < 1:
        raise ConfigError(f"the number of Monte Carlo pools must be at least 1, got {n_pools}")
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    true_index = np.asarray(true_index, dtype=np.int64)
    unit = np.arange(len(candidates)) if candidate_unit is None else np.asarray(candidate_unit, dtype=np.int64)
    n_units = int(unit.max()) + 1
    for size in pool_sizes:
        if not 2 <= size <= n_units:
            raise ConfigError(f"pool size {size} must be between 2 and the number of candidates ({n_units})")
    if len(true_index) != len(queries) or (len(true_index) and not 0 <= true_index.min() <= true_index.max() < n_units):
        raise InputError(f"true indices must be one per query and lie in [0, {n_units})")
    for name, array in (("query", queries), ("candidate", candidates)):
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise InputError(f"{int(bad.sum())} {name} embedding rows contain NaN or inf (first row {np.flatnonzero(bad)[0]})")

    # Identical candidate rows are scored once, so they tie exactly.
    unique, inverse = np.unique(candidates, axis=0, return_inverse=True)
    scored = torch.as_tensor(unique, device=device)
    column = torch.as_tensor(inverse.reshape(-1), device=device)
    unit_t = torch.as_tensor(unit, device=device)
    hits = np.zeros((len(pool_sizes), len(ks), len(queries)))
    with progress_bar(progress, "queries") as bar:
        task = bar.add_task("Monte Carlo pools", total=len(queries))
        for start in range(0, len(queries), block_size):
            stop = min(start + block_size, len(queries))
            scores = (torch.as_tensor(queries[start:stop], device=device) @ scored.T)[:, column]
            scores = torch.full((stop - start, n_units), float("-inf"), device=device).scatter_reduce(
                1, unit_t.expand(stop - start, -1), scores, "amax").cpu().numpy()
            for offset, q in enumerate(range(start, stop)):
                rng = np.random.default_rng([seed, q])
                row, true = scores[offset], true_index[q]
                others = np.delete(row, true)
                for p, size in enumerate(pool_sizes):
                    if size == n_units:  # the whole set: every pool is the same, only tie orders vary
                        above = np.full(n_pools, (others > row[true]).sum())
                        tied = np.full(n_pools, (others == row[true]).sum())
                    else:
                        drawn = others[sample_pools(rng, n_units - 1, size - 1, n_pools)]
                        above = (drawn > row[true]).sum(1)
                        tied = (drawn == row[true]).sum(1)
                    position = above + rng.integers(0, tied + 1)  # others ranked before the true unit
                    for j, k in enumerate(ks):
                        hits[p, j, q] = (position < k).mean()
                bar.advance(task)
    return hits
