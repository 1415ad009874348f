"""Patient-block permutation test, one-sided upper bounds and power, against simulation and brute force."""

from __future__ import annotations

import math

import numpy as np
import torch
import pytest
from scipy.stats import binom, kstest

from linkrisk.audit.ranks import rank_counts, stream_counts
from linkrisk.audit.recall import expected_recall_at_k, normalised_rank
from linkrisk.audit.stats import (
    binomial_power,
    clopper_pearson_upper,
    patient_permutations,
    permutation_test,
    recall_upper_bounds,
    required_queries,
)
from linkrisk.errors import ConfigError


def _cohort(rng: np.random.Generator, n_patients: int = 30, n_extra_reports: int = 5, dim: int = 8):
    """Pairs of a small cohort with mixed patient shapes: ``(true_unit, patients, n_reports)``.

    A third of the patients have one image and one report, a third two
    images of one report, and a third two images with a report each. The
    last ``n_extra_reports`` reports have no image.
    """
    true_unit, patients, report = [], [], 0
    for patient in range(n_patients):
        shape = patient % 3
        if shape == 0:
            true_unit += [report]
            report += 1
        elif shape == 1:
            true_unit += [report, report]
            report += 1
        else:
            true_unit += [report, report + 1]
            report += 2
        patients += [f"p{patient}"] * (1 if shape == 0 else 2)
    return np.array(true_unit), np.array(patients), report + n_extra_reports


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _randomised_p(observed: float, null: np.ndarray, rng: np.random.Generator, larger_is_extreme: bool) -> float:
    """Randomised permutation p-value: exactly uniform under exchangeability, whatever the ties."""
    if not larger_is_extreme:
        observed, null = -observed, -null
    above = (null > observed).sum()
    tied = (null == observed).sum()
    return (above + rng.uniform() * (1 + tied)) / (1 + len(null))


def test_null_pvalues_valid_and_bounds_cover_chance():
    # Independent random embeddings carry no linkage, so under the patient-block
    # scheme the observed statistic is exchangeable with the B permuted ones.
    #
    # The +1-corrected p-values are discrete and super-uniform (P(p <= u) <= u),
    # so a two-sided KS test against U(0, 1) has no exact level for them. Two
    # checks have one:
    # - one-sided KS ("greater": the empirical CDF above the uniform one) tests
    #   exactly the validity claim, and super-uniform p-values satisfy its null;
    # - two-sided KS on randomised p-values, which are exactly U(0, 1) under
    #   exchangeability, tests that the scheme is not needlessly conservative.
    # The reported upper bound must cover chance (the expected Recall@K of
    # unlinked embeddings) in at least 95% of cohorts. At 60 patients the
    # studentized bootstrap bound reaches that at N = 10, and Clopper–Pearson
    # carries the full pool, where few queries hit.
    n_seeds, n_permutations = 200, 99
    corrected = {"recall": [], "rank": []}
    randomised = {"recall": [], "rank": []}
    covered = {10: 0, "full": 0}
    chance = {}
    tie_rng = np.random.default_rng(12345)
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        true_unit, patients, n_reports = _cohort(rng, n_patients=60)
        queries, reports = _unit(rng, len(true_unit), 8), _unit(rng, n_reports, 8)
        result = permutation_test(queries, reports, true_unit, patients, pools=[10], ks=[1],
                                  n_permutations=n_permutations, seed=seed)
        recall, rank = result.recall[0], result.mean_normalised_rank
        corrected["recall"].append(recall["p_value"])
        corrected["rank"].append(rank["p_value"])
        randomised["recall"].append(_randomised_p(recall["observed"], result.null_recall[0], tie_rng, True))
        randomised["rank"].append(_randomised_p(rank["observed"], result.null_rank, tie_rng, False))

        above, equal = rank_counts(queries, reports, true_unit)
        bounds = recall_upper_bounds(above, equal, n_reports, patients, pools=[10, "full"], ks=[1], n_boot=400,
                                     seed=seed)
        for entry in bounds:
            chance[entry["pool"]] = entry["chance"]
            covered[entry["pool"]] += entry["upper"] >= entry["chance"]

    for statistic in ("recall", "rank"):
        validity = kstest(corrected[statistic], "uniform", alternative="greater").pvalue
        assert validity > 0.01, f"{statistic}: corrected p-values are anti-conservative (KS p = {validity:.4f})"
        uniformity = kstest(randomised[statistic], "uniform").pvalue
        assert uniformity > 0.01, f"{statistic}: randomised p-values are not uniform (KS p = {uniformity:.4f})"
    for pool, count in covered.items():
        assert count / n_seeds >= 0.95, f"pool {pool}: upper bound covered chance {chance[pool]:.3f} " \
                                        f"in {count} of {n_seeds} cohorts"


