"""Assignment attack against brute force over all one-to-one matchings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from linkrisk.audit.assignment import assignment_attack


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_best_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        report = _unit(rng.normal(size=(6, 4)))
        image = _unit(report + 0.9 * rng.normal(size=(6, 4)))
        # one batch of all six: the attack's fraction must equal the best permutation's
        result = assignment_attack(image, report, np.arange(6), batch_sizes=[6], n_batches=1, n_boot=10, seed=trial)
        scores = image @ report.T
        best = max(itertools.permutations(range(6)), key=lambda p: sum(scores[i, p[i]] for i in range(6)))
        assert result[0]["value"] == pytest.approx(np.mean(np.array(best) == np.arange(6)))


def test_perfect_signal_and_no_signal():
    rng = np.random.default_rng(1)
    report = _unit(rng.normal(size=(200, 16)))
    perfect = assignment_attack(report, report, np.arange(200), batch_sizes=[10, 100], n_batches=20, n_boot=50)
    assert [entry["value"] for entry in perfect] == [1.0, 1.0]
    noise = _unit(rng.normal(size=(200, 16)))
    chance = assignment_attack(noise, report, np.arange(200), batch_sizes=[10], n_batches=400, n_boot=50)[0]
    assert chance["value"] == pytest.approx(0.1, abs=0.02)
    assert chance["ci95"][0] < 0.1 < chance["ci95"][1]


def test_assignment_beats_argmax_with_hub_reports():
    # A tenth of the reports lean towards a direction every image shares ("hubs"):
    # linking image by image sends many images to the hubs, one-to-one cannot.
    rng = np.random.default_rng(2)
    base = _unit(rng.normal(size=(300, 32)))
    hub_direction = _unit(rng.normal(size=(1, 32)))[0]
    is_hub = (np.arange(300) < 30)[:, None]
    report = _unit(base + 1.5 * is_hub * hub_direction)
    image = _unit(base + 0.8 * _unit(rng.normal(size=(300, 32))) + 0.6 * hub_direction)
    entry = assignment_attack(image, report, np.arange(300), batch_sizes=[100], n_batches=30, n_boot=50)[0]
    assert entry["value"] > entry["argmax_value"] + 0.02


def test_shared_reports_and_oversized_batches(caplog):
    rng = np.random.default_rng(3)
    report = _unit(rng.normal(size=(8, 4)))
    report_row = np.repeat(np.arange(8), 2)  # two images per report
    image = _unit(report[report_row] + 0.01 * rng.normal(size=(16, 4)))
    result = assignment_attack(image, report, report_row, batch_sizes=[8, 16], n_batches=5, n_boot=10)
    assert [entry["batch_size"] for entry in result] == [8]
    assert result[0]["value"] == 1.0
    assert "batch size 16 exceeds the 8 reports" in caplog.text
