"""Independent brute-force references shared by the tests."""

from __future__ import annotations

import itertools

import numpy as np


def enumerate_pool_recall(scores, true: int, pool_size: int, k: int) -> float:
    """Expected Recall@K over every pool of ``pool_size`` containing ``true`` and every order of tied scores."""
    others = [j for j in range(len(scores)) if j != true]
    hits, total = 0.0, 0
    for drawn in itertools.combinations(others, pool_size - 1):
        above = sum(scores[j] > scores[true] for j in drawn)
        tied = sum(scores[j] == scores[true] for j in drawn)
        # the true candidate's position among tied+1 equal scores is uniform
        hits += sum(above + r < k for r in range(tied + 1)) / (tied + 1)
        total += 1
    return hits / total


def tie_aware_hit(other_scores: np.ndarray, true_score: float, n_twins: int, k: int) -> float:
    """Probability that the true candidate ranks within the top ``k`` under random tie-breaking.

    ``other_scores`` excludes the true candidate and its ``n_twins`` identical
    copies, which always tie with it.
    """
    above = int((other_scores > true_score).sum())
    tied = n_twins + int((other_scores == true_score).sum())
    return float(np.mean([above + r < k for r in range(tied + 1)]))
