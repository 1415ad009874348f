"""MIMIC-CXR loader on a small synthetic copy of the publisher's layout.

Every report text here is written for the test, and none comes from MIMIC-CXR.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from linkrisk.data.cohort import CHEXPERT_LABELS
from linkrisk.data.mimic import load_mimic_cxr
from linkrisk.data.sections import TextPolicy
from linkrisk.errors import ConfigError, InputError

METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]

# (dicom_id, subject_id, study_id, ViewPosition) as the metadata file lists them, in file order.
METADATA_ROWS = [
    ("a1", "10000001", "50000001", "PA"),
    ("a1", "10000001", "50000001", "PA"),  # repeated dicom_id: dropped
    ("a2", "10000001", "50000001", "LATERAL"),
    ("b1", "10000001", "50000002", "AP"),
    ("c1", "10000002", "50000003", "PA"),
    ("c2", "10000002", "50000003", "LL"),
    ("d1", "10000002", "50000004", ""),
    ("d2", "10000002", "50000004", "PA"),  # JPG not downloaded
    ("e1", "11000003", "50000005", "PA"),
    ("e2", "11000003", "50000005", "AP AXIAL"),
    ("f1", "11000003", "50000006", "PA"),  # study without a report file
    ("g1", "11000003", "50000007", "PA"),  # report without findings or impression
    ("i1", "10000001", "50000001", "PA"),  # not in the split file
    ("j1", "11000003", "50000005", "PA"),  # JPG filed under study 50000006
    ("k1", "11000003", "50000005", "PA"),  # the split file names study 50000006
]

# (dicom_id, study_id, subject_id, split), in the split file's column order.
SPLIT_ROWS = [
    ("a1", "50000001", "10000001", "train"),
    ("a2", "50000001", "10000001", "train"),
    ("b1", "50000002", "10000001", "train"),
    ("c1", "50000003", "10000002", "validate"),
    ("c2", "50000003", "10000002", "validate"),
    ("d1", "50000004", "10000002", "validate"),
    ("d2", "50000004", "10000002", "validate"),
    ("e1", "50000005", "11000003", "test"),
    ("e2", "50000005", "11000003", "test"),
    ("f1", "50000006", "11000003", "test"),
    ("g1", "50000007", "11000003", "test"),
    ("h1", "50000001", "10000001", "train"),  # not in metadata
    ("j1", "50000005", "11000003", "test"),
    ("k1", "50000006", "11000003", "test"),
]

# Folder (subject_id, study_id) of each JPG file written. d2 has no file, and j1 is under study 50000006.
JPG_FILES = {
    "a1": ("10000001", "50000001"), "a2": ("10000001", "50000001"), "b1": ("10000001", "50000002"),
    "c1": ("10000002", "50000003"), "c2": ("10000002", "50000003"), "d1": ("10000002", "50000004"),
    "e1": ("11000003", "50000005"), "e2": ("11000003", "50000005"), "f1": ("11000003", "50000006"),
    "g1": ("11000003", "50000007"), "i1": ("10000001", "50000001"), "j1": ("11000003", "50000006"),
    "k1": ("11000003", "50000005"),
}

CLEAR = (b"FINAL REPORT\n EXAMINATION: Chest radiograph.\n\n"
         b" FINDINGS: Lungs are clear.\n\n IMPRESSION: No acute process.\n")
REPORTS = {
    ("10000001", "50000001"): CLEAR,
    ("10000001", "50000002"): b"FINDINGS:\n\nIMPRESSION: Stable cardiomegaly.\n",
    ("10000002", "50000003"): CLEAR,  # same text as study 50000001
    ("10000002", "50000004"): b"FINDINGS: Heart size normal \xff.\n\nIMPRESSION: No change.\n",
    ("11000003", "50000005"): b"FINDINGS: Small left effusion.\n\nIMPRESSION: Effusion.\n",
    ("11000003", "50000007"): b"INDICATION: Cough.\n",
}
ZIP_TEXT_50000005 = b"FINDINGS: Small left pleural effusion.\n\nIMPRESSION: Left effusion.\n"

LABEL_HEADER = ["subject_id", "study_id", *sorted(CHEXPERT_LABELS)]
# Label values by study. Labels not named are blank, and study 50000004 has no row.
LABELS = {
    ("10000001", "50000001"): {"No Finding": "1.0"},
    ("10000001", "50000002"): {"Cardiomegaly": "-1.0", "Edema": "0.0"},
    ("10000002", "50000003"): {"No Finding": "1.0"},
    ("11000003", "50000005"): {"Pleural Effusion": "1.0", "Pneumothorax": "0.0"},
    ("11000003", "50000006"): {"No Finding": "1.0"},
    ("11000003", "50000007"): {"No Finding": "1.0"},
}


def _write_gzip_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    table = pd.DataFrame(rows, columns=header)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        table.to_csv(handle, index=False)


def _metadata_rows() -> list[list[str]]:
    rows = []
    for dicom_id, subject_id, study_id, position in METADATA_ROWS:
        rows.append([dicom_id, subject_id, study_id, "CHEST (PA AND LAT)", position, "3056", "2544",
                     "21800101", "120000.000", "Chest 2V", "postero-anterior", "Erect"])
    return rows


def _label_rows(labels: dict) -> list[list[str]]:
    return [[subject_id, study_id, *(values.get(name, "") for name in LABEL_HEADER[2:])]
            for (subject_id, study_id), values in labels.items()]


def _report_member(subject_id: str, study_id: str) -> str:
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


def build_archive(root: Path, reports: str = "folder") -> Path:
    """Write the fixture in the publisher's layout, with reports in the ``folder``, the ``zip`` or ``both``."""
    root.mkdir(parents=True)
    _write_gzip_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, _metadata_rows())
    _write_gzip_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                    [list(row) for row in SPLIT_ROWS])
    _write_gzip_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_HEADER, _label_rows(LABELS))
    negbio = {key: {name: "0.0" for name in CHEXPERT_LABELS} for key in LABELS}
    _write_gzip_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", LABEL_HEADER, _label_rows(negbio))

    for shade, (dicom_id, (subject_id, study_id)) in enumerate(JPG_FILES.items()):
        folder = root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 10 * shade).save(folder / f"{dicom_id}.jpg", "JPEG")

    if reports in ("folder", "both"):
        for (subject_id, study_id), data in REPORTS.items():
            (root / _report_member(subject_id, study_id)).write_bytes(data)
    if reports in ("zip", "both"):
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for (subject_id, study_id), data in REPORTS.items():
                if reports == "both" and study_id == "50000005":
                    data = ZIP_TEXT_50000005
                archive.writestr(_report_member(subject_id, study_id), data)
    return root


