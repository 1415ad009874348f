"""Linear probe: exact cases, skipped labels, bootstrap intervals, cross-validated C and the split helper."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from linkrisk.errors import ConfigError, InputError
from linkrisk.probe import patient_resample_counts, probe_macro_auroc, probe_split, select_c


def _data(seed: int, n: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + 0.8 * rng.normal(size=n) > 0), np.zeros(n)], axis=1).astype(float)
    return x, y


def test_separable_label_scores_one_and_constant_label_skipped():
    x_train, y_train = _data(0, 200)
    x_test, y_test = _data(1, 100)
    y_test[::7, 1] = np.nan  # unknown values are left out of that label only
    result = probe_macro_auroc(x_train, y_train, x_test, y_test, np.arange(100), ["a", "b", "never"], n_boot=200)
    by_name = {entry["name"]: entry for entry in result["labels"]}
    assert by_name["a"]["auroc"] > 0.99
    assert 0.7 < by_name["b"]["auroc"] < 0.99
    assert [s["name"] for s in result["skipped_labels"]] == ["never"]
    assert result["macro_auroc"] == pytest.approx(np.mean([by_name["a"]["auroc"], by_name["b"]["auroc"]]))
    assert result["ci95"][0] <= result["macro_auroc"] <= result["ci95"][1]


def test_auroc_matches_sklearn_on_same_scores():
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = _data(2, 150)
    x_test, y_test = _data(3, 80)
    result = probe_macro_auroc(x_train, y_train[:, 1:2], x_test, y_test[:, 1:2], np.arange(80), ["b"], n_boot=10)
    model = LogisticRegression(max_iter=5000).fit(x_train, y_train[:, 1])
    assert result["labels"][0]["auroc"] == pytest.approx(roc_auc_score(y_test[:, 1], model.decision_function(x_test)))


def test_no_usable_label_is_nan_with_warning():
    x, y = _data(4, 30)
    with pytest.warns(RuntimeWarning, match="undefined"):
        result = probe_macro_auroc(x, y[:, 2:], x, y[:, 2:], np.arange(30), ["never"], n_boot=10)
    assert np.isnan(result["macro_auroc"])


def test_weighted_auroc_matches_sklearn_weights():
    from linkrisk.probe.linear import weighted_auroc

    rng = np.random.default_rng(5)
    y = (rng.random(40) < 0.3).astype(float)
    score = rng.integers(0, 6, size=40).astype(float)  # many ties
    weights = rng.integers(0, 4, size=(5, 40)).astype(float)
    got = weighted_auroc(y, score, weights)
    for b in range(5):
        assert got[b] == pytest.approx(roc_auc_score(y, score, sample_weight=weights[b]))
    assert np.isnan(weighted_auroc(y, score, np.where(y == 1, 0.0, 1.0)[None, :]))[0]



def brute_force_bootstrap(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, n_boot: int, seed: int):
    """Patient bootstrap by explicit resampling: per-label and macro 95% percentile intervals and resamples used.

    Resample ``b`` takes the patients in row ``b`` of
    ``default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))``
    (indices into ``np.unique(groups)``) and concatenates every row of each
    drawn patient. Rows whose label is not 0 or 1 are left out of that label.
    Only resamples in which every label has both classes are kept.
    """
    patients = np.unique(groups)
    rows_of = [np.flatnonzero(groups == patient) for patient in patients]
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_boot, len(patients)))
    complete_resamples = []
    for drawn in draws:
        rows = np.concatenate([rows_of[k] for k in drawn])
        values = []
        for label in range(y.shape[1]):
            label_rows = rows[np.isin(y[rows, label], (0.0, 1.0))]
            if len(np.unique(y[label_rows, label])) < 2:
                break
            values.append(roc_auc_score(y[label_rows, label], scores[label_rows, label]))
        else:
            complete_resamples.append(values)
    complete_resamples = np.array(complete_resamples)
    label_ci = np.percentile(complete_resamples, [2.5, 97.5], axis=0).T
    macro_ci = np.percentile(complete_resamples.mean(axis=1), [2.5, 97.5])
    return label_ci, macro_ci, len(complete_resamples)


def _grouped_data(seed: int, n_patients: int, images_per_patient: int = 3):
    """Rows of patients with 1 to ``images_per_patient`` images, with labels that depend on features plus noise."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, images_per_patient + 1, size=n_patients)
    groups = np.repeat(np.arange(n_patients), sizes).astype(str)
    x = rng.normal(size=(len(groups), 6))
    y = np.stack([x[:, 0] + 0.7 * rng.normal(size=len(groups)) > 0.3,
                  x[:, 1] + 1.5 * rng.normal(size=len(groups)) > 0.8], axis=1).astype(float)
    y[rng.random(len(groups)) < 0.1, 1] = np.nan
    y[rng.random(len(groups)) < 0.05, 1] = -1.0
    return x, y, groups


