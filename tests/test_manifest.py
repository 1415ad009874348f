"""Generic manifest: real COVID rows round-trip, embeddings-only Parquet, messy rows and bad files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from linkrisk.data.manifest import load_manifest
from linkrisk.data.registry import load_dataset, parse_spec
from linkrisk.errors import ConfigError, InputError

LINKRISK = [sys.executable, "-m", "linkrisk.cli"]


def _manifest_from(cohort) -> pd.DataFrame:
    texts = cohort.reports.set_index("report_id")["text"]
    return pd.DataFrame({"image_id": cohort.images["image_id"], "patient_id": cohort.images["patient_id"],
                         "report_id": cohort.images["report_id"], "study_id": cohort.images["study_id"],
                         "image_path": cohort.images["image_path"], "view": cohort.images["view"],
                         "report_text": cohort.images["report_id"].map(texts)})


def test_csv_manifest_round_trips_real_cohort(covid, tmp_path):
    path = tmp_path / "covid.csv"
    _manifest_from(covid).to_csv(path, index=False)
    cohort = load_dataset(f"manifest:{path}")
    assert (cohort.n_images, cohort.n_reports, cohort.n_patients) == (covid.n_images, covid.n_reports, covid.n_patients)
    texts = cohort.reports.set_index("report_id")["text"]
    assert (texts.loc[covid.reports["report_id"]].to_numpy() == covid.reports["text"].to_numpy()).all()
    assert cohort.skipped == {}
    assert cohort.repairs == {}


def test_manifest_messy_rows_are_counted(covid, tmp_path):
    table = _manifest_from(covid).head(12).copy()
    table.loc[0, "image_path"] = str(tmp_path / "absent.png")                      # missing image file
    table.loc[1, "report_text"] = "a different text"                                # conflicting text...
    table.loc[1, "report_id"] = table.loc[2, "report_id"]                           # ...for one report id
    extra = pd.DataFrame({"image_id": [""], "patient_id": ["nobody"], "report_id": ["extra"],
                          "report_text": ["a candidate report without an image"], "image_path": [""]})
    table = pd.concat([table, extra], ignore_index=True)
    values = [1, 0, -1, None, 1, 0, 0, 1, None, 0, 1, 0, 0]
    per_report = dict(zip(table["report_id"].drop_duplicates(), values))  # one label vector per report
    table["Pneumonia"] = table["report_id"].map(per_report)
    path = tmp_path / "messy.csv"
    table.to_csv(path, index=False)
    cohort = load_manifest(path)
    assert cohort.skipped == {"image file missing": 1}
    assert cohort.repairs == {"report with different report_text across rows (first row kept)": 1}
    assert "extra" in set(cohort.reports["report_id"])
    assert cohort.n_images == 11
    prevalence = cohort.describe()["labels"]["Pneumonia"]
    assert prevalence["uncertain"] == 1
    assert prevalence["blank"] >= 1


def test_parquet_manifest_with_embeddings_audits(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    report = rng.normal(size=(n, 8))
    table = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                          "report_id": [f"r{i}" for i in range(n)],
                          "image_embedding": list(report + 0.3 * rng.normal(size=(n, 8))),
                          "report_embedding": list(report),
                          "Cardiomegaly": rng.choice([1.0, 0.0, -1.0, np.nan], size=n)})
    path = tmp_path / "embedded.parquet"
    table.to_parquet(path)
    cohort = load_manifest(path)
    assert cohort.embeddings["image"].shape == (n, 8)
    assert cohort.embeddings["report"].shape == (n, 8)

    out = tmp_path / "audit.json"
    result = subprocess.run([*LINKRISK, "audit", f"manifest:{path}", "--pools", "10,full", "--n-boot", "50",
                             "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    audit = json.loads(out.read_text())
    assert audit["n_queries"] == n
    assert audit["n_candidates"] == n
    assert audit["recall"][0]["value"] > 0.5  # the planted pairs are close
    matched = subprocess.run([*LINKRISK, "audit", f"manifest:{path}", "--negatives", "label-matched", "--n-boot", "50"],
                             capture_output=True, text=True, timeout=120)
    assert matched.returncode == 0, matched.stderr


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop(columns=["patient_id"]), r"missing columns \['patient_id'\]"),
    (lambda t: t.assign(Edema=2), r"column 'Edema' has 1\d* values outside \{1, 0, -1, blank\}"),
    (lambda t: t.assign(report_id=""), "rows have no report_id"),
])
def test_manifest_bad_tables_are_named(covid, tmp_path, change, message):
    path = tmp_path / "bad.csv"
    change(_manifest_from(covid).head(10)).to_csv(path, index=False)
    with pytest.raises(InputError, match=message):
        load_manifest(path)


def test_manifest_embedding_problems(tmp_path):
    table = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["p", "q"], "report_id": ["r", "s"],
                          "image_embedding": [[1.0, 0.0], [0.0, 1.0, 0.0]], "report_embedding": [[1.0, 0.0], [0.0, 1.0]]})
    path = tmp_path / "ragged.parquet"
    table.to_parquet(path)
    with pytest.raises(InputError, match="image_embedding rows differ in length"):
        load_manifest(path)
    with pytest.raises(InputError, match="unknown manifest format '.txt'"):
        (tmp_path / "m.txt").write_text("x")
        load_manifest(tmp_path / "m.txt")


def test_dataset_specs():
    assert parse_spec("openi:/data/openi")[0] == "openi"
    with pytest.raises(ConfigError, match="valid names: mimic-cxr, chexpert-plus, openi, covid, manifest"):
        parse_spec("mimic:/x")
    with pytest.raises(ConfigError, match="write NAME:PATH"):
        parse_spec("openi")


def test_cli_data_describe(data_dir, tmp_path):
    out = tmp_path / "summary.json"
    result = subprocess.run([*LINKRISK, "data", "describe", f"openi:{data_dir / 'openi'}", "--quiet", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert (summary["images"], summary["reports"]) == (40, 3927)
    assert summary["skipped"] == {"report has no text in the chosen sections": 28}
    assert "views: Frontal 20, Lateral 20" in result.stdout
    bad = subprocess.run([*LINKRISK, "data", "describe", "covid:/nonexistent"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr


def test_manifest_symlink_loop_is_named(covid, tmp_path):
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    table = _manifest_from(covid).head(3)
    table.loc[table.index[1], "image_path"] = "loop1.png"
    table.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(InputError, match="row 1: image_path 'loop1.png' cannot be resolved"):
        load_manifest(tmp_path / "manifest.csv")
