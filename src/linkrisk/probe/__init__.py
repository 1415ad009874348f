"""Utility cost: linear probes on image embeddings."""

from linkrisk.probe.linear import probe_macro_auroc

__all__ = ["probe_macro_auroc"]