def test_planted_linkage_gets_smallest_p():
    rng = np.random.default_rng(3)
    true_unit, patients, n_reports = _cohort(rng)
    reports = _unit(rng, n_reports, 16)
    queries = reports[true_unit] + 0.1 * rng.normal(size=(len(true_unit), 16)).astype(np.float32)
    n_permutations = 199
    result = permutation_test(queries, reports, true_unit, patients, pools=[10, "full"], ks=[1, 5],
                              n_permutations=n_permutations)
    for entry in result.recall:
        assert entry["p_value"] == pytest.approx(1 / (n_permutations + 1)), entry
        assert entry["observed"] > entry["null_q95"], entry
    assert result.mean_normalised_rank["p_value"] == pytest.approx(1 / (n_permutations + 1))


def test_observed_statistics_match_audit():
    rng = np.random.default_rng(5)
    true_unit, patients, n_reports = _cohort(rng, n_patients=12)
    reports = _unit(rng, n_reports, 8)
    reports[3] = reports[4]  # two identical texts tie exactly
    queries = reports[true_unit] + 0.8 * rng.normal(size=(len(true_unit), 8)).astype(np.float32)
    above, equal = rank_counts(queries, reports, true_unit)
    for ties in ("random", "optimistic", "pessimistic"):
        result = permutation_test(queries, reports, true_unit, patients, pools=[5, "full"], ks=[1, 2],
                                  n_permutations=20, ties=ties)
        for entry in result.recall:
            size = n_reports if entry["pool"] == "full" else entry["pool"]
            expected = expected_recall_at_k(above, equal, n_reports, size, entry["k"], ties).mean()
            assert entry["observed"] == pytest.approx(expected, abs=1e-12), (ties, entry)
        rank = normalised_rank(above, equal, n_reports, ties).mean()
        assert result.mean_normalised_rank["observed"] == pytest.approx(rank, abs=1e-12), ties


def test_observed_statistics_with_candidate_units():
    rng = np.random.default_rng(6)
    reports = _unit(rng, 20, 8)
    candidate_unit = np.repeat(np.arange(10), 2)  # two reports per patient unit
    true_unit = np.arange(10).repeat(2)
    queries = reports + 0.9 * rng.normal(size=reports.shape).astype(np.float32)
    patients = true_unit.astype(str)
    counts = stream_counts(queries, reports, true_unit, candidate_unit=candidate_unit)
    result = permutation_test(queries, reports, true_unit, patients, pools=["full"], ks=[1], n_permutations=10,
                              candidate_unit=candidate_unit)
    expected = expected_recall_at_k(counts.above, counts.equal, 10, 10, 1).mean()
    assert result.recall[0]["observed"] == pytest.approx(expected, abs=1e-12)
    assert result.facts["n_candidates"] == 10


def _sorted_units(true_unit: np.ndarray, rows: np.ndarray) -> tuple:
    return tuple(int(u) for u in sorted(true_unit[rows]))


