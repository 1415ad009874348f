"""Builders of bad inputs: each copies or derives real files into ``tmp`` and damages one thing.

Every builder takes the real data (:class:`Real`) and a fresh folder, and
returns a :class:`~outcomes.Built` with the entry point's arguments and
the names that the expected message or count refers to. Nothing is
written into the real data folder, and report text is only read from it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from linkrisk.data.cohort import PairedCohort

from .outcomes import Built

# Number of real COVID images in the small cohorts that the builders write.
SMALL_COHORT = 24
# Dimension of the seeded embeddings written beside real ids.
EMBED_DIM = 8


@dataclasses.dataclass
class Real:
    """The real data: its folder and the two cohorts loaded from it once per session."""

    data_dir: Path
    covid: PairedCohort
    openi: PairedCohort

    @property
    def covid_dir(self) -> Path:
        return self.data_dir / "covid-chestxray"

    @property
    def openi_dir(self) -> Path:
        return self.data_dir / "openi"

    def openi_pngs(self) -> list[Path]:
        return sorted((self.openi_dir / "NLMCXR_png").glob("*.png"))

    def radiograph(self) -> np.ndarray:
        """Return the first real Open-i radiograph as an 8-bit grayscale array ``[rows, columns]``."""
        with Image.open(self.openi_pngs()[0]) as image:
            return np.asarray(image.convert("L"))

    def covid_file(self, suffix: str) -> Path:
        """Return the first real COVID image whose name ends in ``suffix``."""
        return next(Path(p) for p in self.covid.images["image_path"] if p.lower().endswith(suffix))


# Manifests of real COVID rows.

def covid_manifest(real: Real, n_images: int = SMALL_COHORT) -> pd.DataFrame:
    """Return the first ``n_images`` real COVID images as manifest rows (absolute image paths, real notes)."""
    images = real.covid.images.head(n_images)
    texts = real.covid.reports.set_index("report_id")["text"]
    return pd.DataFrame({"image_id": images["image_id"].to_numpy(), "patient_id": images["patient_id"].to_numpy(),
                         "report_id": images["report_id"].to_numpy(), "image_path": images["image_path"].to_numpy(),
                         "report_text": images["report_id"].map(texts).to_numpy()})


def write_manifest(table: pd.DataFrame, path: Path) -> Built:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return Built((f"manifest:{path}",), {"manifest": str(path), "name": path.name})


def manifest_with_image(real: Real, tmp: Path, name: str, data: bytes) -> Built:
    """A manifest of 3 real COVID images plus one image file ``name`` holding ``data``."""
    (tmp / name).write_bytes(data)
    table = covid_manifest(real, 4)
    table.loc[3, ["image_id", "image_path"]] = [name, str(tmp / name)]
    built = write_manifest(table, tmp / "cohort.csv")
    built.context["file"] = name
    return built


def truncated_png(real: Real, tmp: Path) -> Built:
    data = real.openi_pngs()[0].read_bytes()
    return manifest_with_image(real, tmp, "truncated.png", data[: len(data) // 3])


def truncated_jpeg(real: Real, tmp: Path) -> Built:
    data = real.covid_file(".jpg").read_bytes()
    return manifest_with_image(real, tmp, "truncated.jpg", data[: len(data) // 2])


def zero_byte_image(real: Real, tmp: Path) -> Built:
    return manifest_with_image(real, tmp, "empty.png", b"")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_claiming(width: int, height: int) -> bytes:
    """Return a tiny 8-bit grayscale PNG whose header claims ``width`` x ``height`` pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def bomb_png(real: Real, tmp: Path) -> Built:
    path = tmp / "bomb.png"
    path.write_bytes(png_header_claiming(50_000, 50_000))
    return Built((path,), {"file": path.name})


def bomb_png_just_over_limit(real: Real, tmp: Path) -> Built:
    path = tmp / "large.png"
    path.write_bytes(png_header_claiming(10_000, 9_000))
    return Built((path,), {"file": path.name})


