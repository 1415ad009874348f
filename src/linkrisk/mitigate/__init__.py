"""Mitigation: differentially private training of the projection heads only."""

from linkrisk.mitigate.dp import DPConfig, default_delta, train_dp_heads, validate_privacy_target

__all__ = ["DPConfig", "default_delta", "train_dp_heads", "validate_privacy_target"]
