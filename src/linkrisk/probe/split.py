"""Patient-disjoint train/test split of one cohort's rows, for probing a cohort that has no separate train cohort."""

from __future__ import annotations

import numpy as np

from linkrisk.errors import ConfigError, InputError


def probe_split(patient_ids: np.ndarray, test_fraction: float, seed: int,
                stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into patient-disjoint train and test row indices.

    The patients drawn for test are the ones that
    ``linkrisk.data.cohort.split_by_patient`` draws with the same arguments:
    patients are the sorted unique ids, shuffled with
    ``numpy.random.default_rng(seed)``, and the first
    ``round(test_fraction * n_patients)`` go to test. Each side keeps at least one patient.

    Args:
        patient_ids: ``[n]`` patient id of each row (image).
        test_fraction: share of patients in the test split, in (0, 1).
        seed: seed of the shuffle.
        stratify: optional ``[n]`` values of one label per row. Patients
            with any row equal to 1 form one stratum and the rest another,
            each split separately, so both sides keep that label's
            prevalence, as ``split_by_patient(..., stratify=label)`` does.

    Returns:
        ``(train_index, test_index)``: sorted int64 row indices.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction must be between 0 and 1, got {test_fraction}")
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1:
        raise InputError(f"patient ids must be one id per row, got shape {patient_ids.shape}")
    patients = np.unique(patient_ids)
    if len(patients) < 2:
        raise InputError(f"{len(patients)} patient(s) given, but a patient-disjoint split needs at least 2")
    rng = np.random.default_rng(seed)

    if stratify is None:
        strata = [patients]
    else:
        stratify = np.asarray(stratify, dtype=np.float64)
        if stratify.shape != patient_ids.shape:
            raise InputError(f"stratify has shape {stratify.shape}, expected one value per row {patient_ids.shape}")
        in_positive = np.isin(patients, patient_ids[stratify == 1.0])
        strata = [stratum for stratum in (patients[in_positive], patients[~in_positive]) if len(stratum)]

    test_patients: set = set()
    for stratum in strata:
        order = rng.permutation(len(stratum))
        n_test = round(test_fraction * len(stratum))
        test_patients |= set(stratum[order[:n_test]].tolist())
    # At least one patient on each side, whatever the rounding in small strata.
    if not test_patients:
        test_patients = {patients[rng.integers(len(patients))].item()}
    if len(test_patients) == len(patients):
        test_patients.discard(sorted(test_patients)[0])

    in_test = np.isin(patient_ids, list(test_patients))
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)
