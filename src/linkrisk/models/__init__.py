"""Frozen encoders, trainable projection heads and the feature cache."""
