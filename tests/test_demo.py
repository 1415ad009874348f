"""The whole demo on the real shared data: outputs, schema, and figures recomputed independently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brute_force import tie_aware_hit


def test_outputs_written(demo_run):
    out, _ = demo_run
    assert (out / "results.json").is_file()
    assert (out / "report.html").is_file()
    for cohort in ("covid_test", "covid_train", "openi"):
        for heads in ("original", "dp"):
            folder = out / "embeddings" / cohort / heads
            assert {p.name for p in folder.iterdir()} >= {"image.npy", "report.npy", "pairs.parquet"}
    assert (out / "models" / "original" / "heads.safetensors").is_file()
    assert (out / "models" / "dp" / "heads.json").is_file()


def test_results_schema(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == "1.0"
    assert len(results["runs"]) == 18
    kinds = {(r["cohort"], r["heads"], r["negatives"], r["direction"], r["level"], r["image_level"])
             for r in results["runs"]}
    assert len(kinds) == 18
    extra = {(r["direction"], r["level"], r["image_level"]) for r in results["runs"] if r.get("view") == "extra"}
    assert extra == {("report_to_image", "study", "image"), ("image_to_report", "patient", "image"),
                     ("image_to_report", "study", "study_mean")}
    for run in results["runs"]:
        assert run["direction"] in ("image_to_report", "report_to_image")
        assert run["negatives"] in ("random", "label_matched")
        assert run["heads"] in ("original", "dp")
        assert run["n_queries"] > 0
        assert run["n_candidates"] > 1
        for entry in run["recall"]:
            assert set(entry) >= {"pool", "k", "value", "ci95", "chance", "lift"}
            assert entry["pool"] == "full" or isinstance(entry["pool"], int)
            assert entry["ci95"][0] <= entry["value"] + 1e-12 <= entry["ci95"][1] + 2e-12 or entry["value"] == 0
            assert entry["lift"] == pytest.approx(entry["value"] / entry["chance"])
    mitigation = results["mitigation"]
    assert set(mitigation) >= {"epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "loss"}
    assert mitigation["epsilon_spent"]["prv"] <= mitigation["epsilon"] == 0.34
    assert mitigation["delta"] == 6e-6
    assert {(p["cohort"], p["heads"]) for p in results["probe"]} == {
        ("covid", "original"), ("covid", "dp"), ("openi", "original"), ("openi", "dp")}
    for probe in results["probe"]:
        assert set(probe) >= {"cohort", "heads", "macro_auroc", "ci95", "labels"}


def test_openi_candidates_are_whole_archive(demo_run):
    _, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == "openi" and r["heads"] == "original")
    assert run["n_queries"] == 40
    assert run["n_candidates"] == 3927
    assert {e["pool"] for e in run["recall"]} == {10, 100, 1000, "full"}


def test_embeddings_reproduce_full_pool_recall(demo_run):
    """Recall@K in the full pool recomputed by argsort from the saved files, random ties by enumeration."""
    out, results = demo_run
    for run in results["runs"]:
        if run["negatives"] != "random" or run.get("view") == "extra":
            continue
        folder = out / run["embeddings"]
        image = np.load(folder / "image.npy")
        report = np.load(folder / "report.npy")
        pairs = pd.read_parquet(folder / "pairs.parquet")
        assert image.dtype == np.float32
        assert report.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(report, axis=1), 1.0, atol=1e-5)
        scores = image @ report.T
        rows = pairs["report_row"].to_numpy()
        for entry in run["recall"]:
            if entry["pool"] != "full":
                continue
            k = entry["k"]
            hit = []
            for q, true in enumerate(rows):
                # identical report rows tie; other scores compared exactly
                same = (report == report[true]).all(axis=1)
                hit.append(tie_aware_hit(scores[q][~same], scores[q, true], int(same.sum()) - 1, k))
            assert np.mean(hit) == pytest.approx(entry["value"], abs=1e-9), (run["cohort"], run["heads"], k)


def test_training_patients_memorised_and_dp_reduces_it(demo_run):
    _, results = demo_run
    full_r1 = {(r["cohort"], r["heads"]): next(e for e in r["recall"] if e["pool"] == "full" and e["k"] == 1)
               for r in results["runs"]}
    original, private = full_r1[("covid_train", "original")], full_r1[("covid_train", "dp")]
    assert original["ci95"][0] > 10 * original["chance"]
    assert private["value"] < original["value"] / 5


def test_outputs_hold_no_report_text(demo_run, covid, openi):
    out, _ = demo_run
    published = (out / "results.json").read_text() + (out / "report.html").read_text()
    texts = pd.concat([covid.reports["text"], openi.reports["text"]])
    # every distinct sentence-length fragment of a report must be absent
    fragments = {t.strip()[:40] for t in texts if len(t.strip()) >= 40}
    leaked = [f for f in fragments if f in published]
    assert not leaked


def test_report_embeds_plots_and_no_external_assets(demo_run):
    out, _ = demo_run
    html = (out / "report.html").read_text()
    # Recall against N, negatives, assignment attack and rank histogram per audited cohort, the other views,
    # the probes, the ε frontier per sweep target and the refit attacker; tests/test_report_browser.py checks
    # that each one decodes and renders.
    assert html.count("data:image/png;base64,") == 18
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assert "Recall@1" in html
    assert "ε" in html


def test_saved_heads_reload_and_reproduce_embeddings(demo_run, covid):
    from linkrisk.models.heads import load_heads

    out, results = demo_run
    heads, metadata = load_heads(out / "models" / "original")
    assert metadata["image_encoder"]["name"] == "randconv"
    assert metadata["text_encoder"]["name"] == "wordllama"
    assert metadata["history"]["best_step"] >= 0
    folder = out / "embeddings" / "covid_test" / "original"
    saved = np.load(folder / "image.npy")
    assert saved.shape[1] == metadata["embed_dim"]


def test_text_encoder_loads_from_local_folder(tmp_path):
    import shutil

    import wordllama

    from linkrisk.errors import InputError
    from linkrisk.models.text_encoders import WordLlamaTextEncoder

    package = Path(wordllama.__file__).parent
    shutil.copytree(package / "weights", tmp_path / "weights")
    shutil.copytree(package / "tokenizers", tmp_path / "tokenizers")
    local = WordLlamaTextEncoder(tmp_path).encode(["pleural effusion", "no acute disease"])
    default = WordLlamaTextEncoder().encode(["pleural effusion", "no acute disease"])
    np.testing.assert_array_equal(local, default)
    with pytest.raises(InputError, match="not found under"):
        WordLlamaTextEncoder(tmp_path / "empty")


def test_text_weights_folder_is_really_used(tmp_path):
    import shutil

    import wordllama
    from safetensors.numpy import load_file, save_file

    from linkrisk.models.text_encoders import WordLlamaTextEncoder

    package = Path(wordllama.__file__).parent
    shutil.copytree(package / "tokenizers", tmp_path / "tokenizers")
    (tmp_path / "weights").mkdir()
    tensors = load_file(str(package / "weights" / "l2_supercat_256.safetensors"))
    tensors["embedding.weight"] = tensors["embedding.weight"][::-1].copy()  # permuted rows
    save_file(tensors, str(tmp_path / "weights" / "l2_supercat_256.safetensors"))
    permuted = WordLlamaTextEncoder(tmp_path)
    default = WordLlamaTextEncoder()
    assert permuted.config()["weights_sha256"] != default.config()["weights_sha256"]
    assert not np.allclose(permuted.encode(["pleural effusion"]), default.encode(["pleural effusion"]))


def test_label_matched_runs_reproduce_from_saved_files(demo_run):
    """Full-pool Recall@1 within label groups, recomputed from image.npy, report.npy and reports.parquet."""
    out, results = demo_run
    for run in results["runs"]:
        if run["negatives"] != "label_matched":
            continue
        folder = out / run["embeddings"]
        image, report = np.load(folder / "image.npy"), np.load(folder / "report.npy")
        pairs = pd.read_parquet(folder / "pairs.parquet")
        labels = pd.read_parquet(folder / "reports.parquet").drop(columns=["report_id"]).to_numpy(dtype=float)
        assert len(labels) == len(report)
        vectors = np.where(labels == 1.0, 1, 0)  # label policy "zeros"
        labelled = ~np.isnan(labels).all(axis=1)
        hits = []
        for q, true in enumerate(pairs["report_row"]):
            if not labelled[true]:
                continue
            group = labelled & (vectors == vectors[true]).all(axis=1)
            scores = report[group] @ image[q]
            true_score = report[true] @ image[q]
            same = (report[group] == report[true]).all(axis=1)
            hits.append(tie_aware_hit(scores[~same], true_score, int(same.sum()) - 1, 1))
        full = next(e for e in run["recall"] if e["pool"] == "full" and e["k"] == 1)
        assert run["n_queries"] == len(hits)
        assert np.mean(hits) == pytest.approx(full["value"], abs=1e-6), (run["cohort"], run["heads"])
    openi = next(r for r in results["runs"] if r["cohort"] == "openi" and r["negatives"] == "label_matched")
    assert openi["n_candidates"] == 3337
    assert openi["n_queries"] + openi["n_queries_without_labels"] == 40


def test_assignment_attack_in_results(demo_run):
    _, results = demo_run
    for run in results["runs"]:
        if run["negatives"] != "random" or run.get("view") == "extra":
            continue
        sizes = [entry["batch_size"] for entry in run["assignment"]]
        reports_with_images = {"covid_test": 64, "covid_train": 226, "openi": 40}[run["cohort"]]
        assert sizes == [n for n in (10, 100, 1000) if n <= reports_with_images]
        for entry in run["assignment"]:
            assert 0.0 <= entry["value"] <= 1.0
            assert entry["chance"] == 1.0 / entry["batch_size"]
    train = next(r for r in results["runs"] if r["cohort"] == "covid_train" and r["heads"] == "original"
                 and r["negatives"] == "random")
    assert train["assignment"][0]["ci95"][0] > 0.5  # memorised pairs are re-linked in bulk


def test_risk_table_written_per_run(demo_run):
    out, results = demo_run
    for run in results["runs"]:
        if run["negatives"] != "random" or run.get("view") == "extra":
            continue
        risk = pd.read_parquet(out / run["embeddings"] / "risk.parquet")
        assert len(risk) == run["n_queries"]
        assert list(risk.columns) == ["risk_rank", "image_id", "patient_id", "full_pool_rank", "p_top1_pool", "pool",
                                      "margin"]
        assert risk["p_top1_pool"].is_monotonic_decreasing
        full = next(e for e in run["recall"] if e["pool"] == "full" and e["k"] == 1)
        if run["n_candidates"] <= 100:
            assert risk["p_top1_pool"].mean() == pytest.approx(full["value"])
        expected_rank = 1 + run["full_pool"]["mean_normalised_rank"] * (run["n_candidates"] - 1)
        assert risk["full_pool_rank"].mean() == pytest.approx(expected_rank)


def test_sweep_frontier_and_refit_in_outputs(demo_run):
    out, results = demo_run
    sweep = results["sweep"]
    assert [p["epsilon"] for p in sweep["points"]] == [0.1, 0.34, 1.0, 3.0, 10.0, "inf"]
    for point in sweep["points"][:-1]:
        assert point["dp"]["epsilon_spent"]["prv"] <= point["epsilon"]
        assert point["dp"]["epsilon_spent"]["rdp"] <= point["epsilon"]
        assert point["dp"]["formal_guarantee"] is True
    relations = {row["cohort"]: row["relation"] for row in sweep["original"]}
    assert relations == {"covid_test": "held-out patients", "covid_train": "training patients", "openi": "transfer"}
    for point in sweep["points"]:
        for row in point["targets"]:
            for entry in row["recall_at_1"]:
                assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    training = {row["cohort"]: row["probe"] for row in sweep["original"]}
    assert "skipped" in training["covid_train"]
    # COVID findings and Open-i's CheXpert labels share few names, and 40 Open-i images leave none usable.
    assert "skipped" in training["openi"] or training["openi"]["skipped_labels"]
    assert "macro_auroc" in training["covid_test"]

    refit = results["refit"][0]
    assert refit["target"] == "covid_test"
    assert {row["method"] for row in refit["table"]} == {"infonce", "ridge", "procrustes"}
    assert {row["k"] for row in refit["table"]} == {50, 200, "all"}

    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Mitigation: DP-trained heads across ε" in html
    assert "Refit attacker" in html
    assert "held-out patients" in html
    assert html.count("data:image/png;base64,") >= 7
    assert (out / "models" / "sweep" / "eps-0.34" / "heads.safetensors").is_file()


def test_split_audit_in_results(demo_run, covid):
    _, results = demo_run
    [entry] = results["split_audit"]
    assert entry["cohort"] == "covid"
    assert [split["split"] for split in entry["splits"]] == ["patient", "source"]
    for split in entry["splits"]:
        assert split["n_train_images"] + split["n_test_images"] == covid.n_images
        assert split["n_train_patients"] + split["n_test_patients"] == covid.n_patients
        audit = split["audit"]
        assert audit["n_queries"] == split["n_test_images"]
        full = next(e for e in audit["recall"] if e["pool"] == "full" and e["k"] == 1)
        assert full["lift"] == pytest.approx(full["value"] / full["chance"])
        assert len(full["lift_ci95"]) == 2
        assert 0 < audit["permutation_test"]["mean_normalised_rank"]["p_value"] <= 1
    source = entry["splits"][1]
    assert source["n_shared_sources"] == 0


def test_every_audit_block_has_rank_statistics(demo_run):
    _, results = demo_run
    for run in results["runs"]:
        for block in (run, *(run[key] for key in ("attribute_matched", "attribute_oracle", "file_metadata_oracle")
                             if key in run)):
            rank, auc = block["mean_normalised_rank"], block["linkage_auc"]
            assert rank["chance"] == auc["chance"] == 0.5
            assert auc["value"] == pytest.approx(1 - rank["value"])
            assert auc["ci95"] == pytest.approx([1 - rank["ci95"][1], 1 - rank["ci95"][0]])
        if run["negatives"] == "random" and "view" not in run:
            assert run["full_pool"]["mean_normalised_rank"] == pytest.approx(run["mean_normalised_rank"]["value"])


def test_main_audits_carry_power_and_oracles(demo_run):
    _, results = demo_run
    mains = [r for r in results["runs"] if r["negatives"] == "random" and "view" not in r]
    assert len(mains) == 6
    for run in mains:
        lifts = {(e["pool"], e["lift"]) for e in run["power"]}
        assert {(10, 2.0), (10, 5.0), ("full", 2.0), ("full", 5.0)} <= lifts
        for entry in run["power"]:
            assert 0 <= entry["power_at_patients"] <= entry["power_at_queries"] <= 1
            assert entry["n_queries"] == run["n_queries"]
        assert run["file_metadata_oracle"]["attributes"] == ["file_format", "pil_mode", "size_band", "aspect_band"]
        assert run["file_metadata_comparison"]
    covid = next(r for r in mains if r["cohort"] == "covid_test" and r["heads"] == "original")
    assert covid["attribute_oracle"]["attributes"] == ["view", "sex", "age_band", "labels"]
    assert covid["attribute_matched"]["attributes"] == ["view", "sex", "age_band", "labels"]
    openi = next(r for r in mains if r["cohort"] == "openi" and r["heads"] == "original")
    assert openi["attribute_oracle"]["attributes_missing"] == ["sex", "age_band"]
    # Open-i reports without images have no view, so the verdict leaves the oracle out there.
    assert openi["attribute_oracle"]["missing_share"]["view"] > 0.9
    assert "attacker" not in (openi["verdict"] or "")


def test_demo_folders_audit_with_match(demo_run, tmp_path):
    from typer.testing import CliRunner

    from linkrisk.cli import app

    out, _ = demo_run
    folder = out / "embeddings" / "covid_test" / "original"
    images = pd.read_parquet(folder / "images.parquet")
    assert {"view", "sex", "age_band", "site", "source", "file_bytes", "size_band"} <= set(images.columns)
    path = tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["audit", str(folder), "--match", "view,sex,size_band", "--pools", "10,full",
                                      "--ks", "1", "--n-boot", "50", "--json", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    audit = json.loads(path.read_text())
    matched = audit["attribute_matched"]
    assert matched["attributes"] == ["view", "sex", "size_band"]
    assert matched["n_queries"] + matched["n_queries_with_missing"] == audit["n_queries"]
    assert matched["n_queries_with_missing"] > 0
    for entry in matched["recall"]:
        assert entry["effective_pool"]["max"] <= (10 if entry["pool"] == 10 else matched["n_candidates"])
    assert [e["pool"] for e in audit["oracle_comparison"]] == [10, "full"]


def test_report_shows_evidence_and_splits(demo_run):
    out, _ = demo_run
    html = (out / "report.html").read_text()
    assert '<section id="evidence">' in html
    assert '<section id="splits">' in html
    assert "source-disjoint" in html