@pytest.fixture
def archive(tmp_path) -> Path:
    return build_archive(tmp_path / "mimic")


EXPECTED_SKIPPED = {
    "metadata row repeating a dicom_id (first row kept)": 1,
    "image in the split file but not in metadata": 1,
    "image in metadata but not in the split file": 1,
    "image whose subject_id or study_id differs between split file and metadata": 1,
    "image whose JPG is in a folder that disagrees with the CSV subject_id or study_id": 1,
    "image whose JPG file is missing (partial download)": 1,
    "study in metadata without a report file at its path": 1,
    "report without text in the chosen sections": 1,
    "image of a study without report text": 2,
}
EXPECTED_REPAIRS = {
    "report with invalid UTF-8 bytes (replaced by U+FFFD)": 1,
    "report without findings text (other chosen sections used)": 1,
}


def _report_text(cohort, study_id: str) -> str:
    return cohort.reports.set_index("report_id").loc[study_id, "text"]


def test_mimic_images_and_reports(archive):
    cohort = load_mimic_cxr(archive)
    assert list(cohort.images["image_id"]) == ["a1", "a2", "b1", "c1", "c2", "d1", "e1", "e2"]
    assert list(cohort.reports["report_id"]) == ["50000001", "50000002", "50000003", "50000004", "50000005"]
    row = cohort.images.iloc[0]
    assert row["study_id"] == "50000001"
    assert row["report_id"] == "50000001"
    assert row["patient_id"] == "10000001"
    assert row["image_path"] == str((archive / "files/p10/p10000001/s50000001/a1.jpg").resolve())
    assert cohort.n_patients == 3


def test_mimic_view_mapping(archive):
    cohort = load_mimic_cxr(archive)
    views = dict(zip(cohort.images["image_id"], cohort.images["view"]))
    assert views == {"a1": "PA", "a2": "Lateral", "b1": "AP", "c1": "PA", "c2": "Lateral", "d1": "unknown",
                     "e1": "PA", "e2": "AP AXIAL"}


def test_mimic_report_texts(archive):
    cohort = load_mimic_cxr(archive)
    assert _report_text(cohort, "50000001") == "Lungs are clear.\nNo acute process."
    assert _report_text(cohort, "50000003") == "Lungs are clear.\nNo acute process."
    assert _report_text(cohort, "50000002") == "Stable cardiomegaly."  # empty findings: impression alone
    assert _report_text(cohort, "50000004") == "Heart size normal \ufffd.\nNo change."
    assert _report_text(cohort, "50000005") == "Small left effusion.\nEffusion."


