"""Mitigation: differentially private training of the projection heads only."""

from linkrisk.mitigate.dp import DPConfig, default_delta, train_dp_heads, validate_privacy_target

__all__ = ["DPConfig", "default_delta", "train_dp_heads", "validate_privacy_target"]

from linkrisk import _make_callable  # noqa: E402

# Calling the subpackage runs the API function of the same name (linkrisk.api).
_make_callable(__name__)
