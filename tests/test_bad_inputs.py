"""Bad records in real layouts: counted skips or one-line errors that name the record, never a traceback."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from linkrisk.data import load_covid, load_openi
from linkrisk.errors import InputError
from linkrisk.models.features import embed_images
from linkrisk.models.image_encoders import create_image_encoder

LINKRISK = [sys.executable, "-m", "linkrisk.cli"]


@pytest.fixture(scope="module")
def bad_covid(data_dir, tmp_path_factory) -> Path:
    """A copy of 80 usable COVID rows plus one row per bad case, with a truncated and a zero-byte image."""
    source = data_dir / "covid-chestxray"
    root = tmp_path_factory.mktemp("bad") / "covid-chestxray"
    (root / "images").mkdir(parents=True)
    table = pd.read_csv(source / "metadata.csv", dtype=str, keep_default_na=False)
    usable = table[(table["modality"] == "X-ray") & (table["clinical_notes"].str.strip() != "")
                   & table["filename"].map(lambda f: (source / "images" / f).is_file())]
    usable = usable[~usable["filename"].duplicated()].head(80)
    for name in usable["filename"]:
        os.symlink(source / "images" / name, root / "images" / name)

    template = usable.iloc[0]
    png = next(f for f in usable["filename"] if f.endswith(".png"))
    data = (source / "images" / png).read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "images" / "empty.jpg").write_bytes(b"")
    extra = []
    for filename, note in [("absent.jpg", "x"), ("truncated.png", None), ("empty.jpg", None),
                           (usable["filename"].iloc[1], None), ("noreport.png", "")]:
        row = template.copy()
        row["filename"] = filename
        row["patientid"] = "9001"
        if note is not None:
            row["clinical_notes"] = note
        extra.append(row)
    (root / "images" / "noreport.png").write_bytes(data)
    pd.concat([usable, pd.DataFrame(extra)]).to_csv(root / "metadata.csv", index=False)
    os.symlink(data_dir / "openi", root.parent / "openi")
    return root


def test_covid_counts_each_bad_row(bad_covid, caplog):
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        cohort = load_covid(bad_covid)
    assert cohort.skipped["image file not in images/"] == 1
    assert cohort.skipped["empty clinical note"] == 1
    assert cohort.skipped["image file listed twice"] == 1
    assert "csv rows 85" in caplog.text  # the duplicate is the 84th data row, line 85 of the file
    assert cohort.n_images == 82


def test_unreadable_images_skipped_by_name(bad_covid, tmp_path, caplog):
    cohort = load_covid(bad_covid)
    with caplog.at_level(logging.WARNING, logger="linkrisk"):
        features, kept = embed_images(cohort, create_image_encoder("randconv"), tmp_path, progress=False)
    assert kept.skipped["unreadable image file"] == 2
    assert set(cohort.images["image_id"]) - set(kept.images["image_id"]) == {"truncated.png", "empty.jpg"}
    assert "truncated.png" in caplog.text
    assert "empty.jpg" in caplog.text
    assert features.shape == (80, create_image_encoder("randconv").feature_dim)
    assert np.isfinite(features).all()


def test_demo_cli_on_bad_rows_has_no_traceback(bad_covid, tmp_path):
    result = subprocess.run([*LINKRISK, "demo", "--data", str(bad_covid.parent), "--out", str(tmp_path / "out"),
                             "--n-boot", "50", "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "truncated.png" in result.stderr
    assert (tmp_path / "out" / "results.json").is_file()


def test_cli_missing_data_folder_is_one_line(tmp_path):
    result = subprocess.run([*LINKRISK, "demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.search(r"error: data folder .*nowhere not found", result.stderr)


def test_cli_audit_missing_embeddings_is_one_line(tmp_path):
    result = subprocess.run([*LINKRISK, "audit", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "image.npy: not found" in result.stderr


def test_cli_audit_matches_demo(demo_run):
    out, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == "covid_train" and r["heads"] == "original")
    json_path = out / "cli-audit.json"
    result = subprocess.run([*LINKRISK, "audit", str(out / run["embeddings"]), "--n-boot", "500",
                             "--json", str(json_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import json

    again = json.loads(json_path.read_text())
    assert again["recall"] == run["recall"]


def _openi_copy(data_dir: Path, root: Path, blank_uid: str) -> Path:
    """Copy Open-i with the findings and impression of one report emptied."""
    root.mkdir()
    shutil.copytree(data_dir / "openi" / "NLMCXR_png", root / "NLMCXR_png")
    with tarfile.open(data_dir / "openi" / "NLMCXR_reports.tgz") as src, \
            tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and f"<uId id=\"{blank_uid}\"/>".encode() in data:
                data = re.sub(rb'(<AbstractText Label="(FINDINGS|IMPRESSION)">)[^<]*', rb"\1", data)
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return root


def test_openi_empty_report_skips_its_image(data_dir, tmp_path, caplog):
    png = sorted((data_dir / "openi" / "NLMCXR_png").glob("*.png"))[0]
    uid = png.name.split("_")[0]
    root = _openi_copy(data_dir, tmp_path / "openi", uid)
    with caplog.at_level(logging.WARNING, logger="linkrisk"):
        cohort = load_openi(root)
    assert cohort.n_images == 39
    assert cohort.skipped["image's report has no text"] == 1
    assert cohort.skipped["report has no text in the chosen sections"] == 29
    assert png.stem in caplog.text  # the image id, logged once with the count


def test_openi_corrupt_archive_is_clear(tmp_path):
    (tmp_path / "NLMCXR_png").mkdir()
    (tmp_path / "NLMCXR_reports.tgz").write_bytes(b"not a tar file")
    with pytest.raises(InputError, match="NLMCXR_reports.tgz: the report archive is damaged or truncated"):
        load_openi(tmp_path)


def test_covid_missing_columns_named(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,filename\n1,a.png\n")
    with pytest.raises(InputError, match=r"missing columns \['view', 'modality', 'finding', 'clinical_notes'\]"):
        load_covid(tmp_path)


@pytest.fixture
def embeddings_folder(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 8)).astype(np.float32)
    report = rng.normal(size=(20, 8)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    report /= np.linalg.norm(report, axis=1, keepdims=True)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "report.npy", report)
    pd.DataFrame({"image_id": [f"i{i}" for i in range(12)], "report_row": np.arange(12),
                  "patient_id": [f"p{i // 2}" for i in range(12)]}).to_parquet(tmp_path / "pairs.parquet")
    return tmp_path


@pytest.mark.parametrize("case, message", [
    ("nan", r"image.npy: 1 rows contain NaN or inf \(first row 3\)"),
    ("zero", r"report.npy: 1 rows are zero vectors \(first row 5\)"),
    ("dimension", r"image.npy rows have 8 dimensions but report.npy rows have 6"),
    ("row_count", r"pairs.parquet: 11 rows but image.npy has 12"),
    ("row_range", r"report_row values are not row numbers of report.npy \(0..19\); first at row 2: 20"),
    ("negative_row", r"first at row 0: -1"),
    ("pickle", r"report.npy: not a readable numeric .npy array"),
])
def test_audit_folder_rejects_bad_embeddings(embeddings_folder, case, message):
    from linkrisk.audit.embeddings import audit_folder

    folder = embeddings_folder
    pairs = pd.read_parquet(folder / "pairs.parquet")
    if case == "nan":
        image = np.load(folder / "image.npy")
        image[3, 0] = np.nan
        np.save(folder / "image.npy", image)
    elif case == "zero":
        report = np.load(folder / "report.npy")
        report[5] = 0
        np.save(folder / "report.npy", report)
    elif case == "dimension":
        np.save(folder / "report.npy", np.load(folder / "report.npy")[:, :6])
    elif case == "row_count":
        pairs.iloc[:11].to_parquet(folder / "pairs.parquet")
    elif case == "row_range":
        pairs.loc[2, "report_row"] = 20
        pairs.to_parquet(folder / "pairs.parquet")
    elif case == "negative_row":
        pairs.loc[0, "report_row"] = -1
        pairs.to_parquet(folder / "pairs.parquet")
    elif case == "pickle":
        np.save(folder / "report.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=message):
        audit_folder(folder, [10, "full"], [1])


def test_audit_folder_normalises_rows_with_warning(embeddings_folder, caplog):
    from linkrisk.audit.embeddings import audit_folder

    np.save(embeddings_folder / "image.npy", 3.0 * np.load(embeddings_folder / "image.npy"))
    with caplog.at_level(logging.WARNING, logger="linkrisk"):
        scaled = audit_folder(embeddings_folder, [10, "full"], [1], n_boot=20)
    assert "12 rows are not unit length" in caplog.text
    np.save(embeddings_folder / "image.npy", np.load(embeddings_folder / "image.npy") / 3.0)
    assert audit_folder(embeddings_folder, [10, "full"], [1], n_boot=20)["recall"] == scaled["recall"]


def test_cli_audit_warns_on_oversized_pool(embeddings_folder):
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder), "--pools", "10,500"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "pool sizes [500] are not smaller than the 20 candidates" in " ".join(result.stderr.split())


def test_cli_rejects_zero_bootstrap(embeddings_folder):
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder), "--n-boot", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_covid_rejects_unsafe_file_names(bad_covid, tmp_path):
    root = tmp_path / "covid-chestxray"
    shutil.copytree(bad_covid, root, symlinks=True)
    table = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[0, "filename"] = "../../openi/NLMCXR_png/x.png"
    table.loc[1, "filename"] = "/etc/passwd"
    table.to_csv(root / "metadata.csv", index=False)
    cohort = load_covid(root)
    assert cohort.skipped["filename is not a plain file name"] == 2
    assert all("/" not in name for name in cohort.images["image_id"])


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"patientid,view,modality,finding,filename,clinical_notes\n", "no usable rows"),
    (b"patientid,view,modality,finding,filename,clinical_notes\n1,PA,X-ray,COVID-19,a.png,caf\xe9\n",
     "line 2 is not valid UTF-8"),
])
def test_covid_unusable_csv_is_named(tmp_path, content, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_covid(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop(columns=["Edema"]), r"chexpert_labels.csv: missing columns \['Edema'\]"),
    (lambda t: t.assign(Edema=t["Edema"].astype(object).where(t.index != 3, "x")), "first at line 5: 'x'"),
    (lambda t: pd.concat([t, t.iloc[[0]]]), "uid 1 listed more than once"),
])
def test_openi_bad_labels_name_the_file(data_dir, tmp_path, edit, message):
    root = tmp_path / "openi"
    root.mkdir()
    for name in ("NLMCXR_reports.tgz", "NLMCXR_png"):
        os.symlink(data_dir / "openi" / name, root / name)
    edit(pd.read_csv(data_dir / "openi" / "chexpert_labels.csv")).to_csv(root / "chexpert_labels.csv", index=False)
    with pytest.raises(InputError, match=message):
        load_openi(root)


def test_damaged_cache_chunk_is_recomputed(covid, tmp_path, caplog):
    from linkrisk.models.features import embed_texts
    from linkrisk.models.text_encoders import WordLlamaTextEncoder

    texts = covid.reports["text"].tolist()[:50]
    first = embed_texts(texts, WordLlamaTextEncoder(), tmp_path, "covid", progress=False)
    chunk = next((tmp_path / "features" / "wordllama").glob("*.npz"))
    chunk.write_bytes(chunk.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="linkrisk"):
        again = embed_texts(texts, WordLlamaTextEncoder(), tmp_path, "covid", progress=False)
    assert "is damaged" in caplog.text
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("args, message", [
    (["--epsilon", "1000"], r"epsilon must be in \(0, 100\]"),
    (["--epsilon", "0"], r"epsilon must be in \(0, 100\]"),
    (["--delta", "2"], r"delta must be in \(0, 1\)"),
])
def test_cli_rejects_privacy_targets_early(tmp_path, args, message):
    result = subprocess.run([*LINKRISK, "demo", "--out", str(tmp_path / "o"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert re.search(message, result.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case, message", [
    ("empty_npy", "not a readable numeric .npy array"),
    ("npz", "is an .npz archive"),
    ("no_pairs", "pairs.parquet: not found"),
])
def test_cli_audit_unreadable_files(embeddings_folder, case, message):
    if case == "empty_npy":
        (embeddings_folder / "image.npy").write_bytes(b"")
    elif case == "npz":
        np.savez(embeddings_folder / "x.npz", a=np.zeros(3))
        (embeddings_folder / "x.npz").rename(embeddings_folder / "image.npy")
    elif case == "no_pairs":
        (embeddings_folder / "pairs.parquet").unlink()
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in " ".join(result.stderr.split())


def test_cli_audit_json_to_folder_is_one_line(embeddings_folder, tmp_path):
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder), "--n-boot", "20", "--json", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "queries" in result.stdout  # the audit is printed before the write fails


def test_cli_audit_label_matched_matches_demo(demo_run):
    import json

    out, results = demo_run
    run = next(r for r in results["runs"] if r["cohort"] == "openi" and r["heads"] == "original"
               and r["negatives"] == "label_matched")
    json_path = out / "cli-matched.json"
    result = subprocess.run([*LINKRISK, "audit", str(out / run["embeddings"]), "--negatives", "label-matched",
                             "--n-boot", "500", "--json", str(json_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    again = json.loads(json_path.read_text())
    assert again["recall"] == run["recall"]
    assert "label policy zeros" in result.stdout


def test_cli_audit_label_matched_needs_labels(embeddings_folder):
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder), "--negatives", "label-matched"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "reports.parquet: not found" in " ".join(result.stderr.split())
    result = subprocess.run([*LINKRISK, "audit", str(embeddings_folder), "--negatives", "hard"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "valid values: random, label-matched" in result.stderr


def test_gzipped_csv_invalid_utf8_names_line(tmp_path):
    import gzip

    from linkrisk.data._tables import read_csv

    path = tmp_path / "table.csv.gz"
    path.write_bytes(gzip.compress(b"a,b\n1,2\n3,\xff\n"))
    with pytest.raises(InputError, match=r"table.csv.gz: line 3 is not valid UTF-8"):
        read_csv(path, ("a", "b"), compression="infer")


def test_float_image_keeps_its_values(tmp_path):
    from PIL import Image

    from linkrisk.data.images import read_image

    values = np.linspace(0.0, 0.87, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tiff")
    decoded = np.asarray(read_image(tmp_path / "float.tiff"))
    np.testing.assert_allclose(decoded, values, atol=1e-6)
    values[0, 0] = np.nan
    values[0, 1] = 200.0
    Image.fromarray(values, mode="F").save(tmp_path / "float.tiff")
    decoded = np.asarray(read_image(tmp_path / "float.tiff"))
    assert decoded[0, 0] == 0.0
    assert decoded.max() == pytest.approx(1.0)


def test_full_disk_error_names_target(tmp_path):
    import errno

    from linkrisk._io import atomic_write

    def fail(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "pairs.parquet").write_bytes(b"previous")
    with pytest.raises(OSError) as error:
        atomic_write(tmp_path / "pairs.parquet", fail)
    assert error.value.errno == errno.ENOSPC
    assert error.value.filename == str(tmp_path / "pairs.parquet")
    assert (tmp_path / "pairs.parquet").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]
