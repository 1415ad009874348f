"""Re-linkage audit: pure functions over cached, L2-normalised embeddings."""

from linkrisk.audit.design import AuditDesign, build_design
from linkrisk.audit.montecarlo import monte_carlo_recall
from linkrisk.audit.ranks import RankCounts, rank_counts, stream_counts
from linkrisk.audit.recall import (
    TIE_RULES,
    audit_embeddings,
    bootstrap_means,
    cluster_bootstrap_ci,
    expected_recall_at_k,
    normalised_rank,
)
from linkrisk.audit.run import run_audit, run_audits

__all__ = ["TIE_RULES", "AuditDesign", "RankCounts", "audit_embeddings", "bootstrap_means", "build_design",
           "cluster_bootstrap_ci", "expected_recall_at_k", "monte_carlo_recall", "normalised_rank", "rank_counts",
           "run_audit", "run_audits", "stream_counts"]

from linkrisk import _make_callable  # noqa: E402

# Calling the subpackage runs the API function of the same name (linkrisk.api).
_make_callable(__name__)
