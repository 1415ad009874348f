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