def bomb_png_in_cohort(real: Real, tmp: Path) -> Built:
    return manifest_with_image(real, tmp, "bomb.png", png_header_claiming(50_000, 50_000))


# Images in other modes that must decode to the right values.

def sixteen_bit_png(real: Real, tmp: Path) -> Built:
    gray = real.radiograph().astype(np.uint16)
    # The low byte is a ramp, so the image has more gray levels than 8 bits can represent.
    values = gray * 256 + (np.arange(gray.shape[1], dtype=np.uint16) % 256)[None, :]
    path = tmp / "sixteen.png"
    Image.fromarray(values).save(path)
    return Built((path,), {"expected": values / values.max(), "stored_mode": Image.open(path).mode})


def rgba_png(real: Real, tmp: Path) -> Built:
    gray = real.radiograph()
    alpha = np.linspace(0, 255, gray.size).reshape(gray.shape).astype(np.uint8)  # alpha must not change luminance
    path = tmp / "rgba.png"
    Image.fromarray(np.dstack([gray, gray, gray, alpha]), mode="RGBA").save(path)
    return Built((path,), {"expected": gray})


def palette_png(real: Real, tmp: Path) -> Built:
    gray = real.radiograph()
    # Palette index i is gray level 255 - i, so decoding the indices instead of the colours would invert the image.
    image = Image.fromarray((255 - gray).astype(np.uint8), mode="L").convert("P")
    image.putpalette([255 - i for i in range(256) for _ in range(3)])
    path = tmp / "palette.png"
    image.save(path)
    return Built((path,), {"expected": gray})


# DICOM files built with pydicom from a real radiograph.

def dicom_dataset(stored: np.ndarray, photometric: str, signed: bool = False, with_pixels: bool = True):
    """Return a single-frame 12-bit CR dataset with ``stored`` values, ready for ``save_as``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 1 if signed else 0
    if with_pixels:
        dataset.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return dataset


def dicom_monochrome1(real: Real, tmp: Path) -> Built:
    gray = real.radiograph().astype(np.float64)
    stored = (4095 - gray * 16).astype(np.uint16)  # MONOCHROME1: high stored values are dark on display
    path = tmp / "monochrome1.dcm"
    dicom_dataset(stored, "MONOCHROME1").save_as(path, enforce_file_format=True)
    expected = 1.0 - (stored - stored.min()) / (stored.max() - stored.min())
    return Built((path,), {"expected": expected, "original": gray / 255.0})


def dicom_signed_rescaled(real: Real, tmp: Path) -> Built:
    gray = real.radiograph().astype(np.float64)
    stored = (gray * 8 - 1000).astype(np.int16)
    dataset = dicom_dataset(stored, "MONOCHROME2", signed=True)
    dataset.RescaleSlope, dataset.RescaleIntercept = 2, -1024
    path = tmp / "signed.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return Built((path,), {"expected": (gray - gray.min()) / (gray.max() - gray.min())})


def dicom_marker_only(real: Real, tmp: Path) -> Built:
    """A file with the DICOM preamble and marker, written without pydicom, holding a real PNG's bytes."""
    path = tmp / "marker-only.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + real.openi_pngs()[0].read_bytes())
    return Built((path,), {"file": path.name})


def dicom_without_pixels(real: Real, tmp: Path) -> Built:
    path = tmp / "header-only.dcm"
    dicom_dataset(real.radiograph(), "MONOCHROME2", with_pixels=False).save_as(path, enforce_file_format=True)
    return Built((path,), {"file": path.name})


def dicom_multiframe(real: Real, tmp: Path) -> Built:
    gray = real.radiograph().astype(np.uint16)
    dataset = dicom_dataset(gray, "MONOCHROME2", with_pixels=False)
    dataset.NumberOfFrames = 2
    dataset.PixelData = np.stack([gray, gray]).tobytes()
    path = tmp / "two-frames.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return Built((path,), {"file": path.name})


