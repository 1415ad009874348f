"""Per-query counts of candidates scoring above and equal to the true one.

Every pool metric derives from two counts per query ``q`` with true
candidate ``t(q)`` among ``M`` candidates:

- ``above[q]``: candidates with cosine score strictly greater than ``t(q)``'s,
- ``equal[q]``: *other* candidates with exactly the same score.

Candidates with bitwise-identical embedding rows (duplicate report texts)
are scored once and counted with their multiplicity, so they always tie
with each other whatever the matmul kernel does. Scores are computed in
float32 over blocks of queries; the ``[Q, M]`` score matrix is never held.
"""

from __future__ import annotations

import numpy as np
import torch

from linkrisk.errors import InputError


def _check(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray) -> None:
    if queries.ndim != 2 or candidates.ndim != 2:
        raise InputError(f"embeddings must be 2-D, got queries {queries.shape} and candidates {candidates.shape}")
    if queries.shape[1] != candidates.shape[1]:
        raise InputError(
            f"query and candidate embeddings differ in dimension ({queries.shape[1]} vs {candidates.shape[1]})"
        )
    if len(true_index) != len(queries):
        raise InputError(f"{len(queries)} queries but {len(true_index)} true indices")
    if len(true_index) and (true_index.min() < 0 or true_index.max() >= len(candidates)):
        raise InputError(f"true indices must lie in [0, {len(candidates)}), got {true_index.min()}..{true_index.max()}")
    for name, array in (("query", queries), ("candidate", candidates)):
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise InputError(f"{bad.sum()} {name} embedding rows contain NaN or inf (first row {np.flatnonzero(bad)[0]})")


def rank_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                block_size: int = 4096, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Count candidates scoring above and equal to each query's true candidate.

    Args:
        queries: ``[Q, D]`` float embeddings (L2-normalised for cosine scores).
        candidates: ``[M, D]`` float embeddings.
        true_index: ``[Q]`` int, row of each query's true candidate.
        block_size: queries scored per matmul; memory is ``block_size * M_unique`` floats.
        device: torch device for the matmul.

    Returns:
        ``(above, equal)``: int64 arrays ``[Q]``; ``equal`` excludes the true candidate itself.
    """
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    true_index = np.asarray(true_index, dtype=np.int64)
    _check(queries, candidates, true_index)

    unique, inverse, multiplicity = np.unique(candidates, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    cand = torch.as_tensor(unique, device=device)
    mult = torch.as_tensor(multiplicity, device=device, dtype=torch.int64)
    true_unique = torch.as_tensor(inverse[true_index], device=device)

    above = np.empty(len(queries), dtype=np.int64)
    equal = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        scores = torch.as_tensor(queries[start:stop], device=device) @ cand.T
        true = scores.gather(1, true_unique[start:stop].view(-1, 1))
        above[start:stop] = ((scores > true).to(torch.int64) @ mult).cpu().numpy()
        equal[start:stop] = ((scores == true).to(torch.int64) @ mult).cpu().numpy() - 1
    return above, equal