def test_label_ci_matches_brute_force_bootstrap():
    x_train, y_train, _ = _grouped_data(10, 60)
    x_test, y_test, groups = _grouped_data(11, 12)
    # Label b is positive for every image of three of the 12 patients, so
    # about 3% of resamples lack a positive and must be dropped.
    y_test[:, 1] = np.where(np.isin(groups, ["0", "1", "2"]), 1.0, np.where(np.isnan(y_test[:, 1]), np.nan, 0.0))
    result = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "b"], n_boot=150, seed=3,
                               min_count=3)
    assert [entry["name"] for entry in result["labels"]] == ["a", "b"]

    scores = np.full(y_test.shape, np.nan)
    for label in range(2):
        known_train = np.isin(y_train[:, label], (0.0, 1.0))
        known_test = np.isin(y_test[:, label], (0.0, 1.0))
        model = LogisticRegression(max_iter=5000).fit(x_train[known_train], y_train[known_train, label])
        scores[known_test, label] = model.decision_function(x_test[known_test])
    label_ci, macro_ci, used = brute_force_bootstrap(y_test, scores, groups, 150, 3)

    assert result["bootstrap_resamples_used"] == used
    assert used < 150
    assert result["ci95"] == pytest.approx(list(macro_ci), abs=1e-12)
    for entry, expected in zip(result["labels"], label_ci):
        assert entry["ci95"] == pytest.approx(list(expected), abs=1e-12)


def test_label_ci_contains_label_auroc():
    x_train, y_train, _ = _grouped_data(12, 150)
    x_test, y_test, groups = _grouped_data(13, 60)
    result = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "b"], n_boot=300)
    for entry in result["labels"]:
        assert entry["ci95"][0] <= entry["auroc"] <= entry["ci95"][1], entry
        assert entry["ci95"][0] < entry["ci95"][1], entry
    assert result["ci95"][0] <= result["macro_auroc"] <= result["ci95"][1]
    assert result["macro_auroc"] == pytest.approx(np.mean([entry["auroc"] for entry in result["labels"]]))


def test_label_counts_exclude_uncertain_and_unknown():
    x_train, y_train, _ = _grouped_data(14, 80)
    x_test, y_test, groups = _grouped_data(15, 40)
    result = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "b"], n_boot=20)
    entry = result["labels"][1]
    assert entry["n_train_pos"] == int((y_train[:, 1] == 1).sum())
    assert entry["n_train_neg"] == int((y_train[:, 1] == 0).sum())
    assert entry["n_test_pos"] == int((y_test[:, 1] == 1).sum())
    assert entry["n_test_neg"] == int((y_test[:, 1] == 0).sum())
    assert entry["n_test_excluded"] == int((np.isnan(y_test[:, 1]) | (y_test[:, 1] == -1)).sum())
    assert entry["n_test_excluded"] > 0
    assert entry["C"] == 1.0
    assert result["C"] == 1.0
    assert result["min_count"] == 5


