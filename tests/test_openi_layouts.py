"""Open-i in the Kaggle re-packaging agrees with the official XML layout on the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from linkrisk.data import load_openi
from linkrisk.errors import ConfigError, InputError


def _kaggle_copy(data_dir: Path, target: Path, images: bool = True) -> Path:
    """The real Kaggle CSVs plus the 40 real PNGs under their Kaggle names (``<uid>_IM-....dcm.png``)."""
    source = data_dir / "openi"
    (target / "images_normalized").mkdir(parents=True)
    for name in ("indiana_reports.csv", "indiana_projections.csv", "chexpert_labels.csv"):
        os.symlink((source / name).resolve(), target / name)
    if images:
        for png in (source / "NLMCXR_png").glob("*.png"):
            os.symlink(png.resolve(), target / "images_normalized" / f"{png.stem[3:]}.dcm.png")
    return target


@pytest.fixture(scope="module")
def kaggle(data_dir, tmp_path_factory):
    return load_openi(_kaggle_copy(data_dir, tmp_path_factory.mktemp("openi") / "kaggle"))


def test_kaggle_layout_is_detected(kaggle):
    assert kaggle.n_reports == 3826
    assert kaggle.n_images == 40
    assert kaggle.skipped == {"image file missing": 7426, "report has no text in the chosen sections": 25}


def test_kaggle_layout_matches_official(kaggle, openi):
    assert set(kaggle.images["image_id"]) == set(openi.images["image_id"])
    views = openi.images.set_index("image_id")["view"]
    assert (kaggle.images.set_index("image_id")["view"] == views.loc[kaggle.images["image_id"]]).all()
    kaggle_text = kaggle.reports.set_index("report_id")["text"]
    official_text = openi.reports.set_index("report_id")["text"]
    common = kaggle_text.index.intersection(official_text.index)
    assert len(common) == 3826
    assert (kaggle_text.loc[common] == official_text.loc[common]).all()
    labels = kaggle.label_matrix(kaggle.images["report_id"])
    np.testing.assert_array_equal(labels, openi.label_matrix(kaggle.images["report_id"]))  # NaN equals NaN here


def test_kaggle_impression_only_policy(data_dir, tmp_path):
    from linkrisk.data.sections import TextPolicy

    root = _kaggle_copy(data_dir, tmp_path / "kaggle", images=False)
    cohort = load_openi(root, text_policy=TextPolicy(("impression",)))
    assert cohort.n_images == 0
    assert cohort.skipped["image file missing"] == 7466
    assert cohort.describe()["distinct_report_texts"] < cohort.n_reports  # many identical impressions


def test_kaggle_study_with_two_texts_keeps_first(data_dir, tmp_path):
    root = _kaggle_copy(data_dir, tmp_path / "kaggle", images=False)
    data = (root / "indiana_reports.csv").read_bytes()
    (root / "indiana_reports.csv").unlink()
    extra = (b"1,normal,normal,x,synthetic indication,none,synthetic findings,synthetic impression\n"
             b"99999,normal,normal,x,a,b,synthetic findings,synthetic impression\n"
             b"99999,normal,normal,x,a,b,synthetic findings,synthetic impression\n")
    (root / "indiana_reports.csv").write_bytes(data + extra)
    cohort = load_openi(root)
    assert cohort.repairs == {"study with two different report texts (first kept)": 1,
                              "study listed twice with the same text (one kept)": 1}
    assert cohort.reports.set_index("report_id").loc["CXR1", "text"] != "synthetic findings\nsynthetic impression"
    assert cohort.n_reports == 3827


def test_openi_layout_errors(tmp_path):
    with pytest.raises(InputError, match="neither NLMCXR_reports.tgz .* nor indiana_reports.csv"):
        load_openi(tmp_path)
    with pytest.raises(ConfigError, match="valid values: auto, xml, kaggle"):
        load_openi(tmp_path, layout="csv")


def test_kaggle_invalid_utf8_is_replaced_and_counted(data_dir, tmp_path):
    root = _kaggle_copy(data_dir, tmp_path / "kaggle", images=False)
    data = (root / "indiana_reports.csv").read_bytes()
    (root / "indiana_reports.csv").unlink()
    extra = b"99999,normal,normal,x,synthetic indication,none,synthetic \xff findings,synthetic impression\n"
    (root / "indiana_reports.csv").write_bytes(data + extra)
    cohort = load_openi(root)
    assert cohort.repairs == {"report with invalid UTF-8 bytes replaced": 1}
    assert cohort.n_reports == 3827
    text = cohort.reports.set_index("report_id").loc["CXR99999", "text"]
    assert text == "synthetic \ufffd findings\nsynthetic impression"


def test_xml_invalid_utf8_is_replaced_and_counted(data_dir, tmp_path):
    import io
    import shutil
    import tarfile

    root = tmp_path / "openi"
    root.mkdir()
    shutil.copytree(data_dir / "openi" / "NLMCXR_png", root / "NLMCXR_png")
    with tarfile.open(data_dir / "openi" / "NLMCXR_reports.tgz") as source, \
            tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as target:
        changed = False
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else None
            if data is not None and not changed and b'Label="FINDINGS">' in data:
                data = data.replace(b'Label="FINDINGS">', b'Label="FINDINGS">\xff', 1)
                member.size = len(data)
                changed = True
            target.addfile(member, io.BytesIO(data) if data is not None else None)
    cohort = load_openi(root)
    assert cohort.repairs == {"report with invalid UTF-8 bytes replaced": 1}
    assert cohort.n_reports == 3927
    assert cohort.reports["text"].str.contains("\ufffd", regex=False).sum() == 1
