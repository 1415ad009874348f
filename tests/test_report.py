"""The HTML report rendered from small hand-made results dicts: sections, formats, assets and rebuilds."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re

import pytest
from PIL import Image

from linkrisk.errors import InputError
from linkrisk.report import load_results, rebuild_report, render_report, write_html_report, write_report
from linkrisk.report.format import fmt_epsilon, fmt_lift, fmt_pct, fmt_pool, fmt_sci

DATA_URL = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
SECTION_IDS = ("plain-words", "summary", "recall-by-pool", "negatives", "views", "evidence", "splits", "assignment",
               "frontier", "refit", "probes", "risk", "methods")


def _entry(pool, k, value, ci, chance, **extra) -> dict:
    lift = value / chance if chance else math.nan
    return {"pool": pool, "k": k, "value": value, "ci95": list(ci), "chance": chance, "lift": lift,
            "lift_ci95": [ci[0] / chance, ci[1] / chance], "random": value, "optimistic": value,
            "pessimistic": value, **extra}


def _main_run(cohort: str, heads: str, value: float, n_candidates: int = 500, **extra) -> dict:
    """A main image-to-report audit with uniform pools: Recall@1 ``value`` at every pool, intervals ±0.05."""
    ci = (max(0.0, value - 0.05), min(1.0, value + 0.05))
    recall = [_entry(pool, 1, value, ci, 1 / pool) for pool in (10, 100)]
    recall.append(_entry(10, 5, min(1.0, 2 * value), (0.0, 1.0), 0.5))
    recall.append(_entry("full", 1, value / 2, (0.0, value), 1 / n_candidates))
    return {
        "cohort": cohort, "heads": heads, "direction": "image_to_report", "level": "study", "image_level": "image",
        "candidate_unit": "report", "merge_identical": False, "negatives": "random", "tie_rule": "random",
        "n_queries": 120, "n_candidates": n_candidates, "n_patients": 60, "queries_with_ties": 2,
        "recall": recall,
        "full_pool": {"mean_normalised_rank": 0.3, "mean_normalised_rank_ci95": [0.25, 0.35], "median_rank": 150.0,
                      "mean_rank": 151.0, "mean_reciprocal_rank": 0.1, "mean_reciprocal_rank_ci95": [0.08, 0.12]},
        **extra,
    }


def _plot_fields(value: float, n_candidates: int = 500) -> dict:
    pools = [2, 10, 100, n_candidates]
    return {
        "recall_at_1_curve": [{"pool": n, "value": max(value / (i + 1), 1 / n),
                               "ci95": [1 / n / 2, min(1.0, 2 * value)], "chance": 1 / n}
                              for i, n in enumerate(pools)],
        "assignment": [{"batch_size": 10, "n_batches": 100, "value": 0.3, "ci95": [0.25, 0.35], "chance": 0.1,
                        "lift": 3.0, "argmax_value": 0.28},
                       {"batch_size": 100, "n_batches": 100, "value": 0.1, "ci95": [0.08, 0.12], "chance": 0.01,
                        "lift": 10.0, "argmax_value": 0.09}],
        "rank_histogram": {"bin_edges": [1, 2, 3, 6, 11, 21, 51, 101, 201, 501, n_candidates + 1],
                           "counts": [30.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0][:10],
                           "n_queries": 120, "n_candidates": n_candidates, "tie_rule": "random"},
    }


def _rank_fields(mean_rank: float) -> dict:
    return {"mean_normalised_rank": {"value": mean_rank, "ci95": [mean_rank - 0.05, mean_rank + 0.05], "chance": 0.5},
            "linkage_auc": {"value": 1 - mean_rank, "ci95": [0.95 - mean_rank, 1.05 - mean_rank], "chance": 0.5},
            "n_queries_ranked": 120}


def _evidence_fields() -> dict:
    """Permutation test, bounds, power and both oracles of a main run, with Recall@1 0.4 at N = 100."""
    comparison = [{"pool": 100, "k": 1, "chance": 0.01, "model": 0.4, "oracle": 0.1, "excess": 0.3,
                   "excess_ci95": [0.2, 0.4], "ratio": 4.0, "ratio_ci95": [3.0, 5.0]}]
    return {
        **_rank_fields(0.3),
        "permutation_test": {"n_permutations": 999, "mean_normalised_rank": {"p_value": 0.0004},
                             "recall": [{"pool": 100, "k": 1, "p_value": 0.0123}]},
        "upper_bounds": [{"pool": 100, "k": 1, "level": 0.95, "upper": 0.47, "lift_upper": 47.0}],
        "power": [{"pool": 100, "k": 1, "lift": 2.0, "power_at_queries": 0.31, "power_at_patients": 0.17,
                   "required_queries": 905},
                  {"pool": 100, "k": 1, "lift": 5.0, "power_at_queries": 0.86, "power_at_patients": 0.61,
                   "required_queries": 110}],
        "attribute_oracle": {"attributes": ["view", "sex", "labels"], "missing_share": {"view": 0.0},
                             **_rank_fields(0.45)},
        "oracle_comparison": comparison,
        "file_metadata_oracle": {"attributes": ["file_format", "size_band"], "missing_share": {"file_format": 0.9}},
        "file_metadata_comparison": comparison,
        "attribute_matched": {"attributes": ["view", "sex"], **_rank_fields(0.41)},
    }


def _split_audit() -> list[dict]:
    def split(kind: str, value: float) -> dict:
        audit = {"n_candidates": 80, "recall": [_entry(10, 1, value, (value - 0.05, value + 0.05), 0.1),
                                                _entry("full", 1, value / 4, (0.0, value / 2), 1 / 80)],
                 "permutation_test": {"mean_normalised_rank": {"p_value": 0.02}}, **_rank_fields(0.44)}
        return {"split": kind, "n_train_images": 260, "n_test_images": 90, "n_train_patients": 150,
                "n_test_patients": 40, "n_train_sources": 40, "n_test_sources": 20,
                "n_shared_sources": 10 if kind == "patient" else 0, "audit": audit}

    return [{"cohort": "cohort_a", "group_column": "source", "splits": [split("patient", 0.16),
                                                                          split("source", 0.13)]}]


def _matched_run(cohort: str, heads: str, value: float) -> dict:
    recall = [_entry(10, 1, value, (value - 0.05, value + 0.05), 0.15,
                     effective_pool={"min": 1, "median": 10.0, "max": 10}, full_pool_share=0.8)]
    return {"cohort": cohort, "heads": heads, "negatives": "label_matched", "label_policy": "zeros", "fallback": None,
            "tie_rule": "random", "n_queries": 110, "n_candidates": 480, "n_queries_without_labels": 10,
            "queries_without_matched_negatives": 3, "group_size": {"min": 1, "median": 40.0, "max": 90},
            "recall": recall}


def _view_run(cohort: str, heads: str) -> dict:
    run = _main_run(cohort, heads, 0.2, n_candidates=90)
    run.update({"view": "extra", "direction": "report_to_image", "candidate_unit": "study (best-scoring image)"})
    return run


def _probe(cohort: str, heads: str, auroc: float) -> dict:
    return {
        "cohort": cohort, "heads": heads, "n_train_images": 300, "n_test_images": 100, "macro_auroc": auroc,
        "ci95": [auroc - 0.1, auroc + 0.1], "bootstrap_resamples_used": 990, "n_boot": 1000, "min_count": 5, "C": 1.0,
        "labels": [{"name": "Effusion", "auroc": auroc, "ci95": [auroc - 0.1, auroc + 0.1], "n_test_pos": 20,
                    "n_test_neg": 80}],
        "skipped_labels": [{"name": "Hernia", "reason": "test split has 1 positives", "n_train_pos": 2,
                            "n_test_pos": 1}],
    }


def _dp_record(epsilon, formal: bool = True) -> dict:
    return {"epsilon": epsilon, "epsilon_spent": {"prv": 0.3, "rdp": 0.33}, "delta": 1e-5, "accountant": "prv",
            "noise_multiplier": 2.5, "sample_rate": 0.1, "expected_batch_size": 32.0, "steps": 100,
            "steps_per_epoch": 10, "empty_batches": 0, "epochs": 10, "max_grad_norm": 1.0, "loss": "public_bank",
            "loss_description": "public-bank InfoNCE", "formal_guarantee": formal,
            "guarantee_notes": ["per-patient loss"], "privacy_unit": "patient", "n_private_patients": 200,
            "initialisation": "public features", "secure_mode": False}


def _sweep_target(cohort: str, value: float) -> dict:
    return {"cohort": cohort, "relation": "held-out patients",
            "recall_at_1": [{"pool": 100, "value": value, "ci95": [value / 2, value * 2], "chance": 0.01,
                             "lift": value / 0.01},
                            {"pool": "full", "value": value / 2, "ci95": [0.0, value], "chance": 0.002,
                             "lift": value / 0.004}],
            "mean_normalised_rank": 0.4, "mean_normalised_rank_ci95": [0.35, 0.45], "n_queries": 120,
            "n_candidates": 500, "probe": {"macro_auroc": 0.7, "ci95": [0.6, 0.8], "labels": []}}


def full_results() -> dict:
    """A results dict with every section: two heads on one cohort, views, probes, sweep, refit and mitigation."""
    runs = [
        {**_main_run("cohort_a", "original", 0.4), **_plot_fields(0.4), **_evidence_fields()},
        _matched_run("cohort_a", "original", 0.3),
        _view_run("cohort_a", "original"),
        {**_main_run("cohort_a", "dp", 0.02), **_plot_fields(0.02)},
        _matched_run("cohort_a", "dp", 0.02),
        _view_run("cohort_a", "dp"),
    ]
    return {
        "schema_version": "1.0", "linkrisk_version": "0.0-test", "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:00+00:00", "machine": {"python": "3.11", "platform": "test"},
        "config": {"pools": [10, 100, 1000, "full"], "ks": [1, 5, 10], "n_boot": 1000, "seed": 7},
        "runs": runs,
        "mitigation": _dp_record(0.34),
        "probe": [_probe("cohort_a", "original", 0.8), _probe("cohort_a", "dp", 0.75)],
        "sweep": {"original": [_sweep_target("cohort_a", 0.4)],
                  "points": [{"epsilon": 1.0, "dp": _dp_record(1.0), "targets": [_sweep_target("cohort_a", 0.05)]},
                             {"epsilon": "inf", "dp": _dp_record(math.inf, formal=False),
                              "targets": [_sweep_target("cohort_a", 0.3)]}]},
        "split_audit": _split_audit(),
        "refit": [{"target": "cohort_a", "aux": "cohort_b", "threat_model": "frozen encoders plus pairs",
                   "methods": ["ridge"], "ks": [50, "all"], "repeats": 3,
                   "table": [{"method": "ridge", "k": 50, "n_aux_pairs": 50, "pool": 100, "value": 0.1,
                              "ci95": [0.05, 0.15], "lift": 10.0, "mean_normalised_rank": 0.4, "n_repeats": 3,
                              "repeats_min": 0.08, "repeats_max": 0.12, "repeats_mean": 0.1},
                             {"method": "ridge", "k": "all", "n_aux_pairs": 400, "pool": 100, "value": 0.2,
                              "ci95": [0.15, 0.25], "lift": 20.0, "mean_normalised_rank": 0.3, "n_repeats": 1,
                              "repeats_min": 0.2, "repeats_max": 0.2, "repeats_mean": 0.2}]}],
    }


def _visible(html: str) -> str:
    """Return the HTML with embedded images replaced, so text checks do not match base64 payloads."""
    return DATA_URL.sub("data:image/png;base64,", html)


def _section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([a-z-]+)">', html)


def test_full_results_render_every_section_in_order():
    html = render_report(full_results())
    assert _section_ids(html) == list(SECTION_IDS)


def test_sections_without_data_are_left_out():
    results = {"schema_version": "1.0", "runs": [_main_run("cohort_a", "original", 0.4)]}
    html = render_report(results)
    assert _section_ids(html) == ["plain-words", "summary", "recall-by-pool", "methods"]
    for absent in ("negatives", "views", "assignment", "frontier", "refit", "probes", "risk"):
        assert f'href="#{absent}"' not in html


def test_empty_results_render_a_page():
    html = render_report({"schema_version": "1.0"})
    assert html.startswith("<!DOCTYPE html>")
    assert _section_ids(html) == []


def test_plot_count_matches_sections():
    html = render_report(full_results())
    # recall by pool, negatives, views, assignment, frontier, refit, probes, rank histogram: one figure each
    assert len(DATA_URL.findall(html)) == 8


def test_embedded_plots_decode_and_are_not_blank():
    html = render_report(full_results())
    for payload in DATA_URL.findall(html):
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        assert image.format == "PNG"
        assert image.width > 100
        assert image.height > 100
        low, high = image.convert("L").getextrema()
        assert high - low > 100


def test_report_has_no_external_assets():
    html = render_report(full_results())
    visible = _visible(html)
    assert not re.search(r"https?://", visible)
    assert "<link" not in visible
    assert "<script" not in visible
    assert "url(" not in visible
    assert "@import" not in visible
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert sources
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert all(href.startswith("#") for href in hrefs)


def test_nan_values_show_as_n_a():
    results = full_results()
    run = results["runs"][0]
    run["recall"][1]["value"] = math.nan
    run["recall"][1]["ci95"] = [math.nan, math.nan]
    run["recall"][1]["lift"] = math.nan
    run["full_pool"]["mean_normalised_rank"] = math.nan
    results["probe"][0]["macro_auroc"] = math.nan
    results["probe"][0]["labels"][0]["auroc"] = math.nan
    html = _visible(render_report(results))
    assert "n/a" in html
    assert not re.search(r"\bnan\b", html, flags=re.IGNORECASE)
    assert "inf" not in re.sub(r"<[^>]+>", "", html).replace("information", "")


def test_summary_shows_full_pool_for_small_cohorts():
    run = _main_run("small_cohort", "original", 0.3, n_candidates=64)
    run["recall"] = [e for e in run["recall"] if e["pool"] != 100]
    html = render_report({"schema_version": "1.0", "runs": [run]})
    assert "among all 64 candidate reports" in html
    assert "same pool as the left" in html


def test_plain_words_say_whether_interval_includes_chance():
    above = _main_run("cohort_a", "original", 0.4)
    near = _main_run("cohort_b", "original", 0.012)
    html = render_report({"schema_version": "1.0", "runs": [above, near]})
    plain = html[html.index('id="plain-words"'):html.index('id="summary"')]
    assert "40.0× chance" in plain
    assert "The whole interval lies above chance" in plain
    assert "The interval includes chance" in plain


def test_plain_words_compare_dp_and_probe_utility():
    html = render_report(full_results())
    plain = html[html.index('id="plain-words"'):html.index('id="summary"')]
    assert "With the DP heads it is 2.0%" in plain
    assert "DP lowered Recall@1 by 38.0 percentage points" in plain
    assert "0.800 [0.700, 0.900] with the original heads and 0.750 [0.650, 0.850] with the DP heads" in plain
    assert "a change of -0.050" in plain
    assert "ε = 0.34, δ = 1e-5 per patient" in plain
    assert "This ε is a formal guarantee" in plain


def test_methods_come_from_config_and_runs():
    html = render_report(full_results())
    methods = html[html.index('id="methods"'):]
    assert "1,000 bootstrap resamples of patients (seed 7)" in methods
    assert "zeros: uncertain (−1) and blank labels count as negative" in methods
    assert "one candidate is a study (best-scoring image)" in methods
    assert "Tie rule of every value and interval: random" in methods
    assert "public-bank InfoNCE" in methods
    assert "It is not at ε = ∞" in methods


def test_runs_group_by_model_and_raw_cohort_name():
    first = {**_main_run("site-7 2024", "original", 0.3), "model": "model-a"}
    second = {**_main_run("site-7 2024", "original", 0.1), "model": "model-b"}
    html = render_report({"schema_version": "1.0", "runs": [first, second]})
    assert "model-a: site-7 2024" in html
    assert "model-b: site-7 2024" in html
    assert html.count("<h3>model-a: site-7 2024</h3>") == 1


def test_cohort_names_are_escaped():
    run = _main_run("<script>alert(1)</script>", "original", 0.3)
    html = render_report({"schema_version": "1.0", "runs": [run]})
    assert "<script" not in html
    assert "&lt;script&gt;" in html


def test_fields_outside_the_report_are_not_shown():
    results = full_results()
    results["runs"][0]["embeddings"] = "embeddings/PATH-SENTINEL"
    results["runs"][0]["free_text"] = "REPORT-TEXT-SENTINEL"
    results["cohorts"] = {"cohort_a": {"source": "/data/SOURCE-SENTINEL"}}
    results["config"]["data_dir"] = "/data/DATA-DIR-SENTINEL"
    html = render_report(results)
    for sentinel in ("PATH-SENTINEL", "REPORT-TEXT-SENTINEL", "SOURCE-SENTINEL", "DATA-DIR-SENTINEL"):
        assert sentinel not in html


def test_rebuild_from_results_json_alone_equals_render(tmp_path):
    results = full_results()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True), encoding="utf-8")
    path = rebuild_report(run_dir)
    assert path == run_dir / "report.html"
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "results.json"]
    assert path.read_text(encoding="utf-8") == render_report(results)


def test_rebuild_writes_to_out(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(full_results()), encoding="utf-8")
    out = tmp_path / "elsewhere" / "audit.html"
    assert rebuild_report(tmp_path, out=out) == out
    assert out.is_file()
    assert not (tmp_path / "report.html").exists()


def test_rebuild_missing_results_names_file(tmp_path):
    with pytest.raises(InputError, match=r"results\.json: results file not found"):
        rebuild_report(tmp_path)


def test_rebuild_missing_folder(tmp_path):
    with pytest.raises(InputError, match="run folder not found"):
        rebuild_report(tmp_path / "absent")


def test_rebuild_invalid_json_names_file(tmp_path):
    (tmp_path / "results.json").write_text('{"schema_version": "1.0", "runs": [', encoding="utf-8")
    with pytest.raises(InputError, match=r"results\.json: invalid JSON at line 1"):
        rebuild_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("schema_version"), "schema_version None is not supported"),
    (lambda r: r.update(schema_version="2.0"), "schema_version '2.0' is not supported"),
    (lambda r: r.update(runs={"cohort": "a"}), "runs must be a list"),
    (lambda r: r["runs"][0].pop("cohort"), r"runs\[0\]\.cohort must be a string"),
    (lambda r: r["runs"][0]["recall"][0].update(pool="ten"), r"runs\[0\]\.recall\[0\]\.pool must be"),
    (lambda r: r["runs"][0]["rank_histogram"]["counts"].pop(), r"runs\[0\]\.rank_histogram\.counts must be"),
    (lambda r: r["probe"][0].pop("heads"), r"probe\[0\]\.heads must be a string"),
    (lambda r: r["sweep"].pop("points"), "sweep.points must be a list"),
    (lambda r: r["refit"][0]["table"][0].update(n_aux_pairs="many"), r"refit\[0\]\.table\[0\]\.n_aux_pairs"),
])
def test_rebuild_invalid_structure_names_field(tmp_path, mutate, message):
    results = full_results()
    mutate(results)
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    with pytest.raises(InputError, match=message) as caught:
        rebuild_report(tmp_path)
    assert str(tmp_path / "results.json") in str(caught.value)


def test_rebuild_rejects_non_object(tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="expected a JSON object"):
        load_results(tmp_path / "results.json")


def test_write_report_and_alias_return_path(tmp_path):
    results = full_results()
    assert write_report(results, tmp_path / "a.html") == tmp_path / "a.html"
    write_html_report(results, tmp_path / "b.html")
    assert (tmp_path / "a.html").read_text(encoding="utf-8") == (tmp_path / "b.html").read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_render_does_not_modify_results():
    results = full_results()
    before = copy.deepcopy(results)
    render_report(results)
    assert json.dumps(results, sort_keys=True) == json.dumps(before, sort_keys=True)


@pytest.mark.parametrize("value, expected", [
    (0.768, "76.8%"), (0.0044, "0.44%"), (0.00025, "0.025%"), (1e-12, "<0.0001%"), (0.0, "0.0%"), (1.0, "100.0%"),
    (0.00999, "1.0%"), (math.nan, "n/a"), (None, "n/a"), ("0.5", "n/a"),
])
def test_fmt_pct(value, expected):
    assert fmt_pct(value) == expected


def test_other_formats():
    assert fmt_lift(161.2) == "161×"
    assert fmt_lift(4.04) == "4.0×"
    assert fmt_lift(math.nan) == "n/a"
    assert fmt_epsilon("inf") == "∞"
    assert fmt_epsilon(math.inf) == "∞"
    assert fmt_epsilon(0.34) == "0.34"
    assert fmt_sci(6e-6) == "6e-6"
    assert fmt_pool("full", 3927) == "full (3,927)"
    assert fmt_pool(10000) == "10,000"