def dicom_truncated(real: Real, tmp: Path) -> Built:
    source = tmp / "whole.dcm"
    dicom_dataset(real.radiograph().astype(np.uint16), "MONOCHROME2").save_as(source, enforce_file_format=True)
    data = source.read_bytes()
    path = tmp / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    return Built((path,), {"file": path.name})


# COVID collection copies (metadata.csv + images/ as symlinks to the real files).

def covid_copy(real: Real, tmp: Path, n_images: int = SMALL_COHORT) -> tuple[Path, pd.DataFrame]:
    """Return a COVID folder holding ``n_images`` real usable rows and their images, and its table (not yet written)."""
    root = tmp / "covid-chestxray"
    (root / "images").mkdir(parents=True)
    table = pd.read_csv(real.covid_dir / "metadata.csv", dtype=str, keep_default_na=False)
    names = real.covid.images["image_id"].head(n_images)
    table = table[table["filename"].isin(set(names))].drop_duplicates("filename").reset_index(drop=True)
    for name in table["filename"]:
        os.symlink(real.covid_dir / "images" / name, root / "images" / name)
    return root, table


def _covid_built(root: Path, table: pd.DataFrame, **context) -> Built:
    table.to_csv(root / "metadata.csv", index=False)
    return Built((f"covid:{root}",), {"csv": str(root / "metadata.csv"), **context})


def covid_missing_image(real: Real, tmp: Path) -> Built:
    root, table = covid_copy(real, tmp)
    extra = table.iloc[[0]].assign(filename="absent.jpg")
    return _covid_built(root, pd.concat([table, extra], ignore_index=True))


def covid_duplicate_file(real: Real, tmp: Path) -> Built:
    root, table = covid_copy(real, tmp)
    return _covid_built(root, pd.concat([table, table.iloc[[1]]], ignore_index=True), file=table.loc[1, "filename"])


def covid_whitespace_note(real: Real, tmp: Path) -> Built:
    root, table = covid_copy(real, tmp)
    table.loc[2, "clinical_notes"] = "  \t\n  \u00a0 "
    return _covid_built(root, table)


def covid_non_utf8(real: Real, tmp: Path) -> Built:
    root, table = covid_copy(real, tmp)
    marker = "NON-UTF8-HERE"
    table.loc[4, "clinical_notes"] = table.loc[4, "clinical_notes"] + " " + marker
    table.to_csv(root / "metadata.csv", index=False)
    data = (root / "metadata.csv").read_bytes()
    offset = data.index(marker.encode())
    (root / "metadata.csv").write_bytes(data[:offset] + b"caf\xe9" + data[offset + len(marker):])
    line = data[:offset].count(b"\n") + 1
    return Built((f"covid:{root}",), {"csv": str(root / "metadata.csv"), "line": line})


# Open-i copies.

def openi_copy(real: Real, tmp: Path, archive: bool = True, labels: bool = True) -> Path:
    """Return an Open-i folder with symlinks to the real PNGs, and to the report archive and labels if asked."""
    root = tmp / "openi"
    (root / "NLMCXR_png").mkdir(parents=True)
    for png in real.openi_pngs():
        os.symlink(png, root / "NLMCXR_png" / png.name)
    if archive:
        os.symlink(real.openi_dir / "NLMCXR_reports.tgz", root / "NLMCXR_reports.tgz")
    if labels:
        os.symlink(real.openi_dir / "chexpert_labels.csv", root / "chexpert_labels.csv")
    return root


def openi_unlisted_image(real: Real, tmp: Path) -> Built:
    root = openi_copy(real, tmp)
    name = "CXR9999999_IM-9999-1001.png"
    os.symlink(real.openi_pngs()[0], root / "NLMCXR_png" / name)
    return Built((f"openi:{root}",), {"file": name})


