"""Closed-form expected Recall@K and rank counts, checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brute_force import enumerate_pool_recall
from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.recall import (
    audit_counts,
    cluster_bootstrap_ci,
    expected_recall_at_k,
    normalised_rank,
    reciprocal_rank,
)
from linkrisk.errors import ConfigError, InputError


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    m = 9
    scores = rng.integers(0, 4, size=m).astype(float)  # few distinct values: many ties
    true = int(rng.integers(m))
    above = np.array([(scores > scores[true]).sum()])
    equal = np.array([(scores == scores[true]).sum() - 1])
    for pool_size in range(2, m + 1):
        for k in range(1, pool_size):
            expected = enumerate_pool_recall(scores, true, pool_size, k)
            got = expected_recall_at_k(above, equal, m, pool_size, k)[0]
            assert got == pytest.approx(expected, abs=1e-12), (pool_size, k)


def test_tie_rules_bound_random():
    above = np.array([0, 2, 5, 1])
    equal = np.array([3, 0, 4, 10])
    for pool_size, k in [(5, 1), (10, 3), (20, 1), (20, 5)]:
        low = expected_recall_at_k(above, equal, 20, pool_size, k, "pessimistic")
        mid = expected_recall_at_k(above, equal, 20, pool_size, k, "random")
        high = expected_recall_at_k(above, equal, 20, pool_size, k, "optimistic")
        assert np.all(low <= mid + 1e-15)
        assert np.all(mid <= high + 1e-15)


def test_full_pool_random_ties_exact():
    # a=1, e=3: ranks 2..5 equally likely; Recall@3 = P(rank <= 3) = 2/4
    got = expected_recall_at_k(np.array([1]), np.array([3]), 10, 10, 3)
    assert got[0] == pytest.approx(0.5)


def test_no_signal_recall_equals_chance():
    # A scorer that ties everything gives exactly K/N under random tie-breaking.
    m = 50
    above, equal = np.zeros(m, int), np.full(m, m - 1)
    for pool_size, k in [(10, 1), (10, 5), (50, 1), (25, 10)]:
        assert expected_recall_at_k(above, equal, m, pool_size, k).mean() == pytest.approx(k / pool_size)


def test_normalised_and_reciprocal_rank():
    above, equal = np.array([0, 4, 2]), np.array([0, 0, 2])
    np.testing.assert_allclose(normalised_rank(above, equal, 9), [0.0, 0.5, 3 / 8])
    expected_rr = [1.0, 1 / 5, np.mean([1 / 3, 1 / 4, 1 / 5])]
    np.testing.assert_allclose(reciprocal_rank(above, equal), expected_rr)


def test_rank_counts_match_full_matrix():
    rng = np.random.default_rng(0)
    reports = rng.normal(size=(60, 8)).astype(np.float32)
    reports[10:20] = reports[0]  # duplicated report texts give identical rows
    reports /= np.linalg.norm(reports, axis=1, keepdims=True)
    true = rng.integers(0, 60, size=37)
    images = reports[true] + 0.8 * rng.normal(size=(37, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    above, equal = rank_counts(images, reports, true, block_size=5)

    unique, inverse = np.unique(reports, axis=0, return_inverse=True)
    scores = images.astype(np.float64) @ unique.astype(np.float64).T
    for q in range(37):
        s = scores[q][inverse.reshape(-1)]
        t = s[true[q]]
        assert above[q] == (s > t).sum()
        assert equal[q] == (s == t).sum() - 1
    assert (equal[np.isin(true, [0, *range(10, 20)])] >= 10).all()


def test_rank_counts_reject_bad_inputs():
    good = np.eye(3, dtype=np.float32)
    with pytest.raises(InputError, match="dimension"):
        rank_counts(good, np.eye(3, 4, dtype=np.float32), np.arange(3))
    bad = good.copy()
    bad[1, 1] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        rank_counts(bad, good, np.arange(3))
    with pytest.raises(InputError, match="true indices"):
        rank_counts(good, good, np.array([0, 1, 3]))
    with pytest.raises(InputError, match="3 queries but 2"):
        rank_counts(good, good, np.arange(2))
    with pytest.raises(InputError, match="must be integers"):
        rank_counts(good, good, np.array([0.0, 0.7, 2.0]))
    with pytest.raises(ConfigError, match="tie rule"):
        normalised_rank(np.zeros(3, int), np.zeros(3, int), 3, ties="first")


def test_rank_counts_block_size_does_not_change_counts():
    rng = np.random.default_rng(2)
    reports = rng.normal(size=(300, 16)).astype(np.float32)
    reports[100:150] = reports[7]
    images = rng.normal(size=(120, 16)).astype(np.float32)
    true = rng.integers(0, 300, size=120)
    reference = rank_counts(images, reports, true, block_size=120)
    for block_size in (None, 1, 7, 1000):
        above, equal = rank_counts(images, reports, true, block_size=block_size)
        np.testing.assert_array_equal(above, reference[0])
        np.testing.assert_array_equal(equal, reference[1])


def test_pool_and_k_validation():
    with pytest.raises(ConfigError, match="pool size 11"):
        expected_recall_at_k(np.zeros(1, int), np.zeros(1, int), 10, 11, 1)
    with pytest.raises(ConfigError, match="tie rule"):
        expected_recall_at_k(np.zeros(1, int), np.zeros(1, int), 10, 5, 1, ties="first")


def test_bootstrap_ci_resamples_patients():
    values = np.array([1.0, 1.0, 0.0, 0.0])
    low, high = cluster_bootstrap_ci(values, np.array(["a", "a", "b", "b"]), n_boot=2000, seed=0)
    # two patients: resampled means can only be 0, 0.5 or 1
    assert low == 0.0
    assert high == 1.0
    low, high = cluster_bootstrap_ci(np.full(10, 0.3), np.arange(10), n_boot=100, seed=0)
    assert low == pytest.approx(0.3)
    assert high == pytest.approx(0.3)


def test_audit_counts_skips_pools_too_large():
    result = audit_counts(np.zeros(4, int), np.zeros(4, int), 50, np.arange(4), pools=[10, 100, "full"], ks=[1, 5, 10],
                          n_boot=50)
    pools = {(e["pool"], e["k"]) for e in result["recall"]}
    assert pools == {(10, 1), (10, 5), ("full", 1), ("full", 5), ("full", 10)}
    assert all(e["value"] == 1.0 for e in result["recall"])
    assert all(math.isclose(e["lift"], e["value"] / e["chance"]) for e in result["recall"])


def test_monte_carlo_agrees_on_real_embeddings(openi, cache_dir):
    """Closed form vs explicitly sampled pools on real Open-i report embeddings with duplicate texts."""
    from linkrisk.models.features import embed_texts
    from linkrisk.models.text_encoders import WordLlamaTextEncoder

    reports = embed_texts(openi.reports["text"].tolist(), WordLlamaTextEncoder(), cache_dir, "openi", progress=False)
    reports /= np.linalg.norm(reports, axis=1, keepdims=True)
    rng = np.random.default_rng(7)
    # Queries: a noisy copy of a report's own embedding, so the true report ranks high but not always first.
    true = rng.choice(len(reports), size=300, replace=False)
    queries = reports[true] + 0.05 * rng.normal(size=(300, reports.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    # Exact duplicates of the query's true text: the query equals it, so the twins tie exactly.
    duplicated_text = openi.reports["text"].duplicated(keep=False).to_numpy()
    dup_true = rng.choice(np.flatnonzero(duplicated_text), size=100, replace=False)
    queries = np.concatenate([queries, reports[dup_true]])
    true = np.concatenate([true, dup_true])

    above, equal = rank_counts(queries, reports, true)
    assert (equal[300:] > 0).all()

    scores = queries.astype(np.float64) @ reports.astype(np.float64).T
    m = len(reports)
    n_pools = 400
    for pool_size, k in [(10, 1), (100, 1), (100, 5), (1000, 10)]:
        closed = expected_recall_at_k(above, equal, m, pool_size, k).mean()
        hits = np.zeros(len(queries))
        for q in range(len(queries)):
            others = np.delete(np.arange(m), true[q])
            for _ in range(n_pools):
                pool = rng.choice(others, size=pool_size - 1, replace=False)
                s = scores[q, pool]
                a = (s > scores[q, true[q]]).sum()
                e = (s == scores[q, true[q]]).sum()
                r = rng.integers(0, e + 1)  # random tie-break
                hits[q] += a + r < k
        sampled = hits.mean() / n_pools
        standard_error = math.sqrt(sampled * (1 - sampled) / (len(queries) * n_pools)) + 1e-9
        assert abs(sampled - closed) < 4 * standard_error + 1e-3, (pool_size, k, sampled, closed)


@pytest.mark.parametrize("m, n, k", [(2, 2, 1), (50, 10, 1), (50, 50, 5), (3000, 1000, 10), (43793, 10000, 5),
                                     (500, 400, 100)])
def test_hit_cdf_matches_scipy(m, n, k):
    from scipy.stats import hypergeom

    from linkrisk.audit.recall import _hit_cdf

    reference = hypergeom.cdf(k - 1, m - 1, np.arange(m), n - 1)
    np.testing.assert_allclose(_hit_cdf(m, n, k), reference, rtol=1e-9, atol=1e-12)