def test_rare_label_skipped_with_counts():
    x_train, y_train, _ = _grouped_data(16, 80)
    x_test, y_test, groups = _grouped_data(17, 40)
    rare = np.zeros(len(y_test))
    rare[:3] = 1.0  # three test positives
    y_test = np.column_stack([y_test[:, 0], rare])
    y_train = np.column_stack([y_train[:, 0], (np.arange(len(y_train)) % 4 == 0).astype(float)])

    result = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "rare"], n_boot=20)
    assert [entry["name"] for entry in result["labels"]] == ["a"]
    (skip,) = result["skipped_labels"]
    assert skip["name"] == "rare"
    assert skip["n_test_pos"] == 3
    assert skip["n_test_neg"] == len(y_test) - 3
    assert skip["n_train_pos"] == int(y_train[:, 1].sum())
    assert "test split has 3 positives" in skip["reason"]
    assert "train split" not in skip["reason"]
    assert result["macro_auroc"] == result["labels"][0]["auroc"]

    lowered = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "rare"], n_boot=20, min_count=3)
    assert [entry["name"] for entry in lowered["labels"]] == ["a", "rare"]
    assert lowered["skipped_labels"] == []


def test_cv_choice_uses_only_train_split():
    x_train, y_train, train_groups = _grouped_data(18, 90)
    x_test, y_test, groups = _grouped_data(19, 40)
    grid = (0.01, 1.0, 100.0)
    result = probe_macro_auroc(x_train, y_train, x_test, y_test, groups, ["a", "b"], n_boot=20, C="cv",
                               train_groups=train_groups, c_grid=grid, cv_folds=3)
    assert result["C"] == "cv"
    for entry in result["labels"]:
        assert entry["C"] in grid
        assert entry["cv"]["C"] == entry["C"]
        assert entry["cv"]["n_folds_scored"] == 3
        assert entry["cv"]["fallback"] is None

    order = np.random.default_rng(0).permutation(len(y_test))
    shuffled = probe_macro_auroc(x_train, y_train, x_test[::-1], y_test[order], groups, ["a", "b"], n_boot=20,
                                 C="cv", train_groups=train_groups, c_grid=grid, cv_folds=3)
    for entry, other in zip(result["labels"], shuffled["labels"]):
        assert other["cv"] == entry["cv"]


def test_cv_folds_keep_patients_together():
    # Each patient has two identical rows and a random label, so only a
    # fold that splits a patient lets a weakly regularised fit score well.
    rng = np.random.default_rng(0)
    per_patient = rng.normal(size=(60, 100))
    x = np.repeat(per_patient, 2, axis=0)
    y = np.repeat((rng.random(60) < 0.5).astype(float), 2)
    patients = np.repeat(np.arange(60), 2)
    grid = (0.1, 1000.0)
    grouped = select_c(x, y, patients, grid)
    leaked = select_c(x, y, np.arange(len(y)), grid)
    assert max(grouped["mean_auroc"]) < 0.85
    assert min(leaked["mean_auroc"]) > 0.95


def test_cv_near_ties_prefer_smaller_c():
    x_train, y_train, train_groups = _grouped_data(21, 60)
    grid = (0.01, 1.0, 100.0)
    exact = select_c(x_train, y_train[:, 0], train_groups, grid, tie_tolerance=0.0)
    assert exact["C"] == grid[int(np.argmax(exact["mean_auroc"]))]
    loose = select_c(x_train, y_train[:, 0], train_groups, grid, tie_tolerance=1.0)
    assert loose["C"] == 0.01
    assert loose["mean_auroc"] == exact["mean_auroc"]
    with pytest.raises(ConfigError, match="tie tolerance"):
        select_c(x_train, y_train[:, 0], train_groups, grid, tie_tolerance=-0.1)


def test_cv_falls_back_without_scorable_fold():
    x = np.random.default_rng(1).normal(size=(12, 3))
    y = np.array([1, 0] * 6, dtype=float)
    record = select_c(x, y, np.zeros(12), (0.1, 10.0))
    assert record["C"] == 1.0
    assert "1 patient" in record["fallback"]