def test_mimic_skipped_and_repairs(archive):
    cohort = load_mimic_cxr(archive)
    assert cohort.skipped == EXPECTED_SKIPPED
    assert cohort.repairs == EXPECTED_REPAIRS


def test_mimic_official_split(archive):
    cohort = load_mimic_cxr(archive)
    assert cohort.split == {"a1": "train", "a2": "train", "b1": "train", "c1": "validate", "c2": "validate",
                            "d1": "validate", "e1": "test", "e2": "test"}


def test_mimic_chexpert_labels(archive):
    cohort = load_mimic_cxr(archive)
    labels = cohort.reports.set_index("report_id")
    assert labels.loc["50000001", "No Finding"] == 1.0
    assert labels.loc["50000002", "Cardiomegaly"] == -1.0  # uncertain
    assert labels.loc["50000002", "Edema"] == 0.0
    assert math.isnan(labels.loc["50000002", "Pneumonia"])  # blank in the file
    assert labels.loc["50000005", "Pleural Effusion"] == 1.0
    assert labels.loc[["50000004"], list(CHEXPERT_LABELS)].isna().all(axis=None)  # no row in the file


def test_mimic_negbio_labels(archive):
    cohort = load_mimic_cxr(archive, labels="negbio")
    labels = cohort.label_matrix()
    assert labels.shape == (5, 14)
    assert (labels[[0, 1, 2, 4]] == 0.0).all()
    assert pd.isna(labels[3]).all()  # study 50000004 has no row


def test_mimic_describe_counts(archive):
    summary = load_mimic_cxr(archive).describe()
    assert summary["images"] == 8
    assert summary["studies"] == 5
    assert summary["patients"] == 3
    assert summary["reports"] == 5
    assert summary["reports_with_images"] == 5
    assert summary["reports_sharing_text"] == 2
    assert summary["distinct_report_texts"] == 4
    assert summary["views"] == {"PA": 3, "Lateral": 2, "AP": 1, "unknown": 1, "AP AXIAL": 1}
    assert summary["official_split"] == {"train": 3, "validate": 3, "test": 2}
    assert summary["labels"]["Cardiomegaly"] == {"positive": 0, "negative": 0, "uncertain": 1, "blank": 4}
    assert summary["skipped"] == EXPECTED_SKIPPED
    assert summary["repairs"] == EXPECTED_REPAIRS


def test_mimic_fallback_full_keeps_report(archive):
    cohort = load_mimic_cxr(archive, text_policy=TextPolicy(fallback="full"))
    assert _report_text(cohort, "50000007") == "INDICATION: Cough."
    assert "g1" in set(cohort.images["image_id"])
    assert cohort.repairs["report without text in the chosen sections (whole report used)"] == 1
    assert "report without text in the chosen sections" not in cohort.skipped
    assert cohort.skipped["image of a study without report text"] == 1  # f1 only


def test_mimic_impression_only_policy(archive):
    cohort = load_mimic_cxr(archive, text_policy=TextPolicy(sections=("impression",)))
    assert _report_text(cohort, "50000001") == "No acute process."
    assert "report without findings text (other chosen sections used)" not in cohort.repairs


def test_mimic_reports_from_zip(tmp_path):
    folder = load_mimic_cxr(build_archive(tmp_path / "folder", reports="folder"))
    packed = load_mimic_cxr(build_archive(tmp_path / "zip", reports="zip"))
    assert not list((tmp_path / "zip" / "files").rglob("*.txt"))
    pd.testing.assert_frame_equal(packed.reports, folder.reports)
    assert list(packed.images["image_id"]) == list(folder.images["image_id"])
    assert packed.skipped == EXPECTED_SKIPPED
    assert packed.repairs == EXPECTED_REPAIRS


def test_mimic_conflicting_copies_use_zip(tmp_path):
    cohort = load_mimic_cxr(build_archive(tmp_path / "mimic", reports="both"))
    assert _report_text(cohort, "50000005") == "Small left pleural effusion.\nLeft effusion."
    assert cohort.repairs == {**EXPECTED_REPAIRS, "report with two copies of different text (zip copy used)": 1}
    assert cohort.n_reports == 5


