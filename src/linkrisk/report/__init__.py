"""Outputs: the results JSON and a self-contained HTML report."""
