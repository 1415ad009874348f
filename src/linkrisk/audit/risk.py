"""Per-record re-linkage risk: which released images are easiest to re-link.

Three figures per image query. The full-pool rank is its true report's
expected rank under random ties. The top-1 probability is the chance of
ranking first in a uniform pool of 100 (or the whole pool when smaller).
The margin is the true report's score minus the best other report's: 0
when a duplicate text ties, negative when another report wins. The table
contains ids and figures only.

:func:`rank_histogram` summarises the full-pool ranks of a whole audit
for the report, without ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from linkrisk.audit.recall import expected_recall_at_k


def true_score_margin(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                      block_size: int = 1024) -> np.ndarray:
    """Return ``score(true) - max score(other)`` per query, ``[Q]`` float32; other rows equal to the true one tie."""
    candidates = np.asarray(candidates, dtype=np.float32)
    cand = torch.as_tensor(candidates)
    true_index = np.array(true_index, dtype=np.int64)  # a writable copy for torch
    _, inverse, multiplicity = np.unique(candidates, axis=0, return_inverse=True, return_counts=True)
    has_twin_all = torch.as_tensor(multiplicity[inverse.reshape(-1)][true_index] > 1)
    margin = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        rows = torch.as_tensor(true_index[start:stop])
        scores = torch.as_tensor(np.asarray(queries[start:stop], dtype=np.float32)) @ cand.T
        true = scores.gather(1, rows.view(-1, 1)).squeeze(1)
        others = scores.scatter(1, rows.view(-1, 1), float("-inf"))
        best_other = others.max(1).values
        margin[start:stop] = torch.where(has_twin_all[start:stop], torch.zeros_like(true), true - best_other).numpy()
    return margin


def record_risk(image_ids: np.ndarray, patient_ids: np.ndarray, above: np.ndarray, equal: np.ndarray,
                n_candidates: int, margin: np.ndarray) -> pd.DataFrame:
    """Build the per-record risk table, riskiest first (highest top-1 probability, then largest margin)."""
    pool = min(100, n_candidates)
    table = pd.DataFrame({
        "image_id": np.asarray(image_ids).astype(str),
        "patient_id": np.asarray(patient_ids).astype(str),
        "full_pool_rank": 1.0 + above + equal / 2.0,
        "p_top1_pool": expected_recall_at_k(above, equal, n_candidates, pool, 1) if n_candidates > 1 else 1.0,
        "pool": pool,
        "margin": margin,
    })
    table = table.sort_values(["p_top1_pool", "margin"], ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "risk_rank", np.arange(1, len(table) + 1))
    return table


def rank_bin_edges(n_candidates: int) -> list[int]:
    """Return the lower edges of the full-pool rank bins for ``n_candidates``, with ``n_candidates + 1`` appended.

    Bin ``i`` contains ranks ``r`` with ``edges[i] <= r < edges[i + 1]``. The
    bins follow a 1-2-5 series of reports scoring above the true one (0, 1,
    2, 5, 10, 20, 50, ...), so ranks 1, 2, 3-5, 6-10, 11-20, 21-50, ...,
    and the last bin ends at ``n_candidates``.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be at least 1, got {n_candidates}")
    edges = [1]
    scale = 1
    while True:
        for step in (1, 2, 5):
            edge = 1 + step * scale
            if edge > n_candidates:
                return edges + [n_candidates + 1]
            edges.append(edge)
        scale *= 10


def rank_histogram(above: np.ndarray, equal: np.ndarray, n_candidates: int) -> dict:
    """Count queries per full-pool rank bin (see :func:`rank_bin_edges`), ties broken at random.

    Args:
        above: ``[Q]`` candidates scoring above each query's true candidate.
        equal: ``[Q]`` other candidates scoring equal to it.
        n_candidates: candidate units M in the full pool.

    Returns:
        ``{bin_edges, counts, n_queries, n_candidates, tie_rule}``. Under the
        random tie rule a query's rank is uniform over ``above + 1`` to
        ``above + equal + 1``, so ``counts`` are expected counts: they sum to
        ``n_queries`` and are whole numbers when no query ties. Under chance
        a rank is uniform over 1 to M, so bin ``i`` expects
        ``n_queries * (edges[i + 1] - edges[i]) / M``.
    """
    above = np.asarray(above, dtype=np.int64)
    equal = np.asarray(equal, dtype=np.int64)
    if above.shape != equal.shape or above.ndim != 1:
        raise ValueError(f"above and equal must be 1-D arrays of one length, got shapes {above.shape} and "
                         f"{equal.shape}")
    if len(above) and (above.min() < 0 or equal.min() < 0 or (above + equal).max() >= n_candidates):
        raise ValueError(f"above + equal must lie in [0, n_candidates - 1] = [0, {n_candidates - 1}]")
    edges = np.asarray(rank_bin_edges(n_candidates), dtype=np.int64)
    lowest = above + 1
    end = above + equal + 2  # one past the highest possible rank
    # Ranks of a query that fall into each bin [edges[i], edges[i + 1]), as a [Q, bins] matrix.
    overlap = np.minimum(edges[None, 1:], end[:, None]) - np.maximum(edges[None, :-1], lowest[:, None])
    counts = (np.clip(overlap, 0, None) / (equal + 1)[:, None]).sum(axis=0)
    return {"bin_edges": edges.tolist(), "counts": [float(c) for c in counts], "n_queries": int(len(above)),
            "n_candidates": int(n_candidates), "tie_rule": "random"}