def test_probe_option_errors():
    x, y = _data(6, 40)
    with pytest.raises(ConfigError, match="train_groups"):
        probe_macro_auroc(x, y, x, y, np.arange(40), ["a", "b", "never"], C="cv")
    with pytest.raises(ConfigError, match="C must be"):
        probe_macro_auroc(x, y, x, y, np.arange(40), ["a", "b", "never"], C="auto")
    with pytest.raises(ConfigError, match="min_count"):
        probe_macro_auroc(x, y, x, y, np.arange(40), ["a", "b", "never"], min_count=0)
    with pytest.raises(ConfigError, match="bootstrap"):
        probe_macro_auroc(x, y, x, y, np.arange(40), ["a", "b", "never"], n_boot=0)


def test_probe_input_errors():
    x, y = _data(7, 40)
    bad = y.copy()
    bad[3, 0] = 2.0
    with pytest.raises(InputError, match="other than 1, 0, -1 and NaN"):
        probe_macro_auroc(x, bad, x, y, np.arange(40), ["a", "b", "never"])
    with pytest.raises(InputError, match="shape"):
        probe_macro_auroc(x, y[:, :2], x, y, np.arange(40), ["a", "b", "never"])
    with pytest.raises(InputError, match="patient ids"):
        probe_macro_auroc(x, y, x, y, np.arange(39), ["a", "b", "never"])
    with pytest.raises(InputError, match="same D"):
        probe_macro_auroc(x, y, x[:, :4], y, np.arange(40), ["a", "b", "never"])


def test_weighted_auroc_unit_weights_and_empty_class():
    from linkrisk.probe.linear import weighted_auroc

    rng = np.random.default_rng(8)
    y = (rng.random(50) < 0.4).astype(float)
    score = np.round(rng.normal(size=50), 1)
    assert weighted_auroc(y, score, np.ones((1, 50)))[0] == pytest.approx(roc_auc_score(y, score))
    assert np.isnan(weighted_auroc(np.zeros(5), np.arange(5.0), np.ones((2, 5)))).all()


def test_resample_counts_move_whole_patients():
    groups = np.array(["p2", "p1", "p2", "p3", "p1", "p2"])
    counts = patient_resample_counts(groups, 400, seed=4)
    assert counts.shape == (400, 6)
    assert (counts[:, 0] == counts[:, 2]).all()
    assert (counts[:, 1] == counts[:, 4]).all()
    # Three patients drawn per resample, so the per-patient counts sum to three.
    per_patient = counts[:, [1, 0, 3]]
    assert (per_patient.sum(axis=1) == 3).all()
    assert per_patient.mean() == pytest.approx(1.0, abs=0.1)


def test_probe_split_is_patient_disjoint():
    patients = np.repeat([f"p{i}" for i in range(30)], 2)
    train, test = probe_split(patients, 0.2, seed=1)
    assert len(train) + len(test) == 60
    assert set(patients[train]).isdisjoint(patients[test])
    assert len(set(patients[test])) == 6
    again_train, again_test = probe_split(patients, 0.2, seed=1)
    assert (again_test == test).all()


def test_probe_split_keeps_one_patient_per_side():
    train, test = probe_split(np.array(["a", "b"]), 0.01, seed=0)
    assert len(train) == 1
    assert len(test) == 1
    with pytest.raises(ConfigError, match="between 0 and 1"):
        probe_split(np.array(["a", "b"]), 1.0, seed=0)
    with pytest.raises(InputError, match="at least 2"):
        probe_split(np.array(["a", "a"]), 0.5, seed=0)


