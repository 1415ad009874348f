"""Linear-probe macro AUROC: exact cases and undefined labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from linkrisk.probe import probe_macro_auroc


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
