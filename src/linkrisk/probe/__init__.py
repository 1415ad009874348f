"""Utility cost: linear probes and zero-shot classification on image embeddings."""

from linkrisk.probe.bootstrap import auroc_intervals, patient_resample_counts, weighted_auroc
from linkrisk.probe.linear import DEFAULT_C_GRID, probe_macro_auroc, select_c
from linkrisk.probe.split import probe_split
from linkrisk.probe.summary import DEFAULT_MIN_COUNT
from linkrisk.probe.zeroshot import (DEFAULT_PROMPTS, label_prompts, prompt_embeddings, zeroshot_macro_auroc,
                                     zeroshot_scores)

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_PROMPTS",
    "auroc_intervals",
    "label_prompts",
    "patient_resample_counts",
    "probe_macro_auroc",
    "probe_split",
    "prompt_embeddings",
    "select_c",
    "weighted_auroc",
    "zeroshot_macro_auroc",
    "zeroshot_scores",
]
