"""Per-record re-linkage risk: which released images are easiest to re-link.

Three figures per image query. The full-pool rank is its true report's
expected rank under random ties. The top-1 probability is the chance of
ranking first in a uniform pool of 100 (or the whole pool when smaller).
The margin is the true report's score minus the best other report's: 0
when a duplicate text ties, negative when another report wins. The table
contains ids and figures only.
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