def openi_kaggle_orphan_image(real: Real, tmp: Path) -> Built:
    """Kaggle layout whose projections list one image under a uid that has no report row."""
    root = tmp / "openi"
    (root / "images_normalized").mkdir(parents=True)
    os.symlink(real.openi_dir / "indiana_reports.csv", root / "indiana_reports.csv")
    reports = pd.read_csv(real.openi_dir / "indiana_reports.csv", usecols=["uid"])
    orphan_uid = str(int(reports["uid"].max()) + 1)
    projections = pd.read_csv(real.openi_dir / "indiana_projections.csv", dtype=str)
    name = f"{orphan_uid}_IM-9999-1001.dcm.png"
    projections = pd.concat([projections, pd.DataFrame({"uid": [orphan_uid], "filename": [name],
                                                        "projection": ["Frontal"]})], ignore_index=True)
    projections.to_csv(root / "indiana_projections.csv", index=False)
    for png in real.openi_pngs():
        os.symlink(png, root / "images_normalized" / (png.stem.removeprefix("CXR") + ".dcm.png"))
    os.symlink(real.openi_pngs()[0], root / "images_normalized" / name)
    return Built((f"openi:{root}",), {"uid": orphan_uid})


def _labels_copy(real: Real, tmp: Path, edit) -> Built:
    root = openi_copy(real, tmp, labels=False)
    table = pd.read_csv(real.openi_dir / "chexpert_labels.csv")
    edit(table).to_csv(root / "chexpert_labels.csv", index=False)
    return Built((f"openi:{root}",), {"csv": str(root / "chexpert_labels.csv")})


def openi_label_out_of_range(real: Real, tmp: Path) -> Built:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[6, "Edema"] = 2.0
        return table

    return _labels_copy(real, tmp, edit)


def openi_labels_missing_column(real: Real, tmp: Path) -> Built:
    return _labels_copy(real, tmp, lambda table: table.drop(columns=["Pleural Effusion"]))


def openi_non_utf8_report(real: Real, tmp: Path) -> Built:
    """Copy the report archive with one byte that is not UTF-8 inside the findings of one imaged study."""
    root = openi_copy(real, tmp, archive=False)
    uids = {png.name.split("_")[0].removeprefix("CXR") for png in real.openi_pngs()}
    edited = None
    with tarfile.open(real.openi_dir / "NLMCXR_reports.tgz") as source, \
            tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as target:
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else None
            uid = re.search(rb'<uId id="CXR(\d+)"', data) if data else None
            if edited is None and uid and uid.group(1).decode() in uids:
                data, count = re.subn(rb'(<AbstractText Label="FINDINGS">)(\w)',
                                       lambda match: match.group(1) + b"\xff" + match.group(2), data, count=1)
                if count:
                    edited = f"CXR{uid.group(1).decode()}"
                    member.size = len(data)
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    assert edited is not None, "no imaged Open-i report with findings text found"
    return Built((f"openi:{root}",), {"report_id": edited, "n_images": real.openi.n_images,
                                      "n_reports": real.openi.n_reports})


# Manifest cases.

def manifest_duplicate_image_id(real: Real, tmp: Path) -> Built:
    table = covid_manifest(real, 6)
    table.loc[4, "image_id"] = table.loc[1, "image_id"]
    built = write_manifest(table, tmp / "cohort.csv")
    built.context["image_id"] = table.loc[1, "image_id"]
    return built


def manifest_empty_report(real: Real, tmp: Path) -> Built:
    table = covid_manifest(real)
    report_id = table.loc[0, "report_id"]
    table.loc[table["report_id"] == report_id, "report_text"] = ""
    built = write_manifest(table, tmp / "cohort.csv")
    built.context.update(report_id=report_id, n_images=int((table["report_id"] == report_id).sum()))
    return built


def manifest_invisible_report(real: Real, tmp: Path) -> Built:
    table = covid_manifest(real)
    report_id = table.loc[0, "report_id"]
    table.loc[table["report_id"] == report_id, "report_text"] = "\u200b\u200b \u2060"
    built = write_manifest(table, tmp / "cohort.csv")
    built.context.update(report_id=report_id, n_images=int((table["report_id"] == report_id).sum()))
    return built