def test_permutations_keep_patients_intact():
    # Patients a, b, c have shape (0, 0, 1); d and e shape (0,); f alone has (0, 1).
    true_unit = np.array([0, 1, 0, 2, 2, 3, 5, 4, 4, 6, 7, 8, 9])
    patients = np.array(["a", "a", "a", "b", "b", "b", "c", "c", "c", "d", "e", "f", "f"])
    n_permutations = 1200
    permuted = patient_permutations(true_unit, patients, n_permutations, seed=1).true_units()
    assert permuted.shape == (n_permutations, len(true_unit))

    rows_of = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    # Each patient's queries in canonical order: sorted by true unit, then row.
    canonical = {p: rows[np.lexsort((rows, true_unit[rows]))] for p, rows in rows_of.items()}
    shape_of = {p: tuple(np.unique(true_unit[rows], return_inverse=True)[1].reshape(-1)) for p, rows in
                canonical.items()}
    mappings = {}
    for b in range(n_permutations):
        mapping = {}
        for patient, rows in canonical.items():
            new_units = tuple(int(u) for u in permuted[b, rows])
            sources = [other for other, other_rows in canonical.items()
                       if tuple(int(u) for u in true_unit[other_rows]) == new_units]
            assert len(sources) == 1, f"permutation {b}: patient {patient} got units {new_units} of no single patient"
            mapping[patient] = sources[0]
            assert shape_of[sources[0]] == shape_of[patient], f"permutation {b}: {patient} took {sources[0]}"
        assert sorted(mapping.values()) == sorted(mapping), f"permutation {b} is not a bijection: {mapping}"
        assert mapping["f"] == "f", "a patient alone in its stratum must keep its own units"
        key = tuple(mapping[p] for p in ("a", "b", "c"))
        mappings[key] = mappings.get(key, 0) + 1

    # All 3! arrangements of the stratum {a, b, c} appear, each about 1200 / 6 = 200 times.
    assert len(mappings) == 6, mappings
    for key, count in mappings.items():
        assert 140 <= count <= 260, f"arrangement {key} drawn {count} times, expected about 200"


def test_permutations_are_seeded():
    true_unit = np.arange(8)
    patients = np.arange(8).astype(str)
    first = patient_permutations(true_unit, patients, 5, seed=7).true_units()
    second = patient_permutations(true_unit, patients, 5, seed=7).true_units()
    other = patient_permutations(true_unit, patients, 5, seed=8).true_units()
    assert (first == second).all()
    assert not (first == other).all()


def test_clopper_pearson_values():
    assert clopper_pearson_upper(0, 40) == pytest.approx(1 - 0.05 ** (1 / 40), rel=1e-10)
    assert clopper_pearson_upper(40, 40) == 1.0
    # Defining property: at the bound, P(X <= x) equals 1 - level.
    bound = clopper_pearson_upper(7, 50)
    assert binom.cdf(7, 50, bound) == pytest.approx(0.05, rel=1e-8)


def test_reported_bound_uses_exact_when_no_hits():
    n = 60
    above = np.full(n, 3)
    equal = np.zeros(n, dtype=np.int64)
    bounds = recall_upper_bounds(above, equal, 50, np.arange(n).astype(str), pools=[10, "full"], ks=[1], n_boot=200)
    full = next(entry for entry in bounds if entry["pool"] == "full")
    assert full["upper_percentile"] == 0.0
    assert full["upper_studentized"] == 0.0
    assert full["upper"] == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-10)
    assert full["upper_method"] == "clopper_pearson"
    assert full["lift_upper"] == pytest.approx(full["upper"] * 50)
    pool10 = next(entry for entry in bounds if entry["pool"] == 10)
    assert pool10["upper_clopper_pearson"] is None
    assert pool10["upper_method"] in ("percentile", "studentized")
    assert pool10["upper"] == max(pool10["upper_percentile"], pool10["upper_studentized"])


def test_bound_skips_exact_with_top_ties():
    above = np.array([0, 0, 2, 5])
    equal = np.array([1, 0, 0, 0])  # the first query ties at the top: Recall@1 is 0.5
    bounds = recall_upper_bounds(above, equal, 20, np.array(["a", "b", "c", "d"]), pools=["full"], ks=[1],
                                 n_boot=100)
    assert bounds[0]["upper_clopper_pearson"] is None
    assert bounds[0]["value"] == pytest.approx(1.5 / 4)