def test_mimic_report_in_wrong_subject_folder(archive):
    (archive / "files/p11/p11000003/s50000005.txt").rename(archive / "files/p11/p11000003/s50000099.txt")
    moved = archive / "files/p10/p10000002/s50000005.txt"
    moved.write_bytes(REPORTS[("11000003", "50000005")])
    cohort = load_mimic_cxr(archive)
    assert "50000005" not in set(cohort.reports["report_id"])
    assert cohort.skipped["report file in a folder that disagrees with the CSV subject_id"] == 1
    assert cohort.skipped["report file of a study not in metadata"] == 1
    assert cohort.skipped["study in metadata without a report file at its path"] == 2
    assert cohort.skipped["image of a study without report text"] == 4  # f1, g1, e1, e2


def test_mimic_logs_each_reason_once(archive, caplog):
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        load_mimic_cxr(archive)
    messages = [record.getMessage() for record in caplog.records]
    for reason in [*EXPECTED_SKIPPED, *EXPECTED_REPAIRS]:
        assert sum(reason in message for message in messages) == 1, reason
    assert "mimic: skipped 1: image whose JPG file is missing (partial download) (d2)" in messages
    assert not any("Lungs are clear" in message or "Heart size" in message for message in messages)


def test_mimic_uncompressed_csv_accepted(archive):
    for name in ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz"):
        path = archive / name
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert load_mimic_cxr(archive).n_images == 8


def _rewrite_labels(archive: Path, study_id: str, label: str, value: str) -> None:
    labels = {key: dict(values) for key, values in LABELS.items()}
    key = next(key for key in labels if key[1] == study_id)
    labels[key][label] = value
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_HEADER, _label_rows(labels))


def test_mimic_missing_split_file(archive):
    (archive / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(InputError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: not found; "
                                         r"point the loader at the MIMIC-CXR-JPG folder"):
        load_mimic_cxr(archive)


def test_mimic_missing_label_file(archive):
    (archive / "mimic-cxr-2.0.0-negbio.csv.gz").unlink()
    with pytest.raises(InputError, match=r"mimic-cxr-2\.0\.0-negbio\.csv\.gz: not found"):
        load_mimic_cxr(archive, labels="negbio")


def test_mimic_missing_metadata_column(archive):
    columns = [c for c in METADATA_COLUMNS if c != "ViewPosition"]
    rows = [[v for c, v in zip(METADATA_COLUMNS, row) if c != "ViewPosition"] for row in _metadata_rows()]
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-metadata.csv.gz", columns, rows)
    with pytest.raises(InputError, match=r"metadata\.csv\.gz: missing columns \['ViewPosition'\]"):
        load_mimic_cxr(archive)


def test_mimic_non_numeric_label(archive):
    _rewrite_labels(archive, "50000003", "Edema", "yes")
    with pytest.raises(InputError) as info:
        load_mimic_cxr(archive)
    message = str(info.value)
    assert "mimic-cxr-2.0.0-chexpert.csv.gz" in message
    assert "column 'Edema' has 1 values outside {1.0, 0.0, -1.0, blank}" in message
    assert "first at line 4, study 50000003: 'yes'" in message


def test_mimic_label_value_two(archive):
    _rewrite_labels(archive, "50000002", "Cardiomegaly", "2.0")
    with pytest.raises(InputError, match=r"column 'Cardiomegaly' has 1 values outside .* "
                                         r"\(first at line 3, study 50000002: '2\.0'\)"):
        load_mimic_cxr(archive)


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_mimic_damaged_gzip(archive, damage):
    path = archive / "mimic-cxr-2.0.0-metadata.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"dicom_id,subject_id\n")
    with pytest.raises(InputError, match=r"metadata\.csv\.gz: cannot be decompressed .*truncated or damaged, "
                                         r"so download it again"):
        load_mimic_cxr(archive)


def test_mimic_invalid_split_value(archive):
    rows = [list(row) for row in SPLIT_ROWS]
    rows[2][3] = "valid"
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], rows)
    with pytest.raises(InputError, match=r"split\.csv\.gz: 1 rows have a split outside train, validate, test "
                                         r"\(first at line 4: 'valid'\)"):
        load_mimic_cxr(archive)


def test_mimic_non_numeric_study_id(archive):
    rows = _metadata_rows()
    rows[4][2] = "s50000003"
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, rows)
    with pytest.raises(InputError, match=r"column 'study_id' has 1 values that are not a number "
                                         r"\(first at line 6: 's50000003'\)"):
        load_mimic_cxr(archive)


