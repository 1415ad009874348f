"""The streaming engine (units, label rings, both backends) and the nearest-label fallback against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from linkrisk.audit.negatives import fallback_recall, label_bitmasks
from linkrisk.audit.ranks import stream_counts

NAN = np.nan


def _policy_value(v: float, policy: str):
    if policy == "zeros":
        return 1 if v == 1 else 0
    if policy == "ones":
        return 1 if v in (1, -1) else 0
    return None if (np.isnan(v) or v == -1) else int(v)


def _label_distance(true_row, cand_row, policy: str) -> int:
    """Observations known in the true vector on which the candidate's value differs (unknown differs)."""
    distance = 0
    for t, c in zip(true_row, cand_row):
        tv, cv = _policy_value(t, policy), _policy_value(c, policy)
        if tv is not None and cv != tv:
            distance += 1
    return distance


def _integer_case(seed: int, n_candidates: int = 60, n_queries: int = 25, dim: int = 3):
    """Small-integer embeddings: float32 scores are exact, so ties are frequent and unambiguous."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(-2, 3, size=(n_candidates, dim)).astype(np.float32)
    candidates[10:14] = candidates[2]  # identical rows
    queries = rng.integers(-2, 3, size=(n_queries, dim)).astype(np.float32)
    return rng, candidates, queries


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_counts_match_brute_force(seed, backend):
    rng, candidates, queries = _integer_case(seed)
    unit = rng.integers(0, 20, size=len(candidates))
    unit[:20] = np.arange(20)  # every unit id present
    true = rng.integers(0, 20, size=len(queries))
    counts = stream_counts(queries, candidates, true, candidate_unit=unit, block_size=7, backend=backend)

    scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
    unit_scores = np.stack([scores[:, unit == u].max(1) for u in range(20)], axis=1)
    for q, t in enumerate(true):
        assert counts.above[q] == (unit_scores[q] > unit_scores[q, t]).sum()
        assert counts.equal[q] == (unit_scores[q] == unit_scores[q, t]).sum() - 1
    assert counts.n_candidates == 20


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_label_rings_match_brute_force_on_real_labels(openi, policy, backend):
    rng, candidates, queries = _integer_case(5, n_candidates=300, n_queries=70, dim=4)
    labels = openi.label_matrix()[:300].copy()
    labels[rng.random(labels.shape) < 0.05] = -1.0
    labels[rng.random(labels.shape) < 0.03] = NAN
    true = rng.choice(300, size=70, replace=False)
    pos, neg = label_bitmasks(labels, policy)
    counts = stream_counts(queries, candidates, true, unit_positive=pos, unit_negative=neg, rings=True,
                           block_size=9, backend=backend)
    exact = stream_counts(queries, candidates, true, unit_positive=pos, unit_negative=neg, block_size=9,
                          backend=backend)

    scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
    for q, t in enumerate(true):
        distance = np.array([_label_distance(labels[t], labels[j], policy) for j in range(300)])
        for ring in range(counts.ring_size.shape[1]):
            members = distance == ring
            assert counts.ring_size[q, ring] == members.sum()
            assert counts.ring_above[q, ring] == (scores[q, members] > scores[q, t]).sum()
            assert counts.ring_equal[q, ring] == (scores[q, members] == scores[q, t]).sum() - (ring == 0)
        assert counts.ring_size[q].sum() == 300
        assert (exact.ring_above[q, 0], exact.ring_equal[q, 0], exact.ring_size[q, 0]) == (
            counts.ring_above[q, 0], counts.ring_equal[q, 0], counts.ring_size[q, 0])


def _enumerate_fallback(ring_scores: list[list[float]], true_score: float, pool_size: int, k: int) -> float:
    """Every pool the fallback can draw: whole near rings, every subset of the completing ring, every tie order."""
    others = [list(r) for r in ring_scores]
    inner: list[float] = []
    for ring in others:
        if 1 + len(inner) + len(ring) >= pool_size:
            break
        inner += ring
    else:
        ring = []
    need = pool_size - 1 - len(inner)
    hits, total = 0.0, 0
    for drawn in itertools.combinations(ring, max(need, 0)) if ring else [()]:
        pool = inner + list(drawn)
        above = sum(s > true_score for s in pool)
        tied = sum(s == true_score for s in pool)
        hits += sum(above + r < k for r in range(tied + 1)) / (tied + 1)
        total += 1
    return hits / total


@pytest.mark.parametrize("ties_case", [
    # (true score, other scores of ring 0, ring 1, ring 2)
    (4.0, [1, 2, 5], [4, 5, 4, 1, 2], [5, 5, 0]),
    (5.0, [], [1, 2, 5, 4, 5], [3, 6]),
    (2.0, [2, 2], [2, 3, 1], [2]),
    (3.0, [1], [0, 1, 2], [7, 3, 3, 0]),
])
@pytest.mark.parametrize("pool_size, k", [(2, 1), (3, 1), (4, 2), (5, 1), (6, 3), (8, 2), (30, 1)])
def test_fallback_recall_matches_enumeration(ties_case, pool_size, k):
    true_score, *rings = ties_case
    ring_above = np.array([[sum(s > true_score for s in r) for r in rings]])
    ring_equal = np.array([[sum(s == true_score for s in r) for r in rings]])
    ring_size = np.array([[len(r) + (i == 0) for i, r in enumerate(rings)]])
    recall, chance, effective, distance = fallback_recall(ring_above, ring_equal, ring_size, pool_size, k)
    n = min(pool_size, int(ring_size.sum()))
    expected = 1.0 if n <= k else _enumerate_fallback(rings, true_score, n, k)
    assert recall[0] == pytest.approx(expected, abs=1e-12)
    assert effective[0] == n
    assert chance[0] == pytest.approx(min(1.0, k / n))

    for rule in ("optimistic", "pessimistic"):
        bound = fallback_recall(ring_above, ring_equal, ring_size, pool_size, k, rule)[0][0]
        assert (bound >= recall[0] - 1e-12) if rule == "optimistic" else (bound <= recall[0] + 1e-12)


def test_unlabelled_units_match_nothing_in_one_pass(openi):
    """Counting with unlabelled units in place equals counting on the labelled subset alone."""
    rng, candidates, queries = _integer_case(9, n_candidates=200, n_queries=60, dim=4)
    labels = openi.label_matrix()[:200].copy()
    labels[rng.random(200) < 0.2] = NAN  # reports without any label
    pos, neg = label_bitmasks(labels, "zeros")
    labelled = ~np.isnan(labels).all(axis=1)
    true = rng.integers(0, 200, size=60)
    together = stream_counts(queries, candidates, true, unit_positive=pos, unit_negative=neg, unit_labelled=labelled,
                             rings=True, block_size=11)
    new_row = np.cumsum(labelled) - 1
    keep = labelled[true]
    alone = stream_counts(queries[keep], candidates[labelled], new_row[true[keep]], unit_positive=pos[labelled],
                          unit_negative=neg[labelled], rings=True, block_size=11)
    width = alone.ring_size.shape[1]
    for name in ("ring_above", "ring_equal", "ring_size"):
        np.testing.assert_array_equal(getattr(together, name)[keep][:, :width], getattr(alone, name))
        assert (getattr(together, name)[~keep] == 0).all()
    reference = stream_counts(queries, candidates, true)
    np.testing.assert_array_equal(together.above, reference.above)
    np.testing.assert_array_equal(together.equal, reference.equal)


def test_first_identical_row_matches_brute_force():
    from linkrisk.audit.ranks import first_identical_row

    rng = np.random.default_rng(4)
    rows = rng.integers(0, 3, size=(300, 2)).astype(np.float32)  # many exact repeats
    first = first_identical_row(rows, chunk=17)
    for i, row in enumerate(rows):
        assert first[i] == next(j for j in range(len(rows)) if (rows[j] == row).all())
