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


def test_kaggle_duplicate_uid_is_named(data_dir, tmp_path):
    root = _kaggle_copy(data_dir, tmp_path / "kaggle", images=False)
    reports = (root / "indiana_reports.csv").read_text(encoding="utf-8").splitlines()
    (root / "indiana_reports.csv").unlink()
    (root / "indiana_reports.csv").write_text("\n".join([*reports, reports[1]]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"indiana_reports.csv: uid 1 listed more than once"):
        load_openi(root)


def test_openi_layout_errors(tmp_path):
    with pytest.raises(InputError, match="neither NLMCXR_reports.tgz .* nor indiana_reports.csv"):
        load_openi(tmp_path)
    with pytest.raises(ConfigError, match="valid values: auto, xml, kaggle"):
        load_openi(tmp_path, layout="csv")
