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


# Default working memory for one block of scores and its comparison masks.
DEFAULT_BLOCK_BYTES = 512 * 2**20


def rank_counts(queries: np.ndarray, candidates: np.ndarray, true_index: np.ndarray,
                block_size: int | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Count candidates scoring above and equal to each query's true candidate.

    Args:
        queries: ``[Q, D]`` float embeddings (L2-normalised for cosine scores).
        candidates: ``[M, D]`` float embeddings.
        true_index: ``[Q]`` int, row of each query's true candidate.
        block_size: queries scored per matmul. Peak memory is about
            ``block_size * M_unique * 6`` bytes (float32 scores plus two
            boolean masks). Default: as many queries as fit in 512 MiB.
        device: torch device for the matmul.

    Returns:
        ``(above, equal)``: int64 arrays ``[Q]``; ``equal`` excludes the true candidate itself.
    """
    true_index = np.asarray(true_index)
    if true_index.size and not np.issubdtype(true_index.dtype, np.integer):
        raise InputError(f"true indices must be integers, got dtype {true_index.dtype}")
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.float32)
    true_index = true_index.astype(np.int64)
    _check(queries, candidates, true_index)

    unique, inverse, multiplicity = np.unique(candidates, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    cand = torch.as_tensor(unique, device=device)
    true_unique = torch.as_tensor(inverse[true_index], device=device)
    if block_size is None:
        block_size = max(1, DEFAULT_BLOCK_BYTES // (6 * len(unique)))
    # With duplicates, a mask is weighted by multiplicity through a float32
    # matmul, exact for counts below 2**24; without them a plain sum suffices.
    weighted = bool((multiplicity > 1).any())
    if weighted and len(candidates) >= 2**24:
        raise InputError(f"{len(candidates)} candidates exceed the 2**24 exact-count limit of duplicate weighting")
    mult = torch.as_tensor(multiplicity, device=device, dtype=torch.float32)

    def count(mask: torch.Tensor) -> np.ndarray:
        total = (mask.to(torch.float32) @ mult) if weighted else mask.sum(1)
        return total.round().to(torch.int64).cpu().numpy()

    above = np.empty(len(queries), dtype=np.int64)
    equal = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), block_size):
        stop = min(start + block_size, len(queries))
        scores = torch.as_tensor(queries[start:stop], device=device) @ cand.T
        true = scores.gather(1, true_unique[start:stop].view(-1, 1))
        above[start:stop] = count(scores > true)
        equal[start:stop] = count(scores == true) - 1
    return above, equal
