"""Per-record risk figures against direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.risk import record_risk, true_score_margin


def test_margin_matches_direct_computation():
    rng = np.random.default_rng(0)
    report = rng.normal(size=(40, 6)).astype(np.float32)
    report[30] = report[2]  # report 2 has an identical twin
    image = rng.normal(size=(25, 6)).astype(np.float32)
    true = rng.integers(0, 30, size=25)
    true[0] = 2
    margin = true_score_margin(image, report, true, block_size=7)
    for q, t in enumerate(true):
        scores = report @ image[q]
        others = np.delete(scores, t)
        expected = 0.0 if t == 2 else scores[t] - others.max()
        assert margin[q] == pytest.approx(expected, abs=1e-5)


def test_record_risk_orders_and_ranks():
    rng = np.random.default_rng(1)
    report = rng.normal(size=(150, 6)).astype(np.float32)
    image = report[:60] + rng.normal(size=(60, 6)).astype(np.float32)
    true = np.arange(60)
    above, equal = rank_counts(image, report, true)
    table = record_risk(np.arange(60), np.arange(60) // 2, above, equal, 150, true_score_margin(image, report, true))
    assert list(table["risk_rank"]) == list(range(1, 61))
    assert table["p_top1_pool"].is_monotonic_decreasing
    first = int(table["image_id"].iloc[0])
    assert table["full_pool_rank"].iloc[0] == 1 + above[first] + equal[first] / 2
    # p_top1 over pools of 100 from 150: hypergeometric probability that none of the `above` are drawn
    from scipy.stats import hypergeom

    row = table.iloc[-1]
    a = int(row["full_pool_rank"] - 1)
    assert row["p_top1_pool"] == pytest.approx(hypergeom.pmf(0, 149, a, 99))


def test_rank_bin_edges_follow_1_2_5_series():
    from linkrisk.audit.risk import rank_bin_edges

    assert rank_bin_edges(1) == [1, 2]
    assert rank_bin_edges(2) == [1, 2, 3]
    assert rank_bin_edges(64) == [1, 2, 3, 6, 11, 21, 51, 65]
    assert rank_bin_edges(100) == [1, 2, 3, 6, 11, 21, 51, 101]
    assert rank_bin_edges(101) == [1, 2, 3, 6, 11, 21, 51, 101, 102]
    assert rank_bin_edges(3927)[-3:] == [1001, 2001, 3928]
    with pytest.raises(ValueError, match="at least 1"):
        rank_bin_edges(0)


def test_rank_histogram_without_ties_counts_ranks():
    from linkrisk.audit.risk import rank_histogram

    above = np.array([0, 0, 1, 4, 5, 63])
    histogram = rank_histogram(above, np.zeros(6, dtype=np.int64), 64)
    assert histogram["bin_edges"] == [1, 2, 3, 6, 11, 21, 51, 65]
    # ranks 1, 1, 2, 5, 6, 64
    assert histogram["counts"] == [2.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert histogram["n_queries"] == 6
    assert histogram["n_candidates"] == 64
    assert histogram["tie_rule"] == "random"


def test_rank_histogram_spreads_ties_uniformly():
    """A query tied with others has its rank uniform over the tied block, as the random tie rule counts it."""
    from linkrisk.audit.risk import rank_histogram

    # ranks 2..5 with probability 1/4 each: bins [2, 3) and [3, 6) receive 1/4 and 3/4.
    histogram = rank_histogram(np.array([1]), np.array([3]), 10)
    assert histogram["bin_edges"] == [1, 2, 3, 6, 11]
    assert histogram["counts"] == pytest.approx([0.0, 0.25, 0.75, 0.0])


def test_rank_histogram_matches_enumerated_tie_orders():
    from linkrisk.audit.risk import rank_bin_edges, rank_histogram

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=(30, 250)).astype(np.float64)  # many exact ties
    true = rng.integers(0, 250, size=30)
    true_score = scores[np.arange(30), true]
    above = (scores > true_score[:, None]).sum(axis=1)
    equal = (scores == true_score[:, None]).sum(axis=1) - 1
    histogram = rank_histogram(above, equal, 250)
    edges = np.array(rank_bin_edges(250))
    expected = np.zeros(len(edges) - 1)
    for a, e in zip(above, equal):
        for rank in range(a + 1, a + e + 2):
            expected[np.searchsorted(edges, rank, side="right") - 1] += 1.0 / (e + 1)
    assert histogram["counts"] == pytest.approx(expected.tolist())
    assert sum(histogram["counts"]) == pytest.approx(30)


def test_rank_histogram_rejects_counts_past_pool():
    from linkrisk.audit.risk import rank_histogram

    with pytest.raises(ValueError, match="n_candidates"):
        rank_histogram(np.array([5]), np.array([5]), 10)