def test_power_matches_simulation():
    pool_size, k, lift, alpha = 10, 1, 3.0, 0.05
    chance, recall = k / pool_size, lift * k / pool_size
    exact_n = required_queries(lift, pool_size, k, alpha, 0.8, method="exact")
    normal_n = required_queries(lift, pool_size, k, alpha, 0.8, method="normal")
    assert binomial_power(exact_n, chance, recall, alpha) >= 0.8
    assert binomial_power(exact_n - 1, chance, recall, alpha) < 0.8 or exact_n == 1
    assert abs(exact_n - normal_n) <= 0.25 * normal_n, (exact_n, normal_n)

    # Simulate studies of exact_n independent queries, each a hit with probability `recall`,
    # and test each study with the exact one-sided binomial test at alpha.
    rng = np.random.default_rng(0)
    n_studies = 20000
    hits = rng.binomial(exact_n, recall, size=n_studies)
    rejected = binom.sf(hits - 1, exact_n, chance) <= alpha
    simulated = rejected.mean()
    predicted = float(binomial_power(exact_n, chance, recall, alpha))
    standard_error = math.sqrt(predicted * (1 - predicted) / n_studies)
    assert abs(simulated - predicted) <= 4 * standard_error, (simulated, predicted)

    # Under the null the same test rejects at most alpha of the time.
    null_hits = rng.binomial(exact_n, chance, size=n_studies)
    assert (binom.sf(null_hits - 1, exact_n, chance) <= alpha).mean() <= alpha + 4 * math.sqrt(alpha / n_studies)


def test_power_input_errors():
    with pytest.raises(ConfigError, match="lift"):
        required_queries(1.0, 10, 1)
    with pytest.raises(ConfigError, match="lift"):
        required_queries(20.0, 10, 1)
    with pytest.raises(ConfigError, match="K < N"):
        required_queries(2.0, 5, 5)
    with pytest.raises(ConfigError, match="power method"):
        required_queries(2.0, 10, 1, method="bayes")


def test_power_table_fields():
    from linkrisk.audit.stats import binomial_power, power_table, required_queries

    table = power_table(81, 48, [(10, 10), (100, 100), ("full", 64)])
    assert {(e["pool"], e["lift"]) for e in table} == {(10, 2.0), (10, 5.0), (100, 2.0), (100, 5.0),
                                                       ("full", 2.0), ("full", 5.0)}
    entry = next(e for e in table if e["pool"] == 100 and e["lift"] == 2.0)
    assert entry["power_at_queries"] == pytest.approx(float(binomial_power(81, 0.01, 0.02)))
    assert entry["power_at_patients"] == pytest.approx(float(binomial_power(48, 0.01, 0.02)))
    assert entry["power_at_patients"] < entry["power_at_queries"] < 0.8
    assert entry["required_queries"] == required_queries(2.0, 100, 1)
    assert float(binomial_power(entry["required_queries"], 0.01, 0.02)) >= 0.8
    # A lift above N / K is impossible and left out.
    assert power_table(10, 10, [(2, 2)], lifts=(5.0,)) == []


def test_device_counting_equals_numpy_counting():
    """The torch path used on GPUs (unit maxima, one sort per block, binary search) gives the NumPy path's counts."""
    from linkrisk.audit.stats import _counts_for_targets, _counts_for_targets_on_device, _unit_score_blocks

    rng = np.random.default_rng(3)
    candidates = rng.normal(size=(900, 16)).astype(np.float32)
    candidates[5] = candidates[6]  # an exact tie
    queries = candidates[:600] + 0.5 * rng.normal(size=(600, 16)).astype(np.float32)
    for unit in (None, np.r_[np.arange(700), rng.integers(0, 700, 200)]):
        numpy_blocks = _unit_score_blocks(queries, candidates, unit, 128, "cpu", on_device=False)
        torch_blocks = _unit_score_blocks(queries, candidates, unit, 128, "cpu", on_device=True)
        for (rows, scores), (same_rows, tensor) in zip(numpy_blocks, torch_blocks):
            assert isinstance(tensor, torch.Tensor)
            np.testing.assert_array_equal(rows, same_rows)
            targets = rng.integers(0, scores.shape[1], size=(len(rows), 7))
            above, equal = _counts_for_targets(scores, targets)
            device_above, device_equal = _counts_for_targets_on_device(tensor, targets)
            np.testing.assert_array_equal(device_above, above)
            np.testing.assert_array_equal(device_equal, equal)
