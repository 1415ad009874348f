"""The bad-input corpus: one table of cases, each built from the real data and run through its entry point.

Each row names the case, the builder that writes the bad input into a
fresh folder (:mod:`builders`), the entry point that reads it, and the
expected outcome (:mod:`outcomes`). An outcome is a clear error that
names the file, row or id and the fix, a counted skip, or values that
load correctly.
The conftest prints the tally of passed cases after every run.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import types
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from linkrisk.audit.embeddings import audit_folder
from linkrisk.data.cohort import PairedCohort, split_by_patient
from linkrisk.data.images import read_image
from linkrisk.data.registry import load_dataset
from linkrisk.errors import ConfigError, InputError
from linkrisk.models.adapters import load_adapter
from linkrisk.models.embed import EmbedConfig, embed_cohort
from linkrisk.models.features import embed_images, embed_texts
from linkrisk.models.image_encoders import create_image_encoder
from linkrisk.models.precomputed import PrecomputedAdapter
from linkrisk.models.text_encoders import WordLlamaTextEncoder

from . import builders as b
from .outcomes import Built, Exits, Loads, Raises, Skips

LINKRISK = [sys.executable, "-m", "linkrisk.cli"]


# Entry points: the public calls a user makes, with the few arguments a case does not set.

@lru_cache(maxsize=1)
def _image_encoder():
    return create_image_encoder("randconv")


def embed_dataset_images(spec: str):
    """Load a dataset and encode its images as the demo does; return the cohort that kept the readable ones."""
    cohort = load_dataset(spec)
    cache = Path(spec.partition(":")[2]).parent / "cache"
    _, readable = embed_images(cohort, _image_encoder(), cache, progress=False)
    return readable


def embed_dataset_reports(spec: str):
    """Load a dataset and encode its reports with the reference model's text tower."""
    cohort = load_dataset(spec)
    features = embed_texts(cohort.reports["text"].tolist(), WordLlamaTextEncoder(),
                           Path(spec.partition(":")[2]).parent / "cache", cohort.name, progress=False)
    return types.SimpleNamespace(cohort=cohort, features=features)


def read_image_without_pydicom(path: Path):
    """Call read_image as on a machine where pydicom is not installed."""
    with mock.patch.dict(sys.modules, {"pydicom": None, "pydicom.errors": None, "pydicom.pixels": None}):
        return read_image(path)


def audit(folder: Path, pools=(10, "full")):
    return audit_folder(folder, list(pools), [1], n_boot=20)


def validate_cohort(cohort: PairedCohort):
    return cohort.validate()


def split_dataset(spec: str):
    return split_by_patient(load_dataset(spec), 0.25, seed=0)


def precomputed_lookup(folder: Path, image_ids: list[str], report_ids: list[str]):
    adapter = PrecomputedAdapter(folder)
    return adapter.image_features_for(image_ids), adapter.report_features_for(report_ids)


def embed_precomputed(folder: Path, spec: str, out: Path):
    """Run the embed step with the precomputed adapter on a dataset, as ``linkrisk embed --model precomputed``."""
    return embed_cohort(PrecomputedAdapter(folder), load_dataset(spec), out, EmbedConfig(workers=0, progress=False))


def cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LINKRISK, *args], capture_output=True, text=True, timeout=300)


# Checks of the cases that load, and extra checks of some errors and skips.

def _log_names(key: str, *fragments: str) -> Callable:
    """Check that the log names the file ``built.context[key]`` and contains each of ``fragments``."""
    def check(cohort, built: Built, log: str) -> None:
        log = " ".join(log.split())
        assert str(built.context[key]) in log, f"the log does not name {built.context[key]}"
        for fragment in fragments:
            assert fragment in log, f"{fragment!r} not in the log"
    return check


def _decoded_as(mode: str, atol: float) -> Callable:
    def check(image, built: Built, log: str) -> None:
        assert image.mode == mode
        decoded = np.asarray(image, dtype=np.float64)
        assert decoded.shape == built.context["expected"].shape
        np.testing.assert_allclose(decoded, built.context["expected"], rtol=0, atol=atol)
    return check


def _sixteen_bit(image, built: Built, log: str) -> None:
    assert built.context["stored_mode"] == "I;16"  # the file really stores 16-bit samples
    _decoded_as("F", 1e-6)(image, built, log)
    assert len(np.unique(np.asarray(image))) > 256  # more levels than 8 bits hold: no precision lost


def _monochrome1(image, built: Built, log: str) -> None:
    _decoded_as("F", 1e-6)(image, built, log)
    # Inverted back, the radiograph matches the real image it was made from.
    np.testing.assert_allclose(np.asarray(image), built.context["original"], atol=1 / 255 + 1e-6)


