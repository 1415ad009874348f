"""Verdict lines, the oracle's attribute codes, and the audit fields behind them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from linkrisk.audit.attributes import cohort_attribute_codes
from linkrisk.audit.design import build_design
from linkrisk.audit.run import run_audit
from linkrisk.audit.stats import permutation_test
from linkrisk.audit.verdict import verdict_line
from linkrisk.errors import ConfigError


def _run(rank_p: float, recall_p: float, lift_upper: float | None, oracle: float | None) -> dict:
    run = {"recall": [{"pool": 100, "k": 1, "value": 0.2}],
           "permutation_test": {"mean_normalised_rank": {"p_value": rank_p},
                                "recall": [{"pool": 100, "k": 1, "p_value": recall_p}]}}
    if lift_upper is not None:
        run["upper_bounds"] = [{"pool": 100, "k": 1, "upper": lift_upper / 100, "lift_upper": lift_upper,
                                "level": 0.95}]
    if oracle is not None:
        run["oracle_comparison"] = [{"pool": 100, "k": 1, "model": 0.2, "oracle": oracle, "chance": 0.01}]
        run["attribute_oracle"] = {"attributes": ["view", "labels"]}
    return run


def test_verdict_above_chance_with_bound_and_oracle():
    line = verdict_line(_run(0.001, 0.002, 12.5, 0.05))
    assert line.startswith("linkage above chance (permutation p = 0.001 for the mean normalised rank, 0.002 for "
                           "Recall@1 at N = 100)")
    assert "at most 12.5x chance (Recall@1 at most 12.5%) at N = 100 with 95% confidence" in line
    assert "an attacker using only view, labels reaches 25% of the model's Recall@1 there" in line
    # (0.05 - 0.01) / (0.2 - 0.01) of the linkage above chance.
    assert line.endswith("21% of the linkage above chance is explained by attributes")


def test_verdict_no_linkage_and_oracle_ahead():
    line = verdict_line(_run(0.4, 0.6, 3.0, 0.3))
    assert line.startswith("no linkage shown above chance (permutation p = 0.400")
    # Without linkage shown there is no linkage above chance to explain.
    assert line.endswith("links at least as well as the model there")


def test_verdict_leaves_out_mostly_missing_oracle():
    run = _run(0.001, 0.002, 12.5, 0.05)
    run["attribute_oracle"]["missing_share"] = {"view": 0.99, "labels": 0.0}
    assert "attacker" not in verdict_line(run)


def test_verdict_full_pool_without_test():
    run = {"recall": [{"pool": "full", "k": 1}],
           "upper_bounds": [{"pool": "full", "k": 1, "upper": 0.1, "lift_upper": 4.0, "level": 0.9}]}
    assert verdict_line(run) == "at most 4.0x chance (Recall@1 at most 10.0%) at the full pool with 90% confidence"
    assert verdict_line({"recall": []}) is None


def test_attribute_codes_view_agreement():
    images = pd.DataFrame({"view": ["PA", "PA", "AP", "PA", None]})
    reports = pd.DataFrame({"report_id": ["r0", "r1", "r2", "r3"]})
    labels = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, np.nan], [np.nan, np.nan]])
    report_row = np.array([0, 0, 1, 1, 2])
    query, unit, names = cohort_attribute_codes(images, reports, labels, report_row)
    assert names == ["view", "labels"]
    # r0's images agree (PA); r1's disagree (AP, PA); r2's one image has no view; r3 has no image.
    assert unit[0, 0] == query[0, 0]
    assert (unit[1:, 0] == -1).all()
    assert query[4, 0] == -1
    assert unit[0, 1] == unit[1, 1] != unit[2, 1]
    assert unit[3, 1] == -1
    assert (query[:, 1] == unit[report_row, 1]).all()


def test_run_audit_permutation_fields():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(60, 8))
    report = image + rng.normal(scale=2.0, size=(60, 8))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    report /= np.linalg.norm(report, axis=1, keepdims=True)
    patients = np.repeat(np.arange(30), 2).astype(str)
    design = build_design(image, report, np.arange(60), patients)
    result = run_audit(design, pools=[10, "full"], ks=[1], n_boot=100, permutations=99)
    direct = permutation_test(design.queries, design.candidates, design.true_unit, design.query_patients,
                              pools=[10, "full"], ks=[1], n_permutations=99, seed=0,
                              candidate_unit=design.candidate_unit).to_dict()
    assert result["permutation_test"] == direct
    assert [b["pool"] for b in result["upper_bounds"]] == [10, "full"]
    assert all(b["upper"] >= b["value"] for b in result["upper_bounds"])
    with pytest.raises(ConfigError, match="permutations must be 0"):
        run_audit(design, pools=[10], ks=[1], permutations=-1)
    with pytest.raises(ConfigError, match="confidence level"):
        run_audit(design, pools=[10], ks=[1], upper_level=1.0)


def test_demo_runs_carry_verdicts(demo_run):
    _, results = demo_run
    main = [run for run in results["runs"] if run["negatives"] == "random" and run.get("view") != "extra"]
    assert len(main) == 6
    for run in main:
        assert run["verdict"], (run["cohort"], run["heads"])
        assert run["permutation_test"]["n_permutations"] == 999
        assert run["upper_bounds"]
        expected = ["view", "labels"] if run["cohort"] == "openi" else ["view", "sex", "age_band", "labels"]
        assert run["attribute_oracle"]["attributes"] == expected
        assert run["oracle_comparison"]
    train = next(run for run in main if run["cohort"] == "covid_train" and run["heads"] == "original")
    assert train["permutation_test"]["mean_normalised_rank"]["p_value"] <= 0.01
    assert train["verdict"].startswith("linkage above chance")
