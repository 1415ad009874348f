"""Paired cohorts: loaders for real archives into one canonical table pair."""

from linkrisk.data.cohort import CHEXPERT_LABELS, PairedCohort, split_by_patient
from linkrisk.data.covid import load_covid
from linkrisk.data.openi import load_openi

__all__ = ["CHEXPERT_LABELS", "PairedCohort", "load_covid", "load_openi", "split_by_patient"]