def test_mimic_repeated_label_rows(archive):
    rows = _label_rows(LABELS)
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_HEADER, rows + rows[:1])
    with pytest.raises(InputError, match=r"study ids 50000001 are listed more than once \(first at line 2\)"):
        load_mimic_cxr(archive)


def test_mimic_damaged_zip(tmp_path):
    root = build_archive(tmp_path / "mimic", reports="zip")
    data = (root / "mimic-cxr-reports.zip").read_bytes()
    (root / "mimic-cxr-reports.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"mimic-cxr-reports\.zip: the reports zip is damaged or truncated"):
        load_mimic_cxr(root)


def test_mimic_no_reports(archive):
    for path in (archive / "files").rglob("*.txt"):
        path.unlink()
    with pytest.raises(InputError, match=r"no report found; expected mimic-cxr-reports\.zip or files/"):
        load_mimic_cxr(archive)


def test_mimic_missing_files_folder(tmp_path):
    root = build_archive(tmp_path / "mimic")
    (root / "files").rename(root / "elsewhere")
    with pytest.raises(InputError, match=r"files: not found"):
        load_mimic_cxr(root)


def test_mimic_invalid_label_choice(archive):
    with pytest.raises(ConfigError, match=r"invalid label file 'chexbert'; valid values: chexpert, negbio"):
        load_mimic_cxr(archive, labels="chexbert")


def test_mimic_zip_member_crc_checked(tmp_path):
    root = build_archive(tmp_path / "mimic", reports="zip")
    data = bytearray((root / "mimic-cxr-reports.zip").read_bytes())
    buffer = io.BytesIO(bytes(data))
    with zipfile.ZipFile(buffer) as archive:
        info = archive.getinfo("files/p10/p10000001/s50000001.txt")
    # Flip one byte of the stored (compressed) data so decompression or the CRC-32 check fails.
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 2] ^= 0xFF
    (root / "mimic-cxr-reports.zip").write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"mimic-cxr-reports\.zip: the reports zip is damaged or truncated"):
        load_mimic_cxr(root)


def test_mimic_study_under_two_subjects(archive):
    rows = _metadata_rows()
    rows.append(["m1", "10000002", "50000001", *rows[0][3:]])
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, rows)
    split = [list(row) for row in SPLIT_ROWS] + [["m1", "50000001", "10000002", "train"]]
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    cohort = load_mimic_cxr(archive)
    assert "m1" not in set(cohort.images["image_id"])
    assert cohort.skipped["image whose study_id is listed under another subject_id earlier in metadata"] == 1


def test_mimic_files_outside_layout(archive):
    (archive / "files/p10/notes.txt").write_text("not a report")
    (archive / "files/p10/p10000001/s50000001/extra").mkdir()
    (archive / "files/p10/p10000001/s50000001/extra/x.jpg").write_bytes(b"")
    (archive / "files/p10/index.html").write_text("<html></html>")  # left by wget, ignored
    cohort = load_mimic_cxr(archive)
    assert cohort.skipped["JPG or .txt file under files/ outside the MIMIC-CXR layout"] == 2
    assert cohort.n_images == 8


def test_mimic_oversized_report(archive):
    (archive / "files/p10/p10000002/s50000003.txt").write_bytes(b"FINDINGS: " + b"x" * (4 * 2**20))
    cohort = load_mimic_cxr(archive)
    assert "50000003" not in set(cohort.reports["report_id"])
    assert cohort.skipped["report file larger than 4 MiB"] == 1
    assert cohort.skipped["image of a study without report text"] == 4  # f1, g1, c1, c2


def test_mimic_label_row_other_subject(archive):
    labels = dict(LABELS)
    labels[("10000009", "50000003")] = labels.pop(("10000002", "50000003"))
    _write_gzip_csv(archive / "mimic-cxr-2.0.0-chexpert.csv.gz", LABEL_HEADER, _label_rows(labels))
    cohort = load_mimic_cxr(archive)
    reason = "mimic-cxr-2.0.0-chexpert.csv.gz row whose subject_id differs from metadata (labels left unknown)"
    assert cohort.skipped[reason] == 1
    assert cohort.reports.set_index("report_id").loc[["50000003"], list(CHEXPERT_LABELS)].isna().all(axis=None)


def test_mimic_no_jpgs_downloaded(archive):
    for path in (archive / "files").rglob("*.jpg"):
        path.unlink()
    with pytest.raises(InputError, match=r"no usable images \(skipped: .*'image whose JPG file is missing "
                                         r"\(partial download\)': 12"):
        load_mimic_cxr(archive)