@pytest.mark.parametrize("stratify", [None, "COVID-19"])
def test_probe_split_matches_split_by_patient(covid, stratify):
    from linkrisk.data.cohort import split_by_patient

    images = covid.images
    labels = covid.label_matrix(images["report_id"])
    column = None if stratify is None else labels[:, list(covid.label_names).index(stratify)]
    train, test = probe_split(images["patient_id"].to_numpy(), 0.25, seed=5, stratify=column)
    train_cohort, test_cohort = split_by_patient(covid, 0.25, 5, stratify=stratify)
    assert set(images["patient_id"].iloc[test]) == set(test_cohort.images["patient_id"])
    assert set(images["patient_id"].iloc[train]) == set(train_cohort.images["patient_id"])


def test_probe_on_openi_report_labels(openi):
    # Open-i report labels with random 16-d embeddings: one row per report,
    # each report its own patient. Random embeddings carry no label
    # information, so every AUROC is near chance.
    labels = openi.label_matrix()
    patients = openi.reports["report_id"].to_numpy()
    x = np.random.default_rng(9).normal(size=(len(labels), 16))
    train, test = probe_split(patients, 0.3, seed=0)
    names = list(openi.label_names)
    result = probe_macro_auroc(x[train], labels[train], x[test], labels[test], patients[test], names, n_boot=200)

    assert np.isfinite(result["macro_auroc"])
    assert np.isfinite(result["ci95"]).all()
    assert 0.4 < result["macro_auroc"] < 0.6
    assert result["ci95"][0] <= result["macro_auroc"] <= result["ci95"][1]
    assert result["bootstrap_resamples_used"] == 200
    seen = [entry["name"] for entry in result["labels"]] + [entry["name"] for entry in result["skipped_labels"]]
    assert sorted(seen) == sorted(names)
    for entry in result["labels"]:
        assert np.isfinite(entry["ci95"]).all(), entry
        assert min(entry["n_train_pos"], entry["n_train_neg"], entry["n_test_pos"], entry["n_test_neg"]) >= 5
        assert entry["n_test_pos"] + entry["n_test_neg"] + entry["n_test_excluded"] == len(test)
    for entry in result["skipped_labels"]:
        assert min(entry["n_train_pos"], entry["n_train_neg"], entry["n_test_pos"], entry["n_test_neg"]) < 5


def test_probe_on_openi_images_skips_honestly(openi):
    # The 40 Open-i images have few positives per label, so most labels are skipped.
    labels = openi.label_matrix(openi.images["report_id"])
    patients = openi.images["patient_id"].to_numpy()
    x = np.random.default_rng(10).normal(size=(len(labels), 8))
    train, test = probe_split(patients, 0.5, seed=0)
    names = list(openi.label_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN macro when no label qualifies
        result = probe_macro_auroc(x[train], labels[train], x[test], labels[test], patients[test], names,
                                   n_boot=100, min_count=2)
    assert len(result["labels"]) + len(result["skipped_labels"]) == len(names)
    assert len(result["skipped_labels"]) >= 10
    for entry in result["skipped_labels"]:
        counts = {split: (entry[f"n_{split}_pos"], entry[f"n_{split}_neg"]) for split in ("train", "test")}
        short = [split for split, pair in counts.items() if min(pair) < 2]
        assert short, entry
        for split in short:
            assert f"{split} split has {counts[split][0]} positives" in entry["reason"]


def test_intervals_over_several_chunks_match_brute_force():
    from linkrisk.probe import auroc_intervals

    rng = np.random.default_rng(20)
    groups = np.repeat(np.arange(25), 2)
    y = (rng.random((50, 2)) < 0.5).astype(float)
    scores = y + rng.normal(size=(50, 2))
    got = auroc_intervals(y, scores, groups, n_boot=600, seed=2)  # more resamples than one chunk
    label_ci, macro_ci, used = brute_force_bootstrap(y, scores, groups, 600, 2)
    assert got["resamples_used"] == used
    assert got["macro_ci"] == pytest.approx(macro_ci, abs=1e-12)
    assert got["label_ci"] == pytest.approx(label_ci, abs=1e-12)
