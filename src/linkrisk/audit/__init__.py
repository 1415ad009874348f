"""Re-linkage audit: pure functions over cached, L2-normalised embeddings."""

from linkrisk.audit.ranks import rank_counts
from linkrisk.audit.recall import (
    TIE_RULES,
    audit_embeddings,
    cluster_bootstrap_ci,
    expected_recall_at_k,
    normalised_rank,
)

__all__ = ["TIE_RULES", "audit_embeddings", "cluster_bootstrap_ci", "expected_recall_at_k", "normalised_rank",
           "rank_counts"]