def _payload_never_ran(built: Built) -> None:
    assert not Path(built.context["marker"]).exists(), "the pickle payload ran"


def _cli_payload_never_ran(result, built: Built) -> None:
    _payload_never_ran(built)


def _images_of_empty_report_counted(cohort, built: Built, log: str) -> None:
    assert cohort.skipped.get("image whose report has no text") == built.context["n_images"]
    assert built.context["report_id"] not in set(cohort.reports["report_id"])
    assert built.context["report_id"] not in set(cohort.images["report_id"])
    assert built.context["report_id"] in log


def _long_report(result, built: Built, log: str) -> None:
    texts = result.cohort.reports.set_index("report_id")["text"]
    assert len(texts[built.context["report_id"]].split()) == built.context["words"]  # kept as written
    assert result.features.shape == (result.cohort.n_reports, 256)
    assert np.isfinite(result.features).all()
    assert "truncat" not in log  # the reference text tower reads whole texts
    row = list(texts.index).index(built.context["report_id"])
    assert np.linalg.norm(result.features[row]) > 0


def _non_utf8_report(cohort, built: Built, log: str) -> None:
    assert cohort.repairs == {"report with invalid UTF-8 bytes replaced": 1}
    text = cohort.reports.set_index("report_id").loc[built.context["report_id"], "text"]
    assert "\ufffd" in text
    assert built.context["report_id"] in set(cohort.images["report_id"])  # its image stays paired
    assert cohort.n_images == built.context["n_images"]
    assert cohort.n_reports == built.context["n_reports"]
    assert "not UTF-8" in log


def _one_patient_audit(result, built: Built, log: str) -> None:
    assert result["n_patients"] == 1
    assert all(entry["ci95"][0] == entry["ci95"][1] for entry in result["recall"])
    assert "all 24 images belong to one patient" in " ".join(log.split())
    assert "zero width" in log


def _pool_too_large(result, built: Built, log: str) -> None:
    assert {entry["pool"] for entry in result["recall"]} == {5}
    assert f"pool sizes [500] are not smaller than the {built.context['n_reports']} candidates" in " ".join(log.split())


@dataclasses.dataclass
class Case:
    id: str
    builder: Callable[[b.Real, Path], Built]
    entry: Callable
    expected: Raises | Exits | Skips | Loads


RE_EXPORT = "download or export the file again"
CHECKPOINT_FIX = "Convert a trusted copy to safetensors"

