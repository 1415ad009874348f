"""Loaders and the paired-cohort contract, on the real shared data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from linkrisk.data import CHEXPERT_LABELS, split_by_patient
from linkrisk.errors import InputError


def test_openi_counts(openi):
    assert openi.n_images == 40
    assert openi.n_reports == 3927  # 3,955 reports, 28 with empty findings and impression
    assert openi.skipped == {"report has no text in the chosen sections": 28}
    assert openi.label_names == CHEXPERT_LABELS
    assert set(openi.images["view"]) == {"Frontal", "Lateral"}


def test_openi_images_map_to_own_report(openi):
    # CXR<uid>_IM-....png belongs to report CXR<uid>.
    uid = openi.images["image_id"].str.extract(r"^(CXR\d+)_")[0]
    assert (uid == openi.images["report_id"]).all()
    assert openi.images["image_path"].map(lambda p: p.endswith(".png")).all()


def test_openi_labels_known_for_labelled_studies(openi):
    known = openi.reports[CHEXPERT_LABELS[0]].notna()
    assert known.sum() == 3337  # every labelled uid has a non-empty report
    assert set(np.unique(openi.label_matrix()[known.to_numpy()])) <= {0.0, 1.0}


def test_covid_counts(covid):
    assert covid.n_images == 354
    assert covid.n_patients == 194  # 195 patient ids; two share image files
    assert covid.skipped["image file not in images/"] == 32
    assert covid.skipped["image file listed twice"] == 3
    assert covid.images["image_id"].is_unique


def test_covid_shared_files_join_patients(covid):
    row = covid.images[covid.images["image_id"] == "000001-24.jpg"]
    assert len(row) == 1
    group = row["patient_id"].iloc[0]
    assert group == "285"


def test_covid_labels_from_finding(covid):
    assert "COVID-19" in covid.label_names
    assert "ARDS" in covid.label_names
    labels = covid.label_matrix(covid.images["report_id"])
    assert labels.shape == (354, len(covid.label_names))
    assert (labels.sum(axis=1) >= 1).all()


def test_split_patient_disjoint_and_seeded(covid):
    train, test = split_by_patient(covid, 0.25, seed=3)
    assert not set(train.images["patient_id"]) & set(test.images["patient_id"])
    assert train.n_images + test.n_images == covid.n_images
    assert set(test.reports["report_id"]) == set(test.images["report_id"])
    again = split_by_patient(covid, 0.25, seed=3)[1]
    assert list(again.images["image_id"]) == list(test.images["image_id"])
    other = split_by_patient(covid, 0.25, seed=4)[1]
    assert set(other.images["patient_id"]) != set(test.images["patient_id"])


def test_validate_reports_every_problem(covid):
    images = pd.concat([covid.images, covid.images.iloc[[0]]], ignore_index=True)
    images.loc[1, "report_id"] = "no-such-report"
    reports = covid.reports.copy()
    reports.loc[2, "text"] = "   "
    reports.loc[3, "COVID-19"] = 2.0
    broken = dataclasses.replace(covid, images=images, reports=reports)
    with pytest.raises(InputError) as info:
        broken.validate()
    message = str(info.value)
    assert f"duplicate image ids {covid.images.loc[0, 'image_id']}" in message
    assert "no-such-report" in message
    assert f"empty text (report ids: {reports.loc[2, 'report_id']})" in message
    assert "outside {1, 0, -1, blank}" in message


def test_split_needs_two_patients(covid):
    one = covid.subset_patients([covid.images["patient_id"].iloc[0]])
    with pytest.raises(InputError, match="at least 2"):
        split_by_patient(one, 0.5, 0)


def test_invisible_text_counts_as_empty():
    from linkrisk.data.cohort import has_text

    texts = pd.Series(["normal heart size", "   ", "\u200b\u200b", None, "1"])
    assert has_text(texts).tolist() == [True, False, False, False, True]


def test_stratified_split_keeps_prevalence(covid):
    from linkrisk.data.cohort import split_by_patient

    label = "COVID-19"
    positive = covid.reports.loc[covid.reports[label] == 1.0, "report_id"]
    positive_patients = set(covid.images.loc[covid.images["report_id"].isin(positive), "patient_id"])
    train, test = split_by_patient(covid, 0.25, seed=3, stratify=label)
    test_positive = positive_patients & set(test.images["patient_id"])
    assert len(test_positive) == round(0.25 * len(positive_patients))
    assert set(train.images["patient_id"]).isdisjoint(test.images["patient_id"])
    assert train.n_patients + test.n_patients == covid.n_patients
    with pytest.raises(InputError, match="cannot stratify by 'Cardiomegaly'"):
        split_by_patient(covid, 0.25, seed=3, stratify="Cardiomegaly")


def test_official_split_selects_part(covid):
    import dataclasses

    from linkrisk.data.cohort import official_split

    images = covid.images["image_id"].tolist()
    cohort = dataclasses.replace(covid, split={i: ("test" if n % 4 == 0 else "train") for n, i in enumerate(images)})
    test = official_split(cohort, "test")
    assert test.n_images == len(images[::4])
    assert set(test.split.values()) == {"test"}
    with pytest.raises(InputError, match="no official split part 'validate'; parts: test, train"):
        official_split(cohort, "validate")
    with pytest.raises(InputError, match="has no official split"):
        official_split(covid, "test")
