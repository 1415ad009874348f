"""Pathology-matched hard negatives: label policies, matched counts and capped pools against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from brute_force import enumerate_pool_recall
from linkrisk.audit.negatives import audit_matched, capped_recall, label_bitmasks, matched_rank_counts
from linkrisk.errors import ConfigError, InputError

NAN = np.nan


def _matches(true_row: np.ndarray, cand_row: np.ndarray, policy: str) -> bool:
    """Brute-force matching rule, observation by observation."""
    def value(v):
        if policy == "zeros":
            return 1 if v == 1 else 0
        if policy == "ones":
            return 1 if v in (1, -1) else 0
        return None if (np.isnan(v) or v == -1) else int(v)

    for t, c in zip(true_row, cand_row):
        tv, cv = value(t), value(c)
        if policy == "ignore":
            if tv is not None and cv != tv:
                return False
        elif tv != cv:
            return False
    return True


HAND_ROWS = np.array([
    [1, 0, NAN, -1],
    [1, 0, 0, 0],
    [1, 0, 1, 0],
    [1, 0, NAN, 1],
    [1, 0, -1, -1],
    [0, 0, NAN, NAN],
])


@pytest.mark.parametrize("policy, expected_group_of_row0", [
    ("zeros", {0, 1, 4}),   # -1 and blank become 0: rows 0, 1 and 4 read [1, 0, 0, 0]
    ("ones", {0, 3}),        # -1 becomes 1, blank 0: row 0 reads [1, 0, 0, 1] like row 3
    ("ignore", {0, 1, 2, 3, 4}),  # only the first two observations of row 0 are known
])
def test_label_policies_on_hand_rows(policy, expected_group_of_row0):
    pos, neg = label_bitmasks(HAND_ROWS, policy)
    known = pos[0] | neg[0]
    group = {j for j in range(len(HAND_ROWS)) if (pos[j] & known) == pos[0] and (neg[j] & known) == neg[0]}
    assert group == expected_group_of_row0
    brute = {j for j in range(len(HAND_ROWS)) if _matches(HAND_ROWS[0], HAND_ROWS[j], policy)}
    assert group == brute


def test_label_bitmasks_reject_bad_values():
    with pytest.raises(InputError, match="label value 2.0 at row 1, column 0"):
        label_bitmasks(np.array([[1, 0], [2, 0]]))
    with pytest.raises(ConfigError, match="valid policies: zeros, ones, ignore"):
        label_bitmasks(HAND_ROWS, "u-ones")


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_matched_counts_match_brute_force_on_real_labels(openi, policy):
    rng = np.random.default_rng(0)
    labels = openi.label_matrix()[:400].copy()
    keep = ~np.isnan(labels).any(axis=1)
    labels = labels[keep][:300]
    labels[rng.random(labels.shape) < 0.05] = -1.0  # uncertain values, as other labellers emit
    labels[rng.random(labels.shape) < 0.03] = NAN
    m = len(labels)
    candidates = rng.normal(size=(m, 8)).astype(np.float32)
    candidates[50:60] = candidates[3]  # duplicate report texts
    true = rng.choice(m, size=80, replace=False)
    queries = candidates[true] + 1.5 * rng.normal(size=(80, 8)).astype(np.float32)
    pos, neg = label_bitmasks(labels, policy)
    above, equal, size = matched_rank_counts(queries, candidates, true, pos, neg, block_size=17)

    unique, inverse = np.unique(candidates, axis=0, return_inverse=True)
    scores = queries.astype(np.float64) @ unique.astype(np.float64).T
    for q, t in enumerate(true):
        members = np.array([j for j in range(m) if _matches(labels[t], labels[j], policy)])
        s = scores[q][inverse.reshape(-1)][members]
        true_score = scores[q][inverse.reshape(-1)][t]
        assert size[q] == len(members)
        assert above[q] == (s > true_score).sum()
        assert equal[q] == (s == true_score).sum() - 1


def test_capped_pools_match_enumeration_with_ties():
    # One query per group; scores within the group as in the tied case [1, 2, 5, 4, 5].
    group_scores = [[1, 2, 5, 4, 5], [3, 3, 3], [7]]
    true_positions = [3, 1, 0]
    above = np.array([sum(s > g[t] for s in g) for g, t in zip(group_scores, true_positions)])
    equal = np.array([sum(s == g[t] for s in g) - 1 for g, t in zip(group_scores, true_positions)])
    size = np.array([len(g) for g in group_scores])
    for pool, k in [(2, 1), (3, 1), (4, 2), (10, 1), ("full", 1), ("full", 2)]:
        recall, chance, effective = capped_recall(above, equal, size, pool, k)
        for q, (g, t) in enumerate(zip(group_scores, true_positions)):
            n = len(g) if pool == "full" else min(pool, len(g))
            expected = 1.0 if n <= k else enumerate_pool_recall(g, t, n, k)
            assert recall[q] == pytest.approx(expected, abs=1e-12), (pool, k, q)
            assert effective[q] == n
            assert chance[q] == pytest.approx(min(1.0, k / n))


def test_audit_matched_reports_capped_share():
    above, equal, size = np.zeros(4, int), np.zeros(4, int), np.array([5, 50, 200, 1])
    result = audit_matched(above, equal, size, np.arange(4), pools=[10, 100, "full"], ks=[1], n_boot=20)
    by_pool = {e["pool"]: e for e in result["recall"]}
    assert by_pool[10]["full_pool_share"] == 0.5
    assert by_pool[100]["full_pool_share"] == 0.25
    assert by_pool[10]["effective_pool"] == {"min": 1, "median": 7.5, "max": 10}
    assert by_pool["full"]["value"] == 1.0
    assert result["group_size"]["max"] == 200


def test_label_matched_audit_skips_unlabelled(caplog):
    from linkrisk.audit.negatives import audit_label_matched

    rng = np.random.default_rng(3)
    report = rng.normal(size=(30, 6)).astype(np.float32)
    labels = rng.integers(0, 2, size=(30, 3)).astype(float)
    labels[:5] = NAN  # five reports without any label
    report_row = np.arange(30)
    image = report + 0.1 * rng.normal(size=(30, 6)).astype(np.float32)
    result = audit_label_matched(image, report, report_row, np.arange(30), labels, pools=[10, 100, "full"], ks=[1],
                                 n_boot=20)
    assert result["n_queries"] == 25
    assert result["n_queries_without_labels"] == 5
    assert result["n_candidates"] == 25
    assert [e["pool"] for e in result["recall"]] == [10, "full"]  # 100 >= 25 candidates is left out
    with pytest.raises(InputError, match="no query has a labelled true candidate"):
        audit_label_matched(image[:5], report, report_row[:5], np.arange(5), labels)