def manifest_long_report(real: Real, tmp: Path) -> Built:
    """A manifest whose first report is 50,000 words: the real notes' words repeated."""
    table = covid_manifest(real)
    words = " ".join(real.covid.reports["text"]).split()
    long_text = " ".join(words[i % len(words)] for i in range(50_000))
    report_id = table.loc[0, "report_id"]
    table.loc[table["report_id"] == report_id, "report_text"] = long_text
    built = write_manifest(table, tmp / "cohort.csv")
    built.context.update(report_id=report_id, words=50_000)
    return built


def manifest_label_out_of_range(real: Real, tmp: Path) -> Built:
    table = covid_manifest(real, 6)
    table["Pneumonia"] = ["1", "0", "yes", "", "-1", "0"]
    return write_manifest(table, tmp / "cohort.csv")


def manifest_missing_column(real: Real, tmp: Path) -> Built:
    return write_manifest(covid_manifest(real, 6).drop(columns=["report_id"]), tmp / "cohort.csv")


def manifest_one_patient(real: Real, tmp: Path) -> Built:
    counts = real.covid.images["patient_id"].value_counts()
    patient = counts.index[0]
    table = covid_manifest(real, len(real.covid.images))
    table = table[table["patient_id"] == patient].reset_index(drop=True)
    built = write_manifest(table, tmp / "one-patient.csv")
    built.context.update(patient=patient, name="one-patient")
    return built


def manifest_embedding_nan(real: Real, tmp: Path) -> Built:
    table = covid_manifest(real)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(len(table), EMBED_DIM))
    image[5, 2] = np.nan
    table["image_embedding"] = list(image)
    table["report_embedding"] = list(rng.normal(size=(len(table), EMBED_DIM)))
    built = write_manifest(table.drop(columns=["image_path"]), tmp / "cohort.parquet")
    built.context["image_id"] = table.loc[5, "image_id"]
    return built


def cohort_without_a_report(real: Real, tmp: Path) -> Built:
    """The real COVID cohort, built in memory, with the report of its first image left out."""
    image = real.covid.images.iloc[0]
    reports = real.covid.reports[real.covid.reports["report_id"] != image["report_id"]].reset_index(drop=True)
    cohort = dataclasses.replace(real.covid, reports=reports)
    return Built((cohort,), {"image_id": image["image_id"], "report_id": image["report_id"]})


# Embedding folders with real ids: image.npy, report.npy and pairs.parquet (audit) or the id tables (precomputed).

