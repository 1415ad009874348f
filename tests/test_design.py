"""Directions, levels, study means and merged texts against brute-force enumeration; Monte Carlo against the closed form."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from brute_force import enumerate_pool_recall
from linkrisk.audit.design import build_design
from linkrisk.audit.montecarlo import monte_carlo_recall, sample_pools
from linkrisk.audit.recall import expected_recall_at_k
from linkrisk.audit.run import run_audit
from linkrisk.errors import ConfigError, InputError

LINKRISK = [sys.executable, "-m", "linkrisk.cli"]


@pytest.fixture(scope="module")
def real_pairing(covid):
    """The real pairing of a handful of COVID studies, several with two images sharing one report."""
    images = covid.images
    shared = images["report_id"].value_counts()
    multi = list(shared[shared > 1].index[:3])
    single = [r for r in images["report_id"].unique() if r not in multi][:5]
    chosen = images[images["report_id"].isin(multi + single)].reset_index(drop=True)
    report_ids = list(dict.fromkeys(chosen["report_id"]))
    report_row = chosen["report_id"].map({r: i for i, r in enumerate(report_ids)}).to_numpy()
    patients = chosen["patient_id"].astype(str).to_numpy()
    assert len(report_ids) == 8
    assert len(chosen) > 8  # two or more images share at least one report
    return report_row, patients, len(report_ids)


def _integer_embeddings(seed: int, n_images: int, n_reports: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(-2, 3, size=(n_images, 3)).astype(np.float32)
    report = rng.integers(-2, 3, size=(n_reports, 3)).astype(np.float32)
    image[image.sum(1) == 0, 0] = 1.0  # no zero rows
    report[1] = report[4]  # identical report texts
    return image, report


def _brute_force_units(scores: np.ndarray, unit_of_candidate: np.ndarray) -> np.ndarray:
    """Unit score = best member score, computed by explicit loops."""
    n_units = unit_of_candidate.max() + 1
    out = np.full((len(scores), n_units), -np.inf)
    for q in range(len(scores)):
        for c, u in enumerate(unit_of_candidate):
            out[q, u] = max(out[q, u], scores[q, c])
    return out


def _expected(unit_scores: np.ndarray, true_unit: np.ndarray, pool: int, k: int) -> float:
    return float(np.mean([enumerate_pool_recall(list(row), int(t), pool, k) for row, t in zip(unit_scores, true_unit)]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("view", ["i2r-study", "i2r-patient", "r2i-study", "r2i-patient", "i2r-mean", "i2r-merge"])
def test_views_match_enumeration(real_pairing, seed, view):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(seed, len(report_row), n_reports)
    scores64 = lambda q, c: q.astype(np.float64) @ c.astype(np.float64).T  # noqa: E731
    report_patient = {int(r): p for r, p in zip(report_row, patients)}

    if view == "i2r-study":
        design = build_design(image, report, report_row, patients)
        units, true = scores64(image, report), report_row
    elif view == "i2r-patient":
        design = build_design(image, report, report_row, patients, level="patient")
        keys = list(dict.fromkeys(report_patient[r] for r in range(n_reports)))
        unit = np.array([keys.index(report_patient[r]) for r in range(n_reports)])
        units, true = _brute_force_units(scores64(image, report), unit), unit[report_row]
    elif view == "r2i-study":
        design = build_design(image, report, report_row, patients, direction="report_to_image")
        studies = np.unique(report_row)
        unit = np.searchsorted(studies, report_row)
        units, true = _brute_force_units(scores64(report[studies], image), unit), np.arange(len(studies))
    elif view == "r2i-patient":
        design = build_design(image, report, report_row, patients, direction="report_to_image", level="patient")
        studies = np.unique(report_row)
        keys = list(dict.fromkeys(patients))
        unit = np.array([keys.index(p) for p in patients])
        units = _brute_force_units(scores64(report[studies], image), unit)
        true = np.array([keys.index(report_patient[int(s)]) for s in studies])
    elif view == "i2r-mean":
        design = build_design(image, report, report_row, patients, image_level="study_mean")
        studies = np.unique(report_row)
        means = np.stack([image[report_row == s].astype(np.float64).sum(0) for s in studies])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        units, true = scores64(means.astype(np.float32), report), studies
    else:
        design = build_design(image, report, report_row, patients, merge_identical=True)
        assert design.facts["n_merged_candidates"] == 1
        keys = [tuple(r) for r in report]
        distinct = list(dict.fromkeys(keys))
        unit = np.array([distinct.index(k) for k in keys])
        units, true = _brute_force_units(scores64(image, report), unit), unit[report_row]

    assert design.n_units == units.shape[1]
    result = run_audit(design, pools=[2, 3, 5, "full"], ks=[1, 2], n_boot=20)
    for entry in result["recall"]:
        pool = units.shape[1] if entry["pool"] == "full" else entry["pool"]
        assert entry["random"] == pytest.approx(_expected(units, true, pool, entry["k"]), abs=1e-12), entry


def test_design_reports_what_it_did(real_pairing):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(0, len(report_row), n_reports)
    result = run_audit(build_design(image, report, report_row, patients, direction="report_to_image"),
                       pools=["full"], ks=[1], n_boot=20)
    assert result["direction"] == "report_to_image"
    assert result["candidate_unit"] == "study (best-scoring image)"
    assert result["n_queries"] == n_reports
    assert result["n_candidate_rows"] == len(report_row)


def test_design_rejects_contradictions(real_pairing):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(0, len(report_row), n_reports)
    with pytest.raises(ConfigError, match="merging identical report texts applies"):
        build_design(image, report, report_row, patients, direction="report_to_image", merge_identical=True)
    with pytest.raises(ConfigError, match="valid values: image_to_report, report_to_image"):
        build_design(image, report, report_row, patients, direction="sideways")
    labels = np.zeros((n_reports, 3))
    with pytest.raises(ConfigError, match="one label vector per candidate unit"):
        run_audit(build_design(image, report, report_row, patients, level="patient", report_labels=labels),
                  negatives="label_matched")
    moved = patients.copy()
    moved[np.flatnonzero(report_row == report_row[0])[-1]] = "someone else"
    if (report_row == report_row[0]).sum() > 1:
        with pytest.raises(InputError, match="true report of images from several patients"):
            build_design(image, report, report_row, moved)
    labels[4, 0] = 1.0  # row 4 has the same embedding as row 1
    with pytest.raises(InputError, match="report rows 1 and 4 have identical embeddings but different labels"):
        build_design(image, report, report_row, patients, report_labels=labels, merge_identical=True)


def test_sample_pools_draw_distinct_uniform_indices():
    rng = np.random.default_rng(0)
    for population, size in [(50, 3), (50, 30), (7, 7), (1000, 20), (100, 90)]:  # 100, 90: random keys
        pools = sample_pools(rng, population, size, 4000)
        assert pools.shape == (4000, size)
        assert all(len(set(row)) == size for row in pools[:500])
        frequency = np.bincount(pools.ravel(), minlength=population) / pools.size
        assert np.abs(frequency - 1 / population).max() < 5 * np.sqrt(1 / population / pools.size) + 1e-9


@pytest.mark.parametrize("cohort, heads", [("covid_test", "original"), ("openi", "original")])
def test_monte_carlo_matches_closed_form(demo_run, cohort, heads):
    out, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == cohort and r["heads"] == heads
               and r["negatives"] == "random" and r.get("view") != "extra")
    folder = out / run["embeddings"]
    from linkrisk.audit.embeddings import load_embeddings
    from linkrisk.audit.ranks import rank_counts

    image, report, pairs = load_embeddings(folder)
    true = pairs["report_row"].to_numpy()
    above, equal = rank_counts(image, report, true)
    pools = [n for n in (5, 10, 100, 1000) if n < len(report)]
    n_pools = 2000
    hits = monte_carlo_recall(image, report, true, pools, [1, 5], n_pools, seed=3)
    for p, pool in enumerate(pools):
        for j, k in enumerate((1, 5)):
            exact = expected_recall_at_k(above, equal, len(report), pool, k)
            standard_error = np.sqrt((exact * (1 - exact)).sum() / n_pools) / len(exact)
            assert abs(hits[p, j].mean() - exact.mean()) <= 4 * standard_error + 1e-12, (pool, k)


def test_cli_audit_views_and_monte_carlo(demo_run, tmp_path):
    out, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == "covid_test" and r["heads"] == "original")
    folder = out / run["embeddings"]
    json_path = tmp_path / "audit.json"
    result = subprocess.run([*LINKRISK, "audit", str(folder), "--direction", "report-to-image", "--level", "patient",
                             "--pools", "10,full", "--ks", "1", "--monte-carlo", "300", "--n-boot", "50",
                             "--json", str(json_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    audit = json.loads(json_path.read_text())
    assert (audit["direction"], audit["level"], audit["candidate_unit"]) == (
        "report_to_image", "patient", "patient (best-scoring image)")
    assert [e["pool"] for e in audit["monte_carlo"]] == [10, "full"]
    full = audit["monte_carlo"][1]
    assert full["value"] == pytest.approx(full["closed_form"], abs=0.05)
    assert "Monte Carlo N=   10" in result.stdout

    matched = subprocess.run([*LINKRISK, "audit", str(folder), "--negatives", "label-matched", "--fallback",
                              "nearest-label", "--pools", "10,30", "--n-boot", "50", "--json", str(json_path)],
                             capture_output=True, text=True, timeout=300)
    assert matched.returncode == 0, matched.stderr
    audit = json.loads(json_path.read_text())
    assert audit["fallback"] == "nearest_label"
    assert all(e["effective_pool"]["min"] == e["pool"] for e in audit["recall"] if e["pool"] != "full")


@pytest.mark.parametrize("args, message", [
    (["--level", "clinic"], "valid values: study, patient"),
    (["--ties", "first"], "valid values: random, optimistic, pessimistic"),
    (["--fallback", "nearest-label"], "applies to label-matched negatives only"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "abacus"], "invalid --device 'abacus'"),
    (["--merge-identical", "--level", "patient"], "merging identical report texts applies"),
    (["--negatives", "label-matched", "--monte-carlo", "10"], "use them with random negatives"),
])
def test_cli_audit_rejects_bad_options(demo_run, args, message):
    out, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == "covid_test" and r["heads"] == "original")
    result = subprocess.run([*LINKRISK, "audit", str(out / run["embeddings"]), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split())


def test_merge_lets_unlabelled_rows_join_labelled_twins(real_pairing):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(0, len(report_row), n_reports)
    labels = np.zeros((n_reports, 3))
    labels[1] = np.nan  # row 1 has no labels; row 4 is its identical twin with labels
    design = build_design(image, report, report_row, patients, report_labels=labels, merge_identical=True)
    result = run_audit(design, pools=["full"], ks=[1], n_boot=20, negatives="label_matched")
    assert result["n_candidates_without_labels"] == 0
    assert result["n_candidates"] == n_reports - 1


@pytest.mark.parametrize("kwargs, message", [
    ({"ks": [0]}, "invalid K 0"),
    ({"ks": [-1]}, "invalid K -1"),
    ({"pools": ["FULL"]}, "invalid pool 'FULL'"),
])
def test_run_audit_rejects_bad_pools_and_ks(real_pairing, kwargs, message):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(0, len(report_row), n_reports)
    with pytest.raises(ConfigError, match=message):
        run_audit(build_design(image, report, report_row, patients), **kwargs)


def test_build_design_rejects_bad_rows(real_pairing):
    report_row, patients, n_reports = real_pairing
    image, report = _integer_embeddings(0, len(report_row), n_reports)
    bad = report_row.copy()
    bad[0] = -1
    with pytest.raises(InputError, match=r"report rows must lie in \[0, 8\)"):
        build_design(image, report, bad, patients, direction="report_to_image")
    with pytest.raises(InputError, match="8 reports but 3 label rows"):
        build_design(image, report, report_row, patients, report_labels=np.zeros((3, 2)))
    with pytest.raises(InputError, match="query embedding rows contain NaN"):
        monte_carlo_recall(np.full((2, 3), np.nan, np.float32), report, np.array([0, 1]), [2], [1], 5)


def test_cli_error_text_is_printed_as_written(tmp_path):
    folder = tmp_path / "x[/]y"  # "[/]" closes a markup tag in rich
    folder.mkdir(parents=True)
    result = subprocess.run([*LINKRISK, "audit", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "x[/]y" in result.stderr