CASES = [
    # Image files: an undecodable file is skipped and counted when a cohort is encoded; other modes decode right.
    Case("truncated_png", b.truncated_png, embed_dataset_images,
         Skips("unreadable image file", 1, also=_log_names("file", "truncated", RE_EXPORT))),
    Case("truncated_jpeg", b.truncated_jpeg, embed_dataset_images,
         Skips("unreadable image file", 1, also=_log_names("file", "truncated", RE_EXPORT))),
    Case("zero_byte_image", b.zero_byte_image, embed_dataset_images,
         Skips("unreadable image file", 1, also=_log_names("file", "the file is empty (0 bytes)", RE_EXPORT))),
    Case("bomb_png_in_cohort", b.bomb_png_in_cohort, embed_dataset_images,
         Skips("unreadable image file", 1, also=_log_names("file", "downscale the image"))),
    Case("bomb_png_header", b.bomb_png, read_image,
         Raises(InputError, ("{file}", "DecompressionBombError", "downscale the image below 89,478,485 pixels"))),
    Case("bomb_png_just_over_limit", b.bomb_png_just_over_limit, read_image,
         Raises(InputError, ("{file}", "exceeds", "downscale the image"))),
    Case("sixteen_bit_png", b.sixteen_bit_png, read_image, Loads(_sixteen_bit)),
    Case("rgba_png", b.rgba_png, read_image, Loads(_decoded_as("L", 0))),
    Case("palette_png", b.palette_png, read_image, Loads(_decoded_as("L", 0))),
    Case("dicom_monochrome1", b.dicom_monochrome1, read_image, Loads(_monochrome1)),
    Case("dicom_signed_rescaled", b.dicom_signed_rescaled, read_image, Loads(_decoded_as("F", 1e-6))),
    Case("dicom_without_pixel_data", b.dicom_without_pixels, read_image,
         Raises(InputError, ("{file}", "has no pixel data", "point the dataset at the radiograph's image file"))),
    Case("dicom_two_frames", b.dicom_multiframe, read_image,
         Raises(InputError, ("{file}", "has 2 frames", "export the radiograph as a single-frame file"))),
    Case("dicom_truncated_pixel_data", b.dicom_truncated, read_image,
         Raises(InputError, ("{file}", "cannot decode the DICOM pixel data", "export the image again"))),
    Case("dicom_without_pydicom", b.dicom_marker_only, read_image_without_pydicom,
         Raises(InputError, ("{file}", "needs pydicom", "pip install 'linkrisk[dicom]'"))),

    # Dataset loaders: records that cannot be used are skipped and counted; files that cannot be used are errors.
    Case("missing_image_file", b.covid_missing_image, load_dataset, Skips("image file not in images/", 1)),
    Case("duplicate_image_file", b.covid_duplicate_file, load_dataset, Skips("image file listed twice", 1)),
    Case("duplicate_image_id", b.manifest_duplicate_image_id, load_dataset,
         Raises(InputError, ("{manifest}", "duplicate image ids {image_id}", "give each image a unique id"))),
    Case("report_id_without_report", b.openi_kaggle_orphan_image, load_dataset,
         Skips("image's uid has no report", 1)),
    Case("image_without_report", b.openi_unlisted_image, load_dataset,
         Skips("image not listed in any report", 1)),
    Case("empty_report", b.manifest_empty_report, load_dataset,
         Skips("report has no text", 1, also=_images_of_empty_report_counted)),
    Case("invisible_characters_report", b.manifest_invisible_report, load_dataset,
         Skips("report has no text", 1, also=_images_of_empty_report_counted)),
    Case("report_missing_from_cohort", b.cohort_without_a_report, validate_cohort,
         Raises(InputError, ("{image_id} -> {report_id}", "add those reports or drop their images"))),
    Case("whitespace_only_note", b.covid_whitespace_note, load_dataset, Skips("empty clinical note", 1)),
    Case("non_utf8_metadata", b.covid_non_utf8, load_dataset,
         Raises(InputError, ("{csv}: line {line} is not valid UTF-8", "re-save the file as UTF-8"))),
    Case("non_utf8_report_xml", b.openi_non_utf8_report, load_dataset, Loads(_non_utf8_report)),
    Case("report_of_50000_words", b.manifest_long_report, embed_dataset_reports, Loads(_long_report)),
    Case("label_out_of_range", b.openi_label_out_of_range, load_dataset,
         Raises(InputError, ("{csv}: column 'Edema' has 1 values outside {{1, 0, -1, blank}} (first at line 8: 2.0)",
                             "use 1, 0, -1 or an empty cell"))),
    Case("label_not_a_number", b.manifest_label_out_of_range, load_dataset,
         Raises(InputError, ("{manifest}: column 'Pneumonia'", "(first at row 2: 'yes')",
                             "use 1, 0, -1 or an empty cell"))),
    Case("labels_missing_column", b.openi_labels_missing_column, load_dataset,
         Raises(InputError, ("{csv}: missing columns ['Pleural Effusion']", "expected at least ['uid'"))),
    Case("manifest_missing_column", b.manifest_missing_column, load_dataset,
         Raises(InputError, ("{manifest}: missing columns ['report_id']", "docs/datasets.md"))),
    Case("manifest_embedding_nan", b.manifest_embedding_nan, load_dataset,
         Raises(InputError, ("{manifest}: 1 image_embedding values contain NaN or inf (first: image id {image_id})",
                             "re-create the embeddings"))),
    Case("split_one_patient", b.manifest_one_patient, split_dataset,
         Raises(InputError, ("cohort '{name}' has 1 patient(s)", "add patients"))),

    # Saved embeddings audited with audit_folder.
    Case("audit_nan", b.audit_nan_image, audit,
         Raises(InputError, ("image.npy: 1 rows contain NaN or inf (first row 3)", "re-create the embeddings"))),
    Case("audit_inf", b.audit_inf_report, audit,
         Raises(InputError, ("report.npy: 1 rows contain NaN or inf (first row 2)", "re-create the embeddings"))),
    Case("audit_dimension_mismatch", b.audit_dimension_mismatch, audit,
         Raises(InputError, ("image.npy rows have 8 dimensions but report.npy rows have 6",
                             "both must come from the same model"))),
    Case("audit_zero_vector", b.audit_zero_vector, audit,
         Raises(InputError, ("report.npy: 1 rows are zero vectors (first row 5)", "re-create the embeddings"))),
    Case("audit_row_count_mismatch", b.audit_row_count_mismatch, audit,
         Raises(InputError, ("pairs.parquet: 23 rows but image.npy has 24", "both need one row per image"))),
    Case("audit_duplicate_image_id", b.audit_duplicate_image_id, audit,
         Raises(InputError, ("pairs.parquet: duplicate image_id values ({image_id})", "needs its own id"))),
    Case("audit_pickled_npy", b.audit_pickled_npy, audit,
         Raises(InputError, ("report.npy: not a readable numeric .npy array", "save the embeddings as a float array"),
                also=_payload_never_ran)),
    Case("audit_one_patient", b.audit_one_patient, audit, Loads(_one_patient_audit)),
    Case("audit_pool_larger_than_cohort", b.audit_pool_too_large, audit, Loads(_pool_too_large)),

    # Embeddings made elsewhere, read by the precomputed adapter.
    Case("precomputed_nan", b.precomputed_nan, precomputed_lookup,
         Raises(InputError, ("{folder}", "1 image rows contain NaN or infinity (first: id {id})", "recompute them"))),
    Case("precomputed_zero_vector", b.precomputed_zero_vector, embed_precomputed,
         Raises(InputError, ("{folder}", "1 report embeddings are zero or not finite (first: id {id})",
                             "cannot be ranked"))),
    Case("precomputed_dimension_mismatch", b.precomputed_dimension_mismatch, precomputed_lookup,
         Raises(InputError, ("{folder}: image.npy has 8 dimensions but report.npy has 6",
                             "both must be in one embedding space"))),
    Case("precomputed_row_count_mismatch", b.precomputed_row_count_mismatch, precomputed_lookup,
         Raises(InputError, ("images.parquet: 23 rows but image.npy has 24", "they must match row for row"))),
    Case("precomputed_missing_id", b.precomputed_missing_id, precomputed_lookup,
         Raises(InputError, ("1 image ids of the dataset have no precomputed row (first: {id})",
                             "embed them with the same model"))),
    Case("precomputed_pickled_npy", b.precomputed_pickled_npy, precomputed_lookup,
         Raises(InputError, ("image.npy: not a readable .npy array", "save the features as a float array"),
                also=_payload_never_ran)),

    # Model weights through load_adapter.
    Case("unknown_model", b.unknown_model, load_adapter,
         Raises(ConfigError, ("unknown model '{name}'", "supported: clip-vit-b-32"))),
    Case("corrupt_safetensors", b.corrupt_safetensors, load_adapter,
         Raises(InputError, ("{file}: not a readable safetensors file", "download or export the weights again"))),
    Case("malicious_pickle_global", b.malicious_pickle_zip, load_adapter,
         Raises(InputError, ("{file}: rejected", "GLOBAL posix.system", CHECKPOINT_FIX), also=_payload_never_ran)),
    Case("malicious_pickle_bare", b.malicious_pickle_raw, load_adapter,
         Raises(InputError, ("{file}: rejected", "GLOBAL os.system", CHECKPOINT_FIX), also=_payload_never_ran)),
    Case("malicious_pickle_protocol4", b.malicious_pickle_protocol4, load_adapter,
         Raises(InputError, ("{file}: not a readable torch checkpoint", "convert a trusted copy to safetensors"),
                also=_payload_never_ran)),

    # The CLI: exit status 1 for input errors, 2 for usage errors, one line on stderr.
    Case("cli_unknown_model", b.cli_unknown_model, cli,
         Exits(2, ("unknown model '{name}'", "supported: clip-vit-b-32"))),
    Case("cli_unknown_dataset", b.cli_unknown_dataset, cli, Exits(2, ("unknown dataset 'mimic'", "valid names"))),
    Case("cli_non_utf8_metadata", b.cli_non_utf8_metadata, cli,
         Exits(1, ("metadata.csv: line {line} is not valid UTF-8", "re-save the file as UTF-8"))),
    Case("cli_duplicate_image_id", b.cli_duplicate_image_id, cli,
         Exits(1, ("duplicate image ids {image_id}", "give each image a unique id"))),
    Case("cli_audit_nan", b.cli_audit_nan, cli, Exits(1, ("image.npy: 1 rows contain NaN or inf",))),
    Case("cli_embed_malicious_pickle", b.cli_embed_malicious_pickle, cli,
         Exits(1, ("chexzero.pt: rejected", CHECKPOINT_FIX), also=_cli_payload_never_ran)),
]


@pytest.fixture(scope="session")
def real(data_dir, covid, openi) -> b.Real:
    return b.Real(data_dir, covid, openi)


# torch warns about any protocol 4 pickle before its weights-only unpickler rejects it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")
@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=pytest.mark.bad_input_case(
    case.id, case.expected.kind)) for case in CASES])
def test_bad_input(case: Case, real, tmp_path, caplog):
    if case.id.startswith("dicom") and case.id != "dicom_without_pydicom":
        pytest.importorskip("pydicom", minversion="3")
    built = case.builder(real, tmp_path)
    raised, result = None, None
    with caplog.at_level(logging.INFO, logger="linkrisk"):
        try:
            result = case.entry(*built.args)
        except (InputError, ConfigError) as err:
            raised = err
    case.expected.check(raised, result, built, caplog.text)


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 25
