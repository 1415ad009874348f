"""CheXpert Plus loader on a small synthetic copy of the publisher's layout.

The fixture writes ``df_chexpert_plus_240401.csv`` with the release's
columns, ``chexbert_labels/impression_fixed.json`` as JSON Lines and tiny
JPEG images. Every report text here is made up for the tests.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from linkrisk.data.chexpert_plus import CSV_NAME, DEFAULT_LABELS, load_chexpert_plus
from linkrisk.data.cohort import CHEXPERT_LABELS
from linkrisk.data.sections import TextPolicy
from linkrisk.errors import ConfigError, InputError

COLUMNS = [
    "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
    "report", "section_narrative", "section_clinical_history", "section_history", "section_comparison",
    "section_technique", "section_procedure_comments", "section_findings", "section_impression",
    "section_end_of_impression", "section_summary", "section_accession_number", "age", "sex", "race",
    "ethnicity", "interpreter_needed", "insurance_type", "recent_bmi", "deceased", "split",
]

# Synthetic report sections.
FINDINGS_1 = "Heart size is mildly enlarged. Lungs are clear."
IMPRESSION_1 = "Mild cardiomegaly. Possible early edema."
NORMAL = "No acute cardiopulmonary process."
TEXT_A = "Right lower lobe opacity, likely pneumonia."
TEXT_B = "Lungs are clear. No pneumonia."
TEXT_C = "Left basilar atelectasis."
TEXT_D = "Resolved left basilar atelectasis."
BAD_BYTE = "<<BAD-BYTE>>"
EFFUSION = f"Small left effusion{BAD_BYTE}."

P1S1 = "patient00001/study1"
P1S2 = "patient00001/study2"
P2S1 = "patient00002/study1"
P2S2 = "patient00002/study2"
V1S1 = "patient64541/study1"
V2S1 = "patient64542/study1"
P5S1 = "patient00005/study1"


def _row(path: str, side: str, projection: str, patient: str, findings: str = "", impression: str = "",
         split: str = "train", **extra: str) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    sections = [f"FINDINGS: {findings}" if findings else "", f"IMPRESSION: {impression}" if impression else ""]
    row.update(
        path_to_image=path, path_to_dcm=path.replace(".jpg", ".dcm"), frontal_lateral=side, ap_pa=projection,
        deid_patient_id=patient, patient_report_date_order="1", report="\n".join(s for s in sections if s),
        section_findings=findings, section_impression=impression, age="60", sex="Female", split=split,
    )
    row.update(extra)
    return row


def _rows() -> list[dict[str, str]]:
    return [
        _row(f"train/{P1S1}/view1_frontal.jpg", "Frontal", "PA", "pid1", FINDINGS_1, IMPRESSION_1,
             section_history="Cough.", section_clinical_history="Fever for two days."),
        _row(f"train/{P1S1}/view2_lateral.jpg", "Lateral", "", "pid1", FINDINGS_1, IMPRESSION_1,
             section_history="Cough.", section_clinical_history="Fever for two days."),
        _row(f"train/{P1S2}/view1_frontal.jpg", "Frontal", "AP", "pid1", "", NORMAL),
        _row(f"train/{P2S1}/view1_frontal.jpg", "Frontal", "AP", "pid2", "", TEXT_A),
        _row(f"train/{P2S1}/view2_frontal.jpg", "Frontal", "AP", "pid2", "", TEXT_B),
        _row(f"train/{P2S1}/view3_lateral.jpg", "Lateral", "", "pid2", "", TEXT_B),
        _row(f"train/{P2S2}/view1_frontal.jpg", "Frontal", "PA", "pid2", "", TEXT_C),
        _row(f"train/{P2S2}/view2_lateral.jpg", "Lateral", "", "pid2", "", TEXT_D),
        _row(f"valid/{V1S1}/view1_frontal.jpg", "Frontal", "", "pid3", "", NORMAL, split="valid"),
        _row(f"valid/{V1S1}/view2_lateral.jpg", "Lateral", "", "pid3", "", NORMAL, split="valid"),
        _row(f"valid/{V2S1}/view1_frontal.jpg", "Frontal", "AP", "pid4", "", EFFUSION, split="valid"),
        _row(f"train/{P5S1}/view1_frontal.jpg", "Frontal", "PA", "pid5", "", "",
             report="Portable chest radiograph, comparison none."),
        _row(f"train/{P1S1}/view1_frontal.jpg", "Frontal", "PA", "pid1", FINDINGS_1, IMPRESSION_1),
    ]


MISSING_IMAGE = f"valid/{V1S1}/view2_lateral.jpg"


def _label_records() -> list[dict[str, object]]:
    def record(path: str, **values: float) -> dict[str, object]:
        entry: dict[str, object] = {"path_to_image": path}
        entry.update({label: None for label in CHEXPERT_LABELS})
        entry.update({label.replace("_", " "): value for label, value in values.items()})
        return entry

    return [
        record(f"train/{P1S1}/view1_frontal.jpg", Cardiomegaly=1.0, Edema=-1.0),
        record(f"train/{P1S1}/view2_lateral.jpg", Cardiomegaly=1.0, Edema=-1.0),
        record(f"train/{P1S2}/view1_frontal.jpg", No_Finding=1.0),
        record(f"train/{P2S1}/view1_frontal.jpg", Pneumonia=1.0),
        record(f"train/{P2S1}/view2_frontal.jpg", Pneumonia=0.0),
        record(f"train/{P2S1}/view3_lateral.jpg", Pneumonia=0.0),
        record(f"train/{P2S2}/view1_frontal.jpg", Atelectasis=1.0),
        record(f"train/{P2S2}/view2_lateral.jpg", Atelectasis=0.0),
        record(f"valid/{V1S1}/view1_frontal.jpg", No_Finding=1.0),
        record(f"valid/{V1S1}/view2_lateral.jpg", No_Finding=1.0),
        record(f"train/{P5S1}/view1_frontal.jpg", No_Finding=1.0),
        record("train/patient09999/study1/view1_frontal.jpg", Fracture=1.0),
    ]


def _write_csv(root: Path, rows: list[dict[str, str]]) -> None:
    text = pd.DataFrame(rows, columns=COLUMNS).to_csv(index=False)
    (root / CSV_NAME).write_bytes(text.encode("utf-8").replace(BAD_BYTE.encode(), b"\xff"))


def _write_labels(path: Path, records: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


def _write_images(root: Path, rows: list[dict[str, str]], suffix: str = ".jpg") -> None:
    for row in rows:
        if row["path_to_image"] == MISSING_IMAGE:
            continue
        target = (root / row["path_to_image"]).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(target)


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "chexpert_plus"
    root.mkdir()
    rows = _rows()
    _write_csv(root, rows)
    _write_labels(root / DEFAULT_LABELS, _label_records())
    _write_images(root, rows)
    return root


def _report(cohort, study: str) -> pd.Series:
    return cohort.reports.set_index("report_id").loc[study]


def test_counts_images_reports_patients(dataset):
    cohort = load_chexpert_plus(dataset)
    assert cohort.name == "chexpert_plus"
    assert cohort.n_images == 10
    assert cohort.n_reports == 6
    assert cohort.n_patients == 4
    assert cohort.label_names == CHEXPERT_LABELS


def test_images_keyed_to_study_and_patient(dataset):
    images = load_chexpert_plus(dataset).images.set_index("image_id")
    lateral = images.loc[f"train/{P1S1}/view2_lateral.jpg"]
    assert lateral["study_id"] == P1S1
    assert lateral["report_id"] == P1S1
    assert lateral["patient_id"] == "pid1"
    assert lateral["image_path"] == str((dataset / f"train/{P1S1}/view2_lateral.jpg").resolve())
    assert (images["study_id"] == P1S1).sum() == 2
    assert (images["study_id"] == P2S1).sum() == 3


def test_views_from_frontal_lateral_and_ap_pa(dataset):
    images = load_chexpert_plus(dataset).images.set_index("image_id")
    assert images.loc[f"train/{P1S1}/view1_frontal.jpg", "view"] == "PA"
    assert images.loc[f"train/{P1S2}/view1_frontal.jpg", "view"] == "AP"
    assert images.loc[f"train/{P1S1}/view2_lateral.jpg", "view"] == "Lateral"
    assert images.loc[f"valid/{V1S1}/view1_frontal.jpg", "view"] == "Frontal"  # blank ap_pa


def test_text_joins_findings_and_impression(dataset):
    cohort = load_chexpert_plus(dataset)
    assert _report(cohort, P1S1)["text"] == f"{FINDINGS_1}\n{IMPRESSION_1}"
    assert _report(cohort, P1S2)["text"] == NORMAL  # empty findings left out
    assert cohort.repairs["report has no findings text (kept with the other sections)"] == 5


def test_history_joins_both_history_columns(dataset):
    cohort = load_chexpert_plus(dataset, TextPolicy(("history",)))
    assert cohort.reports["report_id"].tolist() == [P1S1]
    assert _report(cohort, P1S1)["text"] == "Cough.\nFever for two days."


def test_conflicting_texts_keep_most_frequent(dataset):
    cohort = load_chexpert_plus(dataset)
    assert _report(cohort, P2S1)["text"] == TEXT_B  # B on two rows, A on one
    images = cohort.images[cohort.images["study_id"] == P2S1]
    assert len(images) == 3
    assert set(images["report_id"]) == {P2S1}


def test_conflicting_texts_tie_keeps_first_row(dataset):
    cohort = load_chexpert_plus(dataset)
    assert _report(cohort, P2S2)["text"] == TEXT_C  # C and D once each; C's row comes first
    assert cohort.repairs["study rows with different report texts (most frequent text kept)"] == 2


def test_tie_follows_file_order(tmp_path):
    rows = [row for row in _rows() if P2S2 in row["path_to_image"]][::-1]
    _write_csv(tmp_path, rows)
    _write_images(tmp_path, rows)
    cohort = load_chexpert_plus(tmp_path, labels=None)
    assert _report(cohort, P2S2)["text"] == TEXT_D


def test_labels_uncertain_blank_and_missing(dataset):
    cohort = load_chexpert_plus(dataset)
    p1s1 = _report(cohort, P1S1)
    assert p1s1["Cardiomegaly"] == 1.0
    assert p1s1["Edema"] == -1.0
    assert math.isnan(p1s1["Pneumonia"])  # blank = not mentioned
    assert _report(cohort, P1S2)["No Finding"] == 1.0
    assert _report(cohort, V2S1)[list(CHEXPERT_LABELS)].isna().all()  # study absent from the label file


def test_labels_follow_kept_text(dataset):
    cohort = load_chexpert_plus(dataset)
    assert _report(cohort, P2S1)["Pneumonia"] == 0.0  # rows carrying TEXT_B are labelled 0, TEXT_A's row 1
    assert _report(cohort, P2S2)["Atelectasis"] == 1.0
    assert cohort.repairs["study images with different labels (labels of the kept text's row used)"] == 2
    assert cohort.skipped["label row for an image not in the report CSV"] == 1


def test_labels_none_leaves_labels_unknown(dataset):
    cohort = load_chexpert_plus(dataset, labels=None)
    assert cohort.label_matrix().shape == (6, 14)
    assert np.isnan(cohort.label_matrix()).all()


def test_invalid_utf8_byte_replaced_and_counted(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="linkrisk"):
        cohort = load_chexpert_plus(dataset)
    assert _report(cohort, V2S1)["text"] == "Small left effusion\ufffd."
    assert cohort.repairs["row has bytes that are not UTF-8 (replaced with U+FFFD)"] == 1
    assert "data rows 11" in caplog.text


def test_missing_image_skipped_report_kept(dataset):
    cohort = load_chexpert_plus(dataset)
    assert MISSING_IMAGE not in set(cohort.images["image_id"])
    assert cohort.skipped["image file missing"] == 1
    assert V1S1 in set(cohort.reports["report_id"])


def test_check_images_false_keeps_every_row(dataset):
    cohort = load_chexpert_plus(dataset, check_images=False)
    assert cohort.n_images == 11
    assert MISSING_IMAGE in set(cohort.images["image_id"])
    assert "image file missing" not in cohort.skipped


def test_png_layout_with_image_dir_and_suffix(tmp_path):
    rows = _rows()
    _write_csv(tmp_path, rows)
    _write_images(tmp_path / "PNG", rows, suffix=".png")
    cohort = load_chexpert_plus(tmp_path, labels=None, image_dir="PNG", image_suffix=".png")
    assert cohort.n_images == 10
    path = cohort.images.set_index("image_id").loc[f"train/{P1S1}/view1_frontal.jpg", "image_path"]
    assert path == str((tmp_path / "PNG" / f"train/{P1S1}/view1_frontal.png").resolve())


def test_no_text_study_skipped_with_images(dataset):
    cohort = load_chexpert_plus(dataset)
    assert P5S1 not in set(cohort.reports["report_id"])
    assert P5S1 not in set(cohort.images["study_id"])
    assert cohort.skipped["report has no text in the chosen sections"] == 1
    assert cohort.skipped["image's report has no text"] == 1


def test_fallback_full_uses_report_column(dataset):
    cohort = load_chexpert_plus(dataset, TextPolicy(fallback="full"))
    assert _report(cohort, P5S1)["text"] == "Portable chest radiograph, comparison none."
    assert cohort.repairs["report text is the full report (chosen sections empty)"] == 1
    assert "report has no text in the chosen sections" not in cohort.skipped


def test_duplicate_image_row_skipped(dataset):
    cohort = load_chexpert_plus(dataset)
    assert cohort.skipped["duplicate image row"] == 1
    assert cohort.images["image_id"].is_unique


def test_official_split(dataset):
    split = load_chexpert_plus(dataset).split
    assert len(split) == 10
    assert split[f"train/{P1S1}/view1_frontal.jpg"] == "train"
    assert split[f"valid/{V1S1}/view1_frontal.jpg"] == "validate"
    assert list(split.values()).count("validate") == 2


def test_describe_counts(dataset):
    summary = load_chexpert_plus(dataset).describe()
    assert summary["images"] == 10
    assert summary["studies"] == 6
    assert summary["reports"] == 6
    assert summary["reports_with_images"] == 6
    assert summary["reports_sharing_text"] == 2  # P1S2 and V1S1 both read NORMAL
    assert summary["distinct_report_texts"] == 5
    assert summary["views"] == {"AP": 4, "Lateral": 3, "PA": 2, "Frontal": 1}
    assert summary["official_split"] == {"train": 8, "validate": 2}
    assert summary["labels"]["Edema"] == {"positive": 0, "negative": 0, "uncertain": 1, "blank": 5}
    assert summary["labels"]["No Finding"]["positive"] == 2
    assert summary["skipped"] == {
        "duplicate image row": 1,
        "report has no text in the chosen sections": 1,
        "image's report has no text": 1,
        "label row for an image not in the report CSV": 1,
        "image file missing": 1,
    }
    assert summary["repairs"] == {
        "row has bytes that are not UTF-8 (replaced with U+FFFD)": 1,
        "study rows with different report texts (most frequent text kept)": 2,
        "report has no findings text (kept with the other sections)": 5,
        "study images with different labels (labels of the kept text's row used)": 2,
    }


def test_logs_counts_once_without_report_text(dataset, caplog):
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        load_chexpert_plus(dataset)
    conflict = [r for r in caplog.records if "different report texts" in r.getMessage()]
    assert len(conflict) == 1
    assert "2 studies" in conflict[0].getMessage()
    for text in (FINDINGS_1, IMPRESSION_1, NORMAL, TEXT_A, TEXT_B, TEXT_C, TEXT_D, "Small left effusion"):
        assert text not in caplog.text


def test_study_with_two_patient_ids_unified(tmp_path):
    rows = _rows()[:2]
    rows[1]["deid_patient_id"] = "pid9"
    _write_csv(tmp_path, rows)
    _write_images(tmp_path, rows)
    cohort = load_chexpert_plus(tmp_path, labels=None)
    assert set(cohort.images["patient_id"]) == {"pid1"}
    assert cohort.repairs["study rows with different deid_patient_id (first row's id kept)"] == 1


def test_unsafe_path_skipped(tmp_path):
    rows = _rows()[:2]
    rows.append(_row("../outside/study1/view1_frontal.jpg", "Frontal", "PA", "pid7", "", NORMAL))
    rows.append(_row("view1_frontal.jpg", "Frontal", "PA", "pid8", "", NORMAL))
    _write_csv(tmp_path, rows)
    _write_images(tmp_path, rows[:2])
    cohort = load_chexpert_plus(tmp_path, labels=None)
    assert cohort.n_images == 2
    assert cohort.skipped == {"path_to_image is not a relative <patient>/<study>/<file> path": 2}


def test_scales_to_many_rows(tmp_path):
    n_studies = 40_000
    study = np.repeat(np.arange(n_studies), 2)
    view = np.tile(["view1_frontal.jpg", "view2_lateral.jpg"], n_studies)
    table = pd.DataFrame({column: "" for column in COLUMNS}, index=range(2 * n_studies))
    table["path_to_image"] = [f"train/patient{s // 3:05d}/study{s % 3 + 1}/{v}" for s, v in zip(study, view)]
    table["frontal_lateral"] = np.where(view == "view1_frontal.jpg", "Frontal", "Lateral")
    table["deid_patient_id"] = [f"pid{s // 3}" for s in study]
    table["section_impression"] = [f"Synthetic impression number {s % 5000}." for s in study]
    table["split"] = "train"
    table.to_csv(tmp_path / CSV_NAME, index=False)
    cohort = load_chexpert_plus(tmp_path, labels=None, check_images=False)
    assert cohort.n_images == 2 * n_studies
    assert cohort.n_reports == n_studies
    assert cohort.describe()["distinct_report_texts"] == 5000


# Bad input files: one InputError naming the file, the record and the fix.

def test_missing_csv_raises(tmp_path):
    with pytest.raises(InputError, match=f"{CSV_NAME}: not found"):
        load_chexpert_plus(tmp_path)


def test_missing_column_raises(dataset):
    table = pd.read_csv(dataset / CSV_NAME, dtype=str, keep_default_na=False, encoding_errors="replace")
    table.drop(columns=["section_impression"]).to_csv(dataset / CSV_NAME, index=False)
    with pytest.raises(InputError, match=r"missing columns \['section_impression'\]") as info:
        load_chexpert_plus(dataset)
    assert CSV_NAME in str(info.value)


def test_unmapped_section_raises(dataset):
    with pytest.raises(ConfigError, match="no column for report sections \\['indication'\\]"):
        load_chexpert_plus(dataset, TextPolicy(("indication",)))


@pytest.mark.parametrize("value, shown", [(2, "2"), ("yes", "'yes'"), (True, "True")])
def test_invalid_label_value_raises(dataset, value, shown):
    records = _label_records()
    records[4]["Pneumonia"] = value
    _write_labels(dataset / DEFAULT_LABELS, records)
    with pytest.raises(InputError) as info:
        load_chexpert_plus(dataset)
    message = str(info.value)
    assert "impression_fixed.json: line 5: 'Pneumonia' is " + shown in message
    assert "must be 1, 0, -1 or null" in message


def test_missing_label_file_raises(dataset):
    (dataset / DEFAULT_LABELS).unlink()
    with pytest.raises(InputError, match="label file not found.*labels=None"):
        load_chexpert_plus(dataset)


def test_invalid_json_line_raises(dataset):
    path = dataset / DEFAULT_LABELS
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-1]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="impression_fixed.json: line 3 is not valid JSON"):
        load_chexpert_plus(dataset)


def test_label_file_missing_key_raises(dataset):
    records = [{k: v for k, v in r.items() if k != "Fracture"} for r in _label_records()]
    _write_labels(dataset / DEFAULT_LABELS, records)
    with pytest.raises(InputError, match=r"records lack keys \['Fracture'\]"):
        load_chexpert_plus(dataset)


def test_unknown_split_raises(tmp_path):
    rows = _rows()
    rows[3]["split"] = "holdout"
    _write_csv(tmp_path, rows)
    with pytest.raises(InputError, match="data row 4 has split 'holdout'"):
        load_chexpert_plus(tmp_path, labels=None)


def test_no_image_found_raises(tmp_path):
    _write_csv(tmp_path, _rows())
    with pytest.raises(InputError, match="none of the 11 listed image files exists.*image_suffix='.png'"):
        load_chexpert_plus(tmp_path, labels=None)


def test_header_only_csv_raises(tmp_path):
    _write_csv(tmp_path, [])
    with pytest.raises(InputError, match="no study has text"):
        load_chexpert_plus(tmp_path, labels=None)