def embedding_arrays(real: Real) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Return seeded unit-length embeddings for the first real COVID images and their reports, with the id tables."""
    images = real.covid.images.head(SMALL_COHORT).reset_index(drop=True)
    reports = real.covid.reports[real.covid.reports["report_id"].isin(images["report_id"])].reset_index(drop=True)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(len(images), EMBED_DIM)).astype(np.float32)
    report = rng.normal(size=(len(reports), EMBED_DIM)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    report /= np.linalg.norm(report, axis=1, keepdims=True)
    return image, report, images, reports


def audit_folder_with(real: Real, tmp: Path, edit=None, pairs_edit=None) -> Built:
    """Write an audit folder; ``edit(image, report)`` returns the damaged arrays, ``pairs_edit`` the damaged pairs."""
    image, report, images, reports = embedding_arrays(real)
    row_of = {report_id: row for row, report_id in enumerate(reports["report_id"])}
    pairs = pd.DataFrame({"image_id": images["image_id"], "report_row": images["report_id"].map(row_of),
                          "patient_id": images["patient_id"]})
    if edit is not None:
        image, report = edit(image, report)
    if pairs_edit is not None:
        pairs = pairs_edit(pairs)
    folder = tmp / "embeddings"
    folder.mkdir()
    np.save(folder / "image.npy", image)
    np.save(folder / "report.npy", report)
    pairs.to_parquet(folder / "pairs.parquet")
    return Built((folder,), {"folder": str(folder), "n_images": len(image), "n_reports": len(report)})


def _set(array: np.ndarray, index, value) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def audit_nan_image(real: Real, tmp: Path) -> Built:
    return audit_folder_with(real, tmp, lambda image, report: (_set(image, (3, 0), np.nan), report))


def audit_inf_report(real: Real, tmp: Path) -> Built:
    return audit_folder_with(real, tmp, lambda image, report: (image, _set(report, (2, 1), np.inf)))


def audit_dimension_mismatch(real: Real, tmp: Path) -> Built:
    return audit_folder_with(real, tmp, lambda image, report: (image, report[:, :6]))


def audit_zero_vector(real: Real, tmp: Path) -> Built:
    return audit_folder_with(real, tmp, lambda image, report: (image, _set(report, 5, 0.0)))


def audit_row_count_mismatch(real: Real, tmp: Path) -> Built:
    return audit_folder_with(real, tmp, pairs_edit=lambda pairs: pairs.iloc[:-1])


def audit_duplicate_image_id(real: Real, tmp: Path) -> Built:
    def edit(pairs: pd.DataFrame) -> pd.DataFrame:
        pairs = pairs.copy()
        pairs.loc[4, "image_id"] = pairs.loc[2, "image_id"]
        return pairs

    built = audit_folder_with(real, tmp, pairs_edit=edit)
    built.context["image_id"] = real.covid.images["image_id"].iloc[2]
    return built


def audit_pickled_npy(real: Real, tmp: Path) -> Built:
    built = audit_folder_with(real, tmp)
    marker = tmp / "payload-ran"
    np.save(Path(built.args[0]) / "report.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    built.context["marker"] = marker
    return built


def audit_one_patient(real: Real, tmp: Path) -> Built:
    built = audit_folder_with(real, tmp, pairs_edit=lambda pairs: pairs.assign(patient_id=pairs["patient_id"].iloc[0]))
    built.args = (built.args[0], [5, "full"])
    return built


def audit_pool_too_large(real: Real, tmp: Path) -> Built:
    built = audit_folder_with(real, tmp)
    built.args = (built.args[0], [5, 500])
    return built


def precomputed_folder(real: Real, tmp: Path, edit=None, images_edit=None) -> Built:
    """Write a precomputed folder (image.npy, report.npy and the id tables); the entry looks up the real ids."""
    image, report, images, reports = embedding_arrays(real)
    image_ids, report_ids = images["image_id"].tolist(), reports["report_id"].tolist()
    if edit is not None:
        image, report = edit(image, report)
    if images_edit is not None:
        images = images_edit(images)
    folder = tmp / "precomputed"
    folder.mkdir()
    np.save(folder / "image.npy", image)
    np.save(folder / "report.npy", report)
    images[["image_id", "patient_id", "report_id"]].to_parquet(folder / "images.parquet")
    reports[["report_id"]].to_parquet(folder / "reports.parquet")
    return Built((folder, image_ids, report_ids), {"folder": str(folder), "image_ids": image_ids,
                                                   "report_ids": report_ids})


def precomputed_nan(real: Real, tmp: Path) -> Built:
    built = precomputed_folder(real, tmp, lambda image, report: (_set(image, (7, 1), np.nan), report))
    built.context["id"] = built.context["image_ids"][7]
    return built


def precomputed_zero_vector(real: Real, tmp: Path) -> Built:
    """A precomputed folder with one zero report embedding, and a manifest of the same real rows to embed."""
    built = precomputed_folder(real, tmp, lambda image, report: (image, _set(report, 1, 0.0)))
    spec = write_manifest(covid_manifest(real), tmp / "cohort.csv").args[0]
    built.args = (built.args[0], spec, tmp / "out")
    built.context["id"] = built.context["report_ids"][1]
    return built


def precomputed_dimension_mismatch(real: Real, tmp: Path) -> Built:
    return precomputed_folder(real, tmp, lambda image, report: (image, report[:, :6]))


def precomputed_row_count_mismatch(real: Real, tmp: Path) -> Built:
    return precomputed_folder(real, tmp, images_edit=lambda images: images.iloc[:-1])


def precomputed_missing_id(real: Real, tmp: Path) -> Built:
    built = precomputed_folder(real, tmp)
    missing = real.covid.images["image_id"].iloc[SMALL_COHORT]
    built.args = (built.args[0], [*built.args[1], missing], built.args[2])
    built.context["id"] = missing
    return built


class Payload:
    """A pickled object whose unpickling would run ``touch MARKER`` through ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def precomputed_pickled_npy(real: Real, tmp: Path) -> Built:
    built = precomputed_folder(real, tmp)
    marker = tmp / "payload-ran"
    np.save(Path(built.args[0]) / "image.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    built.context["marker"] = marker
    return built


# Model weights.

def corrupt_safetensors(real: Real, tmp: Path) -> Built:
    from safetensors.torch import save_file

    path = tmp / "chexzero.safetensors"
    save_file({"visual.proj": torch.from_numpy(real.radiograph()[:64, :64].astype(np.float32))}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return Built(("chexzero", path), {"file": path.name})


def malicious_pickle_zip(real: Real, tmp: Path) -> Built:
    """A torch.save checkpoint (zip, pickle protocol 2) with ``os.system`` in a GLOBAL opcode."""
    marker = tmp / "payload-ran"
    path = tmp / "chexzero.pt"
    torch.save({"visual.proj": torch.from_numpy(real.radiograph()[:8, :8].astype(np.float32)),
                "extra": Payload(marker)}, path)
    return Built(("chexzero", path), {"file": path.name, "marker": marker})


def malicious_pickle_raw(real: Real, tmp: Path) -> Built:
    """A bare pickle (no zip container) whose first opcode is ``GLOBAL os system``."""
    marker = tmp / "payload-ran"
    path = tmp / "chexzero.pt"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    return Built(("chexzero", path), {"file": path.name, "marker": marker})


def malicious_pickle_protocol4(real: Real, tmp: Path) -> Built:
    """A torch.save checkpoint written with pickle protocol 4 (STACK_GLOBAL and frames)."""
    marker = tmp / "payload-ran"
    path = tmp / "chexzero.pt"
    torch.save({"extra": Payload(marker)}, path, pickle_protocol=4)
    return Built(("chexzero", path), {"file": path.name, "marker": marker})


def unknown_model(real: Real, tmp: Path) -> Built:
    return Built(("clip-vit-b-99", tmp), {"name": "clip-vit-b-99"})


# Command-line runs: the arguments after ``linkrisk``.

def cli_unknown_model(real: Real, tmp: Path) -> Built:
    spec = write_manifest(covid_manifest(real, 6), tmp / "cohort.csv").args[0]
    return Built((["embed", "--model", "clip-vit-b-99", "--weights", str(tmp / "weights"), "--dataset", spec,
                   "--out", str(tmp / "out"), "--quiet"],), {"name": "clip-vit-b-99"})


def cli_unknown_dataset(real: Real, tmp: Path) -> Built:
    return Built((["data", "describe", f"mimic:{real.data_dir}", "--quiet"],), {})


def cli_non_utf8_metadata(real: Real, tmp: Path) -> Built:
    built = covid_non_utf8(real, tmp)
    built.args = (["data", "describe", built.args[0], "--quiet"],)
    return built


def cli_duplicate_image_id(real: Real, tmp: Path) -> Built:
    built = manifest_duplicate_image_id(real, tmp)
    built.args = (["data", "describe", built.args[0], "--quiet"],)
    return built


def cli_audit_nan(real: Real, tmp: Path) -> Built:
    built = audit_nan_image(real, tmp)
    built.args = (["audit", str(built.args[0]), "--n-boot", "20", "--quiet"],)
    return built


def cli_embed_malicious_pickle(real: Real, tmp: Path) -> Built:
    built = malicious_pickle_zip(real, tmp)
    spec = write_manifest(covid_manifest(real, 6), tmp / "cohort.csv").args[0]
    built.args = (["embed", "--model", "chexzero", "--weights", str(built.args[1]), "--dataset", spec,
                   "--out", str(tmp / "out"), "--quiet"],)
    return built
