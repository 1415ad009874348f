"""The canonical paired cohort: one row per image, one row per report.

Every loader returns a :class:`PairedCohort`; everything downstream reads
only these two tables.

``images`` columns
    ``image_id`` (str, unique), ``image_path`` (str, absolute),
    ``study_id`` (str), ``patient_id`` (str), ``report_id`` (str, the
    image's true report), ``view`` (str: ``PA``, ``AP``, ``AP Supine``,
    ``Lateral``, ``Frontal``, ``unknown``, or another view name as the
    publisher writes it, such as MIMIC-CXR's ``AP AXIAL``).
``reports`` columns
    ``report_id`` (str, unique), ``text`` (str, non-empty), then one float
    column per name in ``label_names``: 1.0 positive, 0.0 negative, -1.0
    uncertain, NaN unknown.

A report with no image is allowed: it is a candidate in the audit but
never a query. Every image must point to an existing report.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

import numpy as np
import pandas as pd

from linkrisk._logging import logger
from linkrisk.data._tables import ALLOWED_LABEL_VALUES
from linkrisk.errors import InputError

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

IMAGE_COLUMNS: tuple[str, ...] = ("image_id", "image_path", "study_id", "patient_id", "report_id", "view")
REPORT_COLUMNS: tuple[str, ...] = ("report_id", "text")

# At most this many offending ids are quoted in one error message.
_MAX_QUOTED = 5


def has_text(texts: pd.Series) -> pd.Series:
    """Return which texts contain at least one letter or digit.

    Whitespace-only and invisible-character-only texts (for example zero-width
    spaces) count as empty, because an embedding of them describes nothing.
    """
    return texts.notna() & texts.astype(str).str.contains(r"\w", regex=True)


def _quote(values: list[str] | pd.Series) -> str:
    values = [str(v) for v in values]
    listed = ", ".join(values[:_MAX_QUOTED])
    more = len(values) - _MAX_QUOTED
    return listed + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass
class PairedCohort:
    """Images paired with their true reports, plus any extra candidate reports.

    Attributes:
        name: short cohort name used in outputs (``covid``, ``openi``).
        images: one row per image, columns as in the module docstring.
        reports: one row per report, columns as in the module docstring.
        label_names: label columns present in ``reports``, in order.
        source: the folder or file the cohort was read from.
        skipped: records left out while loading, as ``reason -> count``.
        repairs: records kept after a documented repair or choice (for
            example invalid UTF-8 bytes replaced, or one of two conflicting
            report texts chosen), as ``reason -> count``.
        split: official split of each image (``image_id -> train|validate|test``)
            where the publisher gives one; empty otherwise.
        embeddings: precomputed embeddings where the source has them
            (``image``: ``[n_images, d]`` in image-row order; ``report``:
            ``[n_reports, d]`` in report-row order); empty otherwise.
    """

    name: str
    images: pd.DataFrame
    reports: pd.DataFrame
    label_names: tuple[str, ...] = ()
    source: str = ""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    repairs: dict[str, int] = dataclasses.field(default_factory=dict)
    split: dict[str, str] = dataclasses.field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_reports(self) -> int:
        return len(self.reports)

    @property
    def n_patients(self) -> int:
        return int(self.images["patient_id"].nunique())

    def validate(self) -> "PairedCohort":
        """Check the table contract; raise one :class:`InputError` listing every problem."""
        problems: list[str] = []
        where = f"cohort {self.name!r} ({self.source or 'in memory'})"

        missing_image_cols = [c for c in IMAGE_COLUMNS if c not in self.images.columns]
        missing_report_cols = [c for c in (*REPORT_COLUMNS, *self.label_names) if c not in self.reports.columns]
        if missing_image_cols:
            problems.append(f"image table lacks columns {missing_image_cols}")
        if missing_report_cols:
            problems.append(f"report table lacks columns {missing_report_cols}")
        if problems:
            raise InputError(f"{where}: " + "; ".join(problems))

        for column in IMAGE_COLUMNS:
            blank = self.images[column].isna() | (self.images[column].astype(str).str.strip() == "")
            if blank.any():
                ids = self.images.loc[blank, "image_id"].astype(str).tolist()
                problems.append(f"{blank.sum()} image rows have an empty {column} (image ids: {_quote(ids)})")

        duplicated = self.images["image_id"][self.images["image_id"].duplicated()]
        if len(duplicated):
            problems.append(
                f"duplicate image ids {_quote(duplicated.unique().tolist())}: give each image a unique id"
            )
        duplicated = self.reports["report_id"][self.reports["report_id"].duplicated()]
        if len(duplicated):
            problems.append(
                f"duplicate report ids {_quote(duplicated.unique().tolist())}: give each report a unique id"
            )

        orphan = ~self.images["report_id"].isin(self.reports["report_id"])
        if orphan.any():
            pairs = [f"{i} -> {r}" for i, r in self.images.loc[orphan, ["image_id", "report_id"]].itertuples(index=False)]
            problems.append(f"{orphan.sum()} images point to a report id that has no report ({_quote(pairs)}): "
                            "add those reports or drop their images")

        text = self.reports["text"]
        empty = ~has_text(text)
        if empty.any():
            problems.append(
                f"{empty.sum()} reports have empty text (report ids: "
                f"{_quote(self.reports.loc[empty, 'report_id'].tolist())}): drop them or supply the text"
            )

        for label in self.label_names:
            values = pd.to_numeric(self.reports[label], errors="coerce")
            bad = ~(values.isna() | values.isin(ALLOWED_LABEL_VALUES)) | (values.isna() & self.reports[label].notna())
            if bad.any():
                examples = self.reports.loc[bad, ["report_id", label]].astype(str).agg("=".join, axis=1).tolist()
                problems.append(
                    f"label {label!r} has {bad.sum()} values outside {{1, 0, -1, blank}} ({_quote(examples)})"
                )

        if problems:
            raise InputError(f"{where} is invalid: " + "; ".join(problems))
        return self

    def subset_patients(self, patient_ids: set[str] | list[str], name: str | None = None) -> "PairedCohort":
        """Keep the images of ``patient_ids`` and only the reports those images point to.

        The result's ``skipped`` is empty: records skipped while loading
        belong to the whole cohort, not to a part of it.
        """
        keep = self.images["patient_id"].isin(set(patient_ids))
        images = self.images[keep].reset_index(drop=True)
        keep_reports = self.reports["report_id"].isin(images["report_id"])
        reports = self.reports[keep_reports].reset_index(drop=True)
        split = {i: s for i, s in self.split.items() if i in set(images["image_id"])}
        embeddings = {}
        if "image" in self.embeddings:
            embeddings["image"] = self.embeddings["image"][keep.to_numpy()]
        if "report" in self.embeddings:
            embeddings["report"] = self.embeddings["report"][keep_reports.to_numpy()]
        return dataclasses.replace(self, name=name or self.name, images=images, reports=reports, skipped={},
                                   repairs={}, split=split, embeddings=embeddings)

    def drop_images(self, image_ids: list[str], reason: str) -> "PairedCohort":
        """Remove images (for example unreadable files), counting them under ``reason``."""
        if not image_ids:
            return self
        if self.embeddings:
            raise InputError(f"cohort {self.name!r} carries precomputed embeddings; drop rows before embedding")
        drop = self.images["image_id"].isin(set(image_ids))
        skipped = Counter(self.skipped)
        skipped[reason] += int(drop.sum())
        logger.warning(
            "%s: skipped %d images (%s): %s", self.name, int(drop.sum()), reason, _quote(list(image_ids))
        )
        return dataclasses.replace(self, images=self.images[~drop].reset_index(drop=True), skipped=dict(skipped))

    def label_matrix(self, report_ids: pd.Series | None = None) -> np.ndarray:
        """Return labels as a float array ``[n, len(label_names)]`` (NaN = unknown).

        Rows follow ``report_ids`` when given (for example the images'
        report ids), else the report table order.
        """
        table = self.reports.set_index("report_id")[list(self.label_names)].astype(float)
        if report_ids is None:
            return table.to_numpy()
        return table.loc[list(report_ids)].to_numpy()

    def fingerprint(self) -> str:
        """Content hash of both tables (ids, paths, text, labels), hex, 16 characters."""
        digest = hashlib.sha256()
        digest.update(pd.util.hash_pandas_object(self.images[list(IMAGE_COLUMNS)], index=False).to_numpy().tobytes())
        columns = [*REPORT_COLUMNS, *self.label_names]
        digest.update(pd.util.hash_pandas_object(self.reports[columns], index=False).to_numpy().tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, object]:
        """Summarise counts, views, label prevalence, duplicate report texts, skipped and repaired records."""
        duplicate_texts = int(self.reports["text"].duplicated(keep=False).sum())
        prevalence = {}
        for label in self.label_names:
            values = pd.to_numeric(self.reports[label], errors="coerce")
            prevalence[label] = {"positive": int((values == 1).sum()), "negative": int((values == 0).sum()),
                                 "uncertain": int((values == -1).sum()), "blank": int(values.isna().sum())}
        return {
            "name": self.name,
            "source": self.source,
            "images": self.n_images,
            "studies": int(self.images["study_id"].nunique()),
            "patients": self.n_patients,
            "reports": self.n_reports,
            "reports_with_images": int(self.reports["report_id"].isin(self.images["report_id"]).sum()),
            "reports_sharing_text": duplicate_texts,
            "distinct_report_texts": int(self.reports["text"].nunique()),
            "views": self.images["view"].value_counts().to_dict(),
            "labels": prevalence,
            "official_split": {k: int(v) for k, v in pd.Series(list(self.split.values()), dtype=object).value_counts().items()},
            "skipped": dict(self.skipped),
            "repairs": dict(self.repairs),
        }


def split_by_patient(
    cohort: PairedCohort, test_fraction: float, seed: int, stratify: str | None = None
) -> tuple[PairedCohort, PairedCohort]:
    """Split a cohort into patient-disjoint train and test cohorts.

    Patients are shuffled with ``numpy.random.default_rng(seed)`` and the
    first ``round(test_fraction * n_patients)`` (at least one) go to test.
    With ``stratify`` (a label name), patients are split within two strata,
    those with any report positive for the label and the rest, so both
    sides keep the label's prevalence. Each side keeps only the reports its
    images point to.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test fraction must be between 0 and 1, got {test_fraction}")
    patients = np.array(sorted(cohort.images["patient_id"].unique()))
    if len(patients) < 2:
        raise InputError(
            f"cohort {cohort.name!r} has {len(patients)} patient(s); a patient-disjoint split needs at least 2, so "
            "add patients, or audit the cohort as a whole without a split"
        )
    rng = np.random.default_rng(seed)
    if stratify is None:
        strata = [patients]
    else:
        if stratify not in cohort.label_names:
            raise InputError(f"cannot stratify by {stratify!r}: cohort {cohort.name!r} has labels "
                             f"{list(cohort.label_names)}")
        positive = cohort.reports.loc[cohort.reports[stratify] == 1.0, "report_id"]
        positive_patients = set(cohort.images.loc[cohort.images["report_id"].isin(positive), "patient_id"])
        in_positive = np.isin(patients, list(positive_patients))
        strata = [stratum for stratum in (patients[in_positive], patients[~in_positive]) if len(stratum)]

    test_patients: set[str] = set()
    for stratum in strata:
        order = rng.permutation(len(stratum))
        n_test = round(test_fraction * len(stratum))
        test_patients |= set(stratum[order[:n_test]])
    # At least one patient on each side, whatever the rounding in small strata.
    if not test_patients:
        test_patients = {patients[rng.integers(len(patients))]}
    if len(test_patients) == len(patients):
        test_patients.discard(sorted(test_patients)[0])
    train_patients = set(patients) - test_patients
    return (
        cohort.subset_patients(train_patients, name=f"{cohort.name}_train"),
        cohort.subset_patients(test_patients, name=f"{cohort.name}_test"),
    )


def official_split(cohort: PairedCohort, part: str) -> PairedCohort:
    """Keep the images the publisher assigns to ``part`` (for example ``test``) and their reports."""
    if not cohort.split:
        raise InputError(f"cohort {cohort.name!r} has no official split; use split_by_patient")
    parts = sorted(set(cohort.split.values()))
    if part not in parts:
        raise InputError(f"cohort {cohort.name!r} has no official split part {part!r}; parts: {', '.join(parts)}")
    keep = cohort.images["image_id"].map(cohort.split).eq(part)
    images = cohort.images[keep].reset_index(drop=True)
    reports = cohort.reports[cohort.reports["report_id"].isin(images["report_id"])].reset_index(drop=True)
    embeddings = {}
    if "image" in cohort.embeddings:
        embeddings["image"] = cohort.embeddings["image"][keep.to_numpy()]
    if "report" in cohort.embeddings:
        embeddings["report"] = cohort.embeddings["report"][cohort.reports["report_id"].isin(images["report_id"]).to_numpy()]
    return dataclasses.replace(cohort, name=f"{cohort.name}_{part}", images=images, reports=reports, skipped={},
                               repairs={}, split={i: part for i in images["image_id"]}, embeddings=embeddings)
