"""Mitigation: differentially private training of the projection heads only."""

from linkrisk.mitigate.dp import DPConfig, default_delta, train_dp_heads

__all__ = ["DPConfig", "default_delta", "train_dp_heads"]
