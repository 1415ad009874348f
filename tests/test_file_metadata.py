"""File metadata read from image headers on the real shared images, and the bands derived from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from linkrisk.data.file_metadata import (
    BAND_COLUMNS,
    METADATA_COLUMNS,
    image_attribute_table,
    metadata_bands,
    read_file_metadata,
)


def test_headers_match_full_decode(covid):
    paths = covid.images["image_path"].tolist()
    table = read_file_metadata(paths)
    assert list(table.columns) == [*METADATA_COLUMNS, *BAND_COLUMNS]
    assert len(table) == len(paths)
    assert table[list(METADATA_COLUMNS)].notna().all().all()
    for row in (0, len(paths) // 2, len(paths) - 1):
        with Image.open(paths[row]) as image:
            image.load()
            assert table["width"].iloc[row] == image.width
            assert table["height"].iloc[row] == image.height
            assert table["pil_mode"].iloc[row] == image.mode
            assert table["file_format"].iloc[row] == image.format
        assert table["aspect_ratio"].iloc[row] == pytest.approx(image.width / image.height)


def test_covid_collection_has_mixed_files(covid):
    # The collection mixes JPEG and PNG files in several modes and sizes.
    table = read_file_metadata(covid.images["image_path"].tolist())
    assert set(table["file_format"]) >= {"JPEG", "PNG"}
    assert set(table["pil_mode"]) >= {"L", "RGB"}
    assert table["size_band"].nunique() > 3
    assert (table["file_bytes"] > 0).all()


def test_openi_png_headers(openi):
    table = read_file_metadata(openi.images["image_path"].tolist())
    assert (table["file_format"] == "PNG").all()
    assert (table["width"] == 512).all()


def test_missing_and_broken_files(covid, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    empty_name = tmp_path / "empty.jpg"
    empty_name.write_bytes(b"")
    paths = [covid.images["image_path"].iloc[0], str(tmp_path / "absent.png"), None, "", str(broken), str(empty_name)]
    table = read_file_metadata(paths)
    assert table["width"].notna().tolist() == [True, False, False, False, False, False]
    assert table["file_bytes"].tolist()[4:] == [len(b"not an image at all"), 0]
    assert table["file_bytes"].isna().tolist()[1:4] == [True, True, True]
    assert table["size_band"].isna().tolist()[1:] == [True, True, True, False, True]


def test_bands_are_coarse():
    exact = pd.DataFrame({"file_bytes": pd.array([1023, 1024, 200_000, None], dtype="Int64"),
                          "width": pd.array([512, 1000, 3000, None], dtype="Int64"),
                          "height": pd.array([512, 800, 2000, None], dtype="Int64"),
                          "aspect_ratio": [1.0, 1.25, 1.5, np.nan]})
    bands = metadata_bands(exact)
    assert bands["size_band"].tolist()[:3] == [9, 10, 17]
    assert bands["side_band"].tolist()[:3] == [9, 9, 11]
    assert bands["aspect_band"].tolist()[:3] == [1.0, 1.2, 1.5]
    assert bands.iloc[3].isna().all()


def test_attribute_table_keeps_cohort_columns(covid):
    table = image_attribute_table(covid.images)
    assert len(table) == covid.n_images
    assert {"view", "sex", "age_band", "site", "source", *METADATA_COLUMNS} <= set(table.columns)
    assert set(table["sex"].dropna()) == {"M", "F"}
    assert table["source"].notna().all()
    assert table["source"].str.match(r"^(doi|host):").all()
    assert table["age_band"].dropna().str.fullmatch(r"\d+-\d+").all()
