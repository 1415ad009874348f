"""Paired cohorts: loaders for real archives into one canonical table pair."""

from linkrisk.data.cohort import CHEXPERT_LABELS, PairedCohort, official_split, split_by_patient
from linkrisk.data.covid import load_covid
from linkrisk.data.chexpert_plus import load_chexpert_plus
from linkrisk.data.manifest import load_manifest
from linkrisk.data.mimic import load_mimic_cxr
from linkrisk.data.openi import load_openi
from linkrisk.data.registry import DATASETS, load_dataset, parse_spec
from linkrisk.data.sections import TextPolicy

__all__ = ["CHEXPERT_LABELS", "DATASETS", "PairedCohort", "TextPolicy", "load_chexpert_plus", "load_covid",
           "load_dataset", "load_manifest", "load_mimic_cxr", "load_openi", "official_split", "parse_spec",
           "split_by_patient"]
